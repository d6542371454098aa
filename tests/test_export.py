"""edgetl export: options, recipes, bad input, failure isolation and the int8 quality gate.

Everything here runs without lowering a model (a fake backend stands in where a graph would be built);
tests/test_export_torch.py does the real thing at 32 px.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl import export as export_stage
from edgetl.backends.base import CAPABILITIES, Backend, Converted, Graphs
from edgetl.config import ExportConfig, artifact_name, load_recipe, recipe_names
from edgetl.contracts import ModelInfo
from edgetl.errors import UserError
from edgetl.export import ExportFailed, resolve_config
from edgetl.verify import QualityError
from tests.conftest import run_cli

LABELS = ["circle", "square"]


def make_checkpoint(root: Path, size: int = 32, per_split: int = 3) -> Path:
    """A checkpoint folder whose files are all present (weights are placeholder bytes) over real images."""
    data = root / "data"
    splits: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(LABELS):
        (data / name).mkdir(parents=True)
        for split in splits:
            for i in range(per_split):
                rel = f"{name}/{split}-{i}.png"
                Image.new("RGB", (40, 40), (60 * label + 10 * i, 30, 200)).save(data / rel)
                splits[split].append([rel, label])
    folder = root / "checkpoint"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"not really weights")
    (folder / "labels.txt").write_text("".join(f"{n}\n" for n in LABELS))
    (folder / "history.json").write_text("[]")
    (folder / "splits.json").write_text(json.dumps({
        "root": str(data), "source": str(data), "classes": LABELS, "split_origin": "test", "splits": splits,
    }))
    manifest = {
        "kind": "edgetl.checkpoint", "schema_version": 1, "framework": "torch", "weights_file": "model.pt",
        "weights_sha256": "0" * 64,
        "model": {"backbone": "mobilenet_v3_small", "width": 1.0, "image_size": size, "num_classes": 2,
                  "feature_dim": 576, "parameters": 1},
        "labels": LABELS,
        "preprocess": {"color": "RGB", "resize": {"height": size, "width": size, "method": "bilinear",
                                                  "keep_aspect": False},
                       "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3, "layout": "NCHW", "dtype": "float32"},
        "data": {"splits_file": "splits.json"},
        "metrics": {"test": {"top1": 0.5}},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# ---------------------------------------------------------------- options and recipes


def test_defaults_export_both_formats_both_precisions() -> None:
    config = ExportConfig().validate()
    assert config.formats == ("tflite", "pte") and config.quant == ("fp32", "int8")
    assert config.max_drop == 1.0


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"formats": "onnx"}, "unknown format 'onnx'"),
        ({"quant": "int4"}, "unknown quantization 'int4'"),
        ({"formats": ""}, "--formats is empty"),
        ({"calib": 0}, "--calib 0"),
        ({"max_drop": -1.0}, "--max-drop -1"),
    ],
)
def test_bad_options_are_one_line_user_errors(overrides: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        resolve_config(None, **overrides)


def test_recipes_ship_and_flags_override_them() -> None:
    assert {"android-litert-int8", "ios-executorch-int8", "ios-executorch-fp32"} <= set(recipe_names())
    assert load_recipe("android-litert-int8")["formats"] == ("tflite",)
    config = resolve_config("ios-executorch-int8", calib=64)
    assert config.formats == ("pte",) and config.quant == ("int8",) and config.calib == 64
    assert config.recipe == "ios-executorch-int8"


def test_unknown_recipe_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="android-litert-int8"):
        load_recipe("no-such-recipe")
    bad = tmp_path / "bad.toml"
    bad.write_text('formats = ["pte"]\ncolour = "red"\n')
    with pytest.raises(UserError, match="unknown key"):
        load_recipe(str(bad))


def test_file_names_record_the_choices() -> None:
    model = ModelInfo(backbone="efficientnet_lite0", width=1.0, image_size=224, num_classes=10)
    assert artifact_name(model, "int8", "pte") == "efficientnet_lite0-224-int8.pte"
    model = ModelInfo(backbone="mobilenet_v2", width=0.5, image_size=96, num_classes=10)
    assert artifact_name(model, "fp32", "tflite") == "mobilenet_v2-w0.5-96-fp32.tflite"


def test_stage_modules_import_no_framework() -> None:
    code = "import sys, edgetl.export, edgetl.verify; bad = {'torch', 'tensorflow'} & set(sys.modules); print(bad)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "set()"


# ---------------------------------------------------------------- bad input through the CLI


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgetl: error:")
    return lines[0]


def test_missing_checkpoint(tmp_path: Path) -> None:
    assert "does not exist" in _one_error_line(run_cli("export", str(tmp_path / "nope")))


def test_incomplete_checkpoint(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path)
    (folder / "splits.json").unlink()
    assert "incomplete" in _one_error_line(run_cli("export", str(folder)))


def test_unknown_manifest_version(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "schema_version 99" in _one_error_line(run_cli("export", str(folder)))


def test_unknown_format_and_quant(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path)
    assert "unknown format 'onnx'" in _one_error_line(run_cli("export", str(folder), "--formats", "pte,onnx"))
    assert "unknown quantization 'int4'" in _one_error_line(run_cli("export", str(folder), "--quant", "int4"))


def test_unwritable_output(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = _one_error_line(run_cli("export", str(folder), "--out", str(blocker / "export")))
    assert "not writable" in line


# ---------------------------------------------------------------- orchestration with a fake backend


class FakeBackend(Backend):
    """The backend contract with bytes instead of graphs; the steps named in `fail` raise."""

    capabilities = CAPABILITIES["torch"]

    def __init__(self, fail: set[str]) -> None:
        self.fail = fail
        self.calibration = None

    def needs_calibration(self, config) -> bool:
        return not config.qat

    def load_float(self, checkpoint, manifest, listing, config) -> Graphs:
        return Graphs(float_model="f", example=None)

    def quantize(self, graphs, checkpoint, manifest, listing, calibration, config) -> None:
        self.calibration = calibration
        if "quantize" in self.fail:
            raise RuntimeError("observer exploded")
        graphs.int8, graphs.quantization = "q", {"calibration_images": len(calibration), "seconds": 0.0}

    def logits(self, model, x):
        return np.tile(np.array([[2.0, 0.0]], np.float32), (len(x), 1))

    def convert(self, graphs, quant, fmt) -> Converted:
        if fmt in self.fail:
            raise RuntimeError({"pte": "lowering exploded\nsecond line", "tflite": "conversion exploded"}[fmt])
        return Converted(f"{fmt}-bytes".encode(), {"delegation": {"compute_ops_outside": []}} if fmt == "pte" else {})


def fake_describe(path: Path, fmt: str) -> dict:
    """What the runtimes would say about a real file of this tiny model (NHWC float input, two logits)."""
    tensor = {"dtype": "float32", "quantization": None}
    return {"inputs": [{"name": "x", "shape": [1, 32, 32, 3], **tensor}],
            "outputs": [{"name": "logits", "shape": [1, 2], **tensor}],
            "ops": {}, "delegation": {"whole_graph_delegated": True}}


def fake_verify(drop: float):
    def verify(folder, artifacts, threads=None):
        rows = [{"file": a["file"], "format": a["format"], "quant": a["quant"], "status": "ok", "images": 6,
                 "top1": 0.5, "agreement": 1.0, "max_prob_diff": 0.0, "seconds": 0.0,
                 "drop_points": drop if a["quant"] == "int8" else 0.0} for a in artifacts]
        return {"images": 6, "float_top1": 0.5, "rows": rows, "cross_format_agreement": []}

    return verify


@pytest.fixture()
def patched(monkeypatch: pytest.MonkeyPatch):
    def apply(fail: set[str] = frozenset(), drop: float = 0.0) -> FakeBackend:
        backend = FakeBackend(set(fail))
        monkeypatch.setattr(export_stage.backends, "load", lambda framework: backend)
        monkeypatch.setattr(export_stage, "verify_artifacts", fake_verify(drop))
        monkeypatch.setattr(export_stage, "_describe", fake_describe)
        return backend

    return apply


def test_one_format_failing_keeps_the_others(tmp_path: Path, patched) -> None:
    patched(fail={"tflite"})
    folder = make_checkpoint(tmp_path)
    out = tmp_path / "export"
    with pytest.raises(ExportFailed, match="int8.tflite") as caught:
        export_stage.run_export(folder, ExportConfig(calib=4), out)
    assert caught.value.exit_code == 1
    names = sorted(p.name for p in out.iterdir())
    assert "mobilenet_v3_small-32-int8.pte" in names and "mobilenet_v3_small-32-fp32.pte.json" in names
    assert not any(name.endswith(".tflite") for name in names)
    assert not any(name.startswith(".") for name in names), names  # no temp leftovers
    manifest = json.loads((out / "manifest.json").read_text())
    failed = [a for a in manifest["artifacts"] if a["status"] == "failed"]
    assert {a["file"] for a in failed} == {"mobilenet_v3_small-32-fp32.tflite", "mobilenet_v3_small-32-int8.tflite"}
    assert failed[0]["error"] == "RuntimeError: conversion exploded"
    test = np.load(out / "test_inputs.npz")
    assert test["x"].shape == (6, 32, 32, 3) and test["x"].dtype == np.float32 and test["y"].dtype == np.int64
    assert (out / "labels.txt").read_text().split() == LABELS
    sidecar = json.loads((out / "mobilenet_v3_small-32-int8.pte.json").read_text())
    assert sidecar["parent"]["weights_sha256"] == "0" * 64 and sidecar["input"]["layout"] == "NHWC"
    assert sidecar["verification"]["status"] == "ok"


def test_int8_drop_over_the_limit_fails_after_writing(tmp_path: Path, patched) -> None:
    patched(drop=2.5)
    folder = make_checkpoint(tmp_path)
    out = tmp_path / "export"
    with pytest.raises(QualityError, match=r"fell 2\.5 points.*--max-drop 1.*calibration") as caught:
        export_stage.run_export(folder, ExportConfig(calib=4), out)
    assert caught.value.exit_code == 3
    assert len(list(out.glob("*.pte"))) == 2 and len(list(out.glob("*.tflite"))) == 2
    export_stage.run_export(folder, ExportConfig(calib=4, max_drop=3.0), out)  # a looser gate passes


def test_calibration_draws_from_training_images_only(tmp_path: Path, patched) -> None:
    backend = patched()
    export_stage.run_export(make_checkpoint(tmp_path), ExportConfig(calib=100, quant=("int8",)), tmp_path / "e")
    assert len(backend.calibration) == 6  # all six training images, never more than exist


def test_a_file_whose_manifest_cannot_be_made_is_not_left_behind(tmp_path: Path, monkeypatch, patched) -> None:
    patched()

    def unreadable(path: Path, fmt: str) -> dict:
        if fmt == "tflite":
            raise ValueError("flatbuffer unreadable")
        return fake_describe(path, fmt)

    monkeypatch.setattr(export_stage, "_describe", unreadable)
    out = tmp_path / "export"
    with pytest.raises(ExportFailed):
        export_stage.run_export(make_checkpoint(tmp_path), ExportConfig(calib=4, quant=("int8",)), out)
    assert not list(out.glob("*.tflite")) and len(list(out.glob("*.pte"))) == 1


def test_quantization_failing_keeps_the_fp32_files(tmp_path: Path, patched) -> None:
    patched(fail={"quantize"})
    out = tmp_path / "export"
    with pytest.raises(ExportFailed, match="int8"):
        export_stage.run_export(make_checkpoint(tmp_path), ExportConfig(calib=4), out)
    assert sorted(p.name for p in out.glob("*.pte")) == ["mobilenet_v3_small-32-fp32.pte"]
    manifest = json.loads((out / "manifest.json").read_text())
    errors = {a["file"]: a.get("error") for a in manifest["artifacts"] if a["status"] == "failed"}
    assert errors["mobilenet_v3_small-32-int8.tflite"] == "quantization: RuntimeError: observer exploded"


@pytest.mark.torch
def test_damaged_weights_file_exits_2_with_one_line(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    folder = make_checkpoint(tmp_path)  # model.pt holds placeholder bytes
    for flags in ([], ["--prune", "channels:0.5"]):
        result = run_cli("export", str(folder), "--out", str(tmp_path / "e"), *flags)
        errors = [line for line in result.stderr.splitlines() if line.startswith("edgetl: error")]
        assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "model.pt" in errors[0] and "cannot be loaded into a mobilenet_v3_small (UnpicklingError)" in errors[0]
    assert not (tmp_path / "e").exists()
