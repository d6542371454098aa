"""The torch backend: the only package in edgetl that imports torch and its ecosystem."""
