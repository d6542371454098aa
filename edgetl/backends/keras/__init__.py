"""The TensorFlow backend: the only package that imports tensorflow, tf_keras and tfmot.

tfmot works only with Keras 2 models, so the legacy Keras switch is set here, before any module of this
package can import TensorFlow (importing a submodule always runs this file first).
"""

from __future__ import annotations

import os
import sys

from edgetl.ui import quiet_native

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ chatter (no CUDA, oneDNN) is not for users


if "tensorflow" not in sys.modules:
    with quiet_native():
        import tensorflow
        import tf_keras  # noqa: F401

        tensorflow.config.list_physical_devices("GPU")  # CUDA probing logs once, here, while silenced
