"""edgetl: fine-tune, compress, export, verify, benchmark and bundle MobileNet-family models for phones.

Importing this package imports neither torch nor TensorFlow: each backend is imported lazily by the
stage that needs it, so the CLI starts fast and works with only one framework installed.
"""

__version__ = "0.1.0"
