"""The format registry (`edgetl/formats/`): one module per format, and every table that varies by format is read
from it — the capability table, the manifests' contracts, bench's file list, verification's cross-format
agreement — so a format added to it reaches them without an edit elsewhere."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest

from edgetl import formats
from edgetl.capabilities import CAPABILITIES
from edgetl.errors import UserError
from edgetl.formats.base import Format


def test_every_format_module_defines_its_record_and_how_to_run_it() -> None:
    assert list(formats.FORMATS) == ["tflite", "pte", "onnx"]
    for name, record in formats.FORMATS.items():
        assert record.name == name and record.suffix.startswith(".") and formats.SUFFIXES[record.suffix] == name
        assert record.blocks in ("cut", "lowered", None) and record.arm64 in ("python", "runner")
        assert record.converters and record.runtime
    assert formats.get("pte").quantizes_inside and not formats.get("tflite").quantizes_inside
    assert [name for name, record in formats.FORMATS.items() if record.default] == ["tflite", "pte"]
    with pytest.raises(UserError, match="unknown model format 'npy'; valid: tflite, pte, onnx"):
        formats.get("npy")
    with pytest.raises(UserError, match="unknown model format"):
        formats.format_of(Path("model.npy"))


def test_the_capability_table_takes_its_formats_and_converters_from_the_registry() -> None:
    assert CAPABILITIES["torch"].formats == ("tflite", "pte", "onnx")
    assert CAPABILITIES["keras"].formats == ("tflite",)
    assert CAPABILITIES["torch"].converters["pte"] == formats.get("pte").converters["torch"]


def _toy_format() -> types.ModuleType:
    """A format whose file is a .npy weight matrix: enough to run, describe and compare."""
    module = types.ModuleType("toy_npy_format")
    module.FORMAT = Format(name="npy", suffix=".npy", runtime="numpy matmul", converters={"torch": "np.save"},
                           style=("tab:green", "d"))
    module.run = lambda path, x, threads=None: x.reshape(len(x), -1) @ np.load(path)
    module.describe = lambda path: {"inputs": [], "outputs": []}
    module.facts = lambda path: {"toy": True}
    return module


@pytest.fixture
def registry() -> object:
    """The registry's tables, put back as they were after the test (other modules hold the same dicts)."""
    tables = (formats.FORMATS, formats.SUFFIXES, formats._MODULES)
    saved = [dict(table) for table in tables]
    yield formats
    for table, before in zip(tables, saved, strict=True):
        table.clear()
        table.update(before)


def test_a_format_added_to_the_registry_reaches_the_tables_that_vary_by_format(registry: object,
                                                                               tmp_path: Path) -> None:
    from edgetl import verify

    formats.register(_toy_format())
    with pytest.raises(ValueError, match="registered twice"):
        formats.register(_toy_format())
    with pytest.raises(TypeError, match="lacks FORMAT, run, describe, facts"):
        formats.register(types.ModuleType("half_a_format"))
    weights = tmp_path / "model.npy"
    np.save(weights, np.eye(4, 3, dtype=np.float32))
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert formats.format_of(weights) == "npy"
    np.testing.assert_allclose(formats.run(weights, x), x[:, :3])
    assert formats.facts(weights, "npy") == {"toy": True}
    assert CAPABILITIES["torch"].formats == ("tflite", "pte", "onnx", "npy")
    rows = [{"quant": "fp32", "format": f, "file": f"m.{f}"} for f in ("tflite", "pte", "npy")]
    predictions = {"m.tflite": np.array([0, 1, 2, 3]), "m.pte": np.array([0, 1, 2, 0]),
                   "m.npy": np.array([0, 1, 1, 1])}
    pairs = verify._cross_agreement(rows, predictions)
    assert [(p["files"], p["agreement"]) for p in pairs] == [
        (["m.tflite", "m.pte"], 0.75), (["m.tflite", "m.npy"], 0.5), (["m.pte", "m.npy"], 0.5)]


def test_onnx_from_a_keras_checkpoint_is_one_line_from_the_capability_table() -> None:
    from edgetl.config import ExportConfig

    with pytest.raises(UserError, match=r"--formats onnx: a keras checkpoint exports to \.tflite only"):
        ExportConfig.of(formats=("onnx",)).validate().for_backend("keras")
    assert ExportConfig.of().validate().quantization.formats == ("tflite", "pte")  # ONNX is made when asked for
    keras = ExportConfig.of(formats=("tflite", "onnx")).validate().for_backend("keras")
    assert keras.quantization.formats == ("tflite",)


@pytest.mark.torch
def test_an_onnx_file_its_runtime_refuses_is_a_failed_row_and_the_others_are_published(
        tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from edgetl.config import ExportConfig
    from edgetl.export import ExportFailed, run_export
    from edgetl.formats import onnx

    monkeypatch.setitem(onnx.CONVERT, "torch", lambda module, example: b"\x08\x07 not a graph")
    out = tmp_path / "export"
    with pytest.raises(ExportFailed, match="onnx"):
        run_export(tiny_checkpoint, ExportConfig.of(formats=("tflite", "onnx"), quant=("fp32",)), out)
    manifest = json.loads((out / "manifest.json").read_text())
    status = {a["file"]: (a["status"], a.get("error") or "") for a in manifest["artifacts"]}
    assert status["mobilenet_v2-w0.35-32-fp32.tflite"][0] == "ok"
    assert status["mobilenet_v2-w0.35-32-fp32.onnx"][0] == "failed"
    assert "ONNX Runtime refuses" in status["mobilenet_v2-w0.35-32-fp32.onnx"][1]
    assert (out / "mobilenet_v2-w0.35-32-fp32.tflite").is_file()
    assert not (out / "mobilenet_v2-w0.35-32-fp32.onnx").exists()


def test_the_sweep_reads_each_format_delegation_from_what_its_converter_recorded() -> None:
    from edgetl.sweep import delegation

    def sidecar(fmt: str, info: dict | None) -> types.SimpleNamespace:
        return types.SimpleNamespace(format=fmt, delegation=info)

    assert delegation(sidecar("pte", {"compute_ops_outside": ["aten.mean"]})) == {
        "ops_outside": ["aten.mean"], "fully_delegated": False}
    assert delegation(sidecar("tflite", {"whole_graph_delegated": True}))["fully_delegated"] is True
    assert delegation(sidecar("onnx", None)) == {"ops_outside": [], "fully_delegated": None}  # no delegate there
