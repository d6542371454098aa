"""The TensorFlow backend: the only package that imports tensorflow, tf_keras and tfmot.

tfmot works only with Keras 2 models, so the legacy Keras switch is set here, before any module of this
package can import TensorFlow (importing a submodule always runs this file first).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ chatter (no CUDA, oneDNN) is not for users


@contextlib.contextmanager
def quiet_native(fds: tuple[int, ...] = (2,)) -> Iterator[None]:
    """Silence file descriptors (and Python warnings) while TensorFlow's native code runs.

    TensorFlow and its converter print straight to fd 1/2 from C++ (start-up lines, converter flags), which
    would break edgetl's one-line error messages and tables; Python exceptions still propagate unchanged.
    EDGETL_DEBUG=1 lets everything through.
    """
    if os.environ.get("EDGETL_DEBUG") == "1":
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for fd in fds:
                os.dup2(devnull.fileno(), fd)
            yield
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)


if "tensorflow" not in sys.modules:
    with quiet_native():
        import tensorflow
        import tf_keras  # noqa: F401

        tensorflow.config.list_physical_devices("GPU")  # CUDA probing logs once, here, while silenced
