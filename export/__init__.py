"""edgetl's shipped export assets: recipes/, sweeps/, the android/ and ios/ app templates and golden_check.py.

A package only so that pyproject.toml can map this folder into the wheel as `edgetl.assets.export`;
edgetl reads it through `edgetl.assets`.
"""
