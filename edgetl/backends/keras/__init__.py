"""The TensorFlow backend: the only package that imports tensorflow, tf_keras and tfmot.

tfmot works only with Keras 2 models, so the legacy Keras switch is set here, before any module of this
package can import TensorFlow (importing a submodule always runs this file first).
"""

from __future__ import annotations

import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ chatter (no CUDA, oneDNN) is not for users


def _import_quietly() -> None:
    """Import TensorFlow with file descriptor 2 silenced.

    Its native libraries log start-up lines straight to fd 2 before TF_CPP_MIN_LOG_LEVEL applies, which
    would break edgetl's one-line error messages; Python exceptions still propagate unchanged.
    """
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow
            import tf_keras  # noqa: F401

            tensorflow.config.list_physical_devices("GPU")  # CUDA probing logs once, here, while silenced
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_import_quietly()
