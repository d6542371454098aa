"""Running an exported model file in its own runtime: LiteRT for .tflite, ExecuTorch for .pte.

The one place in edgetl that loads a model file to run it or to describe its tensors; verification, export
and bundle all go through it, so a file is judged by the same code everywhere. Each runtime is imported
only when a file of its format is run. The copies that run on phones without edgetl
(`device_bench/device_bench.py`, `export/golden_check.py`) stay standalone; tests/test_runtimes.py holds
them to this module's answers on the same files and inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetl.errors import UserError
from edgetl.runtimes.tensors import dequantize, quantize, softmax, tensor_info

__all__ = ["FORMATS", "NAMES", "dequantize", "describe", "format_of", "quantize", "run", "softmax", "tensor_info"]

FORMATS = {".tflite": "tflite", ".pte": "pte"}
NAMES = {"tflite": "LiteRT (ai-edge-litert Interpreter)", "pte": "ExecuTorch (XNNPACK delegate)"}


def format_of(path: Path) -> str:
    """'tflite' or 'pte', from the file name; anything else is one UserError line."""
    fmt = FORMATS.get(Path(path).suffix)
    if fmt is None:
        raise UserError(f"cannot run {str(path)!r}: unknown model format; valid: {', '.join(FORMATS)}")
    return fmt


def _module(fmt: str):
    from edgetl.runtimes import pte, tflite

    modules = {"tflite": tflite, "pte": pte}
    if fmt not in modules:
        raise UserError(f"unknown model format {fmt!r}; valid: {', '.join(modules)}")
    return modules[fmt]


def run(path: Path, x: np.ndarray, threads: int | None = None, fmt: str | None = None) -> np.ndarray:
    """Float outputs of the file for each image of `x` (float32, the file's input layout), batch 1 as exported.

    Integer input and output tensors are (de)quantized with their own scale and zero point, as an app does.
    """
    return _module(fmt or format_of(path)).run(Path(path), x, threads)


def describe(path: Path, fmt: str | None = None) -> dict:
    """`inputs` and `outputs` of the file (name, dtype, shape, quantization), plus what its runtime reports."""
    return _module(fmt or format_of(path)).describe(Path(path))
