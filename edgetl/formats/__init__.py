"""Every model format edgetl makes, as one registry: a module per format (`tflite.py`: LiteRT, `pte.py`:
ExecuTorch) holds its record (`Format`: suffix, runtime, converters by framework, how its blocks are cut, how it
runs on ARM64, whether apps get templates), and how to run and describe a file of it.

The one place in edgetl that loads a model file to run it or to describe its tensors; verification, export and
bundle all go through it, so a file is judged by the same code everywhere. A format's runtime is imported only
when a file of it runs; importing this registry imports no runtime. The copies that run on phones without
edgetl (`device_bench/device_bench.py`, `export/golden_check.py`) stay standalone; tests/test_runtimes.py holds
them to this module's answers on the same files and inputs.

Importing the registry imports neither numpy nor a runtime. Adding a format: a module here with `FORMAT`, `run`,
`describe` and `facts` (and `CONVERT`, framework → function, when the backend has no converter of its own for
it; `app_metadata` and `app_classify` when apps read metadata that `edgetl bundle` writes into the file, and a
task library classifies with it), and its name in `MODULES`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from edgetl.errors import UserError
from edgetl.formats.base import AppTemplates, Format

if TYPE_CHECKING:
    import numpy as np

TENSORS = ("dequantize", "quantize", "softmax", "tensor_info")  # from formats/tensors.py, imported when first used


def __getattr__(name: str) -> Any:
    """The arithmetic on tensors (numpy) is imported when first asked for: the registry itself stays numpy-free,
    so the configuration and the report import it for nothing."""
    if name in TENSORS:
        from edgetl.formats import tensors

        return getattr(tensors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["FORMATS", "SUFFIXES", "AppTemplates", "Format", "app_hook", "convert", "dequantize", "describe", "facts",
           "format_of", "get", "quantize", "register", "run", "softmax", "tensor_info"]

# in the order tables and --formats list them
MODULES = ("edgetl.formats.tflite", "edgetl.formats.pte", "edgetl.formats.onnx")
MEMBERS = ("FORMAT", "run", "describe", "facts")  # what a format module defines
FORMATS: dict[str, Format] = {}
SUFFIXES: dict[str, str] = {}
_MODULES: dict[str, ModuleType] = {}


def register(module: ModuleType) -> Format:
    """Add a format module to the registry (its record, and how to run and describe its files)."""
    lacks = [name for name in MEMBERS if not hasattr(module, name)]
    if lacks:
        raise TypeError(f"{module.__name__} is not a format module: it lacks {', '.join(lacks)}")
    record: Format = module.FORMAT
    if record.name in FORMATS or record.suffix in SUFFIXES:
        raise ValueError(f"format {record.name!r} ({record.suffix}) is registered twice")
    FORMATS[record.name], SUFFIXES[record.suffix], _MODULES[record.name] = record, record.name, module
    return record


for _name in MODULES:
    register(importlib.import_module(_name))


def get(name: str) -> Format:
    """The record of format `name`; an unknown one is one UserError line with the valid names."""
    if name not in FORMATS:
        raise UserError(f"unknown model format {name!r}; valid: {', '.join(FORMATS)}")
    return FORMATS[name]


def format_of(path: Path) -> str:
    """The format of a file, from its name; anything else is one UserError line."""
    fmt = SUFFIXES.get(Path(path).suffix)
    if fmt is None:
        raise UserError(f"cannot run {str(path)!r}: unknown model format; valid: {', '.join(SUFFIXES)}")
    return fmt


def run(path: Path, x: np.ndarray, threads: int | None = None, fmt: str | None = None) -> np.ndarray:
    """Float outputs of the file for each image of `x` (float32, the file's input layout), batch 1 as exported.

    Integer input and output tensors are (de)quantized with their own scale and zero point, as an app does.
    """
    fmt = fmt or format_of(path)
    get(fmt)
    return _MODULES[fmt].run(Path(path), x, threads)


def describe(path: Path, fmt: str | None = None) -> dict:
    """`inputs` and `outputs` of the file (name, dtype, shape, quantization), plus what its runtime reports."""
    fmt = fmt or format_of(path)
    get(fmt)
    return _MODULES[fmt].describe(Path(path))


def convert(fmt: str, framework: str, *args: object, **kwargs: object) -> bytes:
    """A file of format `fmt` made by the format's own converter for `framework` (its module's CONVERT), for a
    backend that has no converter of its own for that format."""
    converters = getattr(_MODULES[get(fmt).name], "CONVERT", {})
    if framework not in converters:
        raise UserError(f"format {fmt!r} has no converter for {framework} checkpoints; valid: "
                        f"{', '.join(n for n, f in FORMATS.items() if framework in f.converters)}")
    return converters[framework](*args, **kwargs)


def app_hook(fmt: str, name: str) -> Any:
    """A format module's optional bundle step (`app_metadata`, `app_classify`), or None where it has none."""
    return getattr(_MODULES[get(fmt).name], name, None)


def facts(path: Path, fmt: str) -> dict:
    """What an export records about a file beyond its tensors (a .tflite's weight sparsity)."""
    get(fmt)
    return _MODULES[fmt].facts(Path(path))
