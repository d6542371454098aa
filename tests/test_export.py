"""edgetl export: options, recipes, bad input, failure isolation and the int8 quality gate.

Everything here runs without lowering a model (a fake backend stands in where a graph would be built);
tests/test_export_torch.py does the real thing at 32 px.
"""

from __future__ import annotations

import hashlib
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
from edgetl.paths import CONTENTS_FILE
from edgetl.verify import QualityError
from tests.conftest import run_cli, tree_digest

LABELS = ["circle", "square"]
FAKE_WEIGHTS = b"not really weights"
FAKE_WEIGHTS_SHA256 = hashlib.sha256(FAKE_WEIGHTS).hexdigest()


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
    (folder / "model.pt").write_bytes(FAKE_WEIGHTS)
    (folder / "labels.txt").write_text("".join(f"{n}\n" for n in LABELS))
    (folder / "history.json").write_text("[]")
    (folder / "splits.json").write_text(json.dumps({
        "root": str(data), "source": str(data), "classes": LABELS, "split_origin": "test", "splits": splits,
    }))
    manifest = {
        "kind": "edgetl.checkpoint", "schema_version": 1, "framework": "torch", "weights_file": "model.pt",
        "weights_sha256": FAKE_WEIGHTS_SHA256,
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
    config = ExportConfig.of().validate()
    assert config.quantization.formats == ("tflite", "pte") and config.quantization.quant == ("fp32", "int8")
    assert config.policy.max_drop == 1.0


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"formats": "npy"}, "unknown format 'npy'"),
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
    asked = config.quantization
    assert asked.formats == ("pte",) and asked.quant == ("int8",) and asked.calib == 64
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
    assert "unknown format 'npy'" in _one_error_line(run_cli("export", str(folder), "--formats", "pte,npy"))
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
        return not config.policy.qat

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
        export_stage.run_export(folder, ExportConfig.of(calib=4), out)
    assert caught.value.exit_code == 1
    names = sorted(p.name for p in out.iterdir())
    assert "mobilenet_v3_small-32-int8.pte" in names and "mobilenet_v3_small-32-fp32.pte.json" in names
    assert not any(name.endswith(".tflite") for name in names)
    assert not any(name.startswith(".") and name != CONTENTS_FILE for name in names), names  # no temp leftovers
    manifest = json.loads((out / "manifest.json").read_text())
    failed = [a for a in manifest["artifacts"] if a["status"] == "failed"]
    assert {a["file"] for a in failed} == {"mobilenet_v3_small-32-fp32.tflite", "mobilenet_v3_small-32-int8.tflite"}
    assert failed[0]["error"] == "RuntimeError: conversion exploded"
    test = np.load(out / "test_inputs.npz")
    assert test["x"].shape == (6, 32, 32, 3) and test["x"].dtype == np.float32 and test["y"].dtype == np.int64
    assert (out / "labels.txt").read_text().split() == LABELS
    sidecar = json.loads((out / "mobilenet_v3_small-32-int8.pte.json").read_text())
    assert sidecar["parent"]["weights_sha256"] == FAKE_WEIGHTS_SHA256 and sidecar["input"]["layout"] == "NHWC"
    assert sidecar["verification"]["status"] == "ok"


def test_int8_drop_over_the_limit_fails_after_writing(tmp_path: Path, patched) -> None:
    patched(drop=2.5)
    folder = make_checkpoint(tmp_path)
    out = tmp_path / "export"
    with pytest.raises(QualityError, match=r"fell 2\.5 points.*--max-drop 1.*calibration") as caught:
        export_stage.run_export(folder, ExportConfig.of(calib=4), out)
    assert caught.value.exit_code == 3
    assert len(list(out.glob("*.pte"))) == 2 and len(list(out.glob("*.tflite"))) == 2
    export_stage.run_export(folder, ExportConfig.of(calib=4, max_drop=3.0), out)  # a looser gate passes


def test_calibration_draws_from_training_images_only(tmp_path: Path, patched) -> None:
    backend = patched()
    export_stage.run_export(make_checkpoint(tmp_path), ExportConfig.of(calib=100, quant=("int8",)), tmp_path / "e")
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
        export_stage.run_export(make_checkpoint(tmp_path), ExportConfig.of(calib=4, quant=("int8",)), out)
    assert not list(out.glob("*.tflite")) and len(list(out.glob("*.pte"))) == 1


def test_quantization_failing_keeps_the_fp32_files(tmp_path: Path, patched) -> None:
    patched(fail={"quantize"})
    out = tmp_path / "export"
    with pytest.raises(ExportFailed, match="int8"):
        export_stage.run_export(make_checkpoint(tmp_path), ExportConfig.of(calib=4), out)
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


# ---------------------------------------------------------------- the user's data is safe


def test_out_set_to_the_run_folder_is_refused_and_the_checkpoint_kept(tmp_path: Path) -> None:
    """finetune's --out is the run folder, so `export RUN/checkpoint --out RUN` is a natural mistake."""
    folder = make_checkpoint(tmp_path)
    before = tree_digest(tmp_path)
    line = _one_error_line(run_cli("export", str(folder), "--out", str(tmp_path)))
    assert str(tmp_path) in line and "holds this stage's input" in line
    line = _one_error_line(run_cli("export", str(folder), "--out", str(folder)))
    assert "is this stage's input" in line
    assert tree_digest(tmp_path) == before


def test_out_holding_other_files_is_refused(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path)
    mine = tmp_path / "my-models"
    mine.mkdir()
    (mine / "keep.tflite").write_bytes(b"the user's own model")
    line = _one_error_line(run_cli("export", str(folder), "--out", str(mine)))
    assert str(mine) in line and "did not make" in line
    assert (mine / "keep.tflite").read_bytes() == b"the user's own model"


def test_a_previous_export_is_replaced_by_a_good_one(tmp_path: Path, patched) -> None:
    patched()
    folder, out = make_checkpoint(tmp_path), tmp_path / "export"
    export_stage.run_export(folder, ExportConfig.of(calib=4, quant=("fp32",)), out)
    first = json.loads((out / "manifest.json").read_text())["created"]
    export_stage.run_export(folder, ExportConfig.of(calib=4, quant=("int8",)), out)
    assert sorted(p.name for p in out.glob("*.pte")) == ["mobilenet_v3_small-32-int8.pte"]
    assert json.loads((out / "manifest.json").read_text())["created"] >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "data", "export"]


def test_an_export_where_every_file_fails_publishes_nothing(tmp_path: Path, patched) -> None:
    patched(fail={"tflite", "pte"})
    folder, out = make_checkpoint(tmp_path), tmp_path / "export"
    with pytest.raises(ExportFailed, match="every export failed.*conversion exploded|every export failed"):
        export_stage.run_export(folder, ExportConfig.of(calib=4), out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "data"]  # no temporary leftovers


def test_a_failed_export_leaves_the_previous_one_exactly_as_it_was(tmp_path: Path, monkeypatch, patched) -> None:
    patched()
    folder, out = make_checkpoint(tmp_path), tmp_path / "export"
    export_stage.run_export(folder, ExportConfig.of(calib=4), out)
    before = tree_digest(tmp_path)
    patched(fail={"tflite", "pte"})  # every file fails
    with pytest.raises(ExportFailed, match="nothing was published") as caught:
        export_stage.run_export(folder, ExportConfig.of(calib=4), out)
    assert caught.value.exit_code == 1 and str(out) in str(caught.value)
    assert tree_digest(tmp_path) == before
    patched()

    def crash(*args, **kwargs):
        raise RuntimeError("verifier crashed")

    monkeypatch.setattr(export_stage, "verify_artifacts", crash)  # any exception midway
    with pytest.raises(RuntimeError):
        export_stage.run_export(folder, ExportConfig.of(calib=4), out)
    assert tree_digest(tmp_path) == before


class FakeKerasBackend(FakeBackend):
    capabilities = CAPABILITIES["keras"]


def test_a_keras_export_where_every_file_fails_publishes_nothing(tmp_path: Path, monkeypatch, patched) -> None:
    """One orchestration for every backend: a keras checkpoint's export is claimed, published and refused
    exactly as a torch one's."""
    patched()
    folder, out = make_checkpoint(tmp_path), tmp_path / "export"
    _damage(folder, lambda m: {**m, "framework": "keras"})
    backend = FakeKerasBackend(set())
    monkeypatch.setattr(export_stage.backends, "load", lambda framework: {"keras": backend}[framework])
    export_stage.run_export(folder, ExportConfig.of(calib=4), out)
    assert sorted(p.name for p in out.glob("*.tflite")) == ["mobilenet_v3_small-32-fp32.tflite",
                                                           "mobilenet_v3_small-32-int8.tflite"]
    before = tree_digest(tmp_path)
    backend.fail = {"tflite"}
    with pytest.raises(ExportFailed, match="every export failed.*conversion exploded.*nothing was published"):
        export_stage.run_export(folder, ExportConfig.of(calib=4), out)
    assert tree_digest(tmp_path) == before
    line = _one_error_line(run_cli("export", str(folder), "--out", str(folder)))
    assert "is this stage's input" in line and tree_digest(tmp_path) == before


@pytest.mark.parametrize("step", range(9))
def test_a_failure_at_any_write_leaves_the_previous_export(tmp_path: Path, monkeypatch, patched, step: int) -> None:
    """Fault injection in process: the k-th file written by the export raises (a disk error, a crash)."""
    patched()
    folder, out = make_checkpoint(tmp_path), tmp_path / "export"
    export_stage.run_export(folder, ExportConfig.of(calib=4, formats=("pte",)), out)
    before = tree_digest(tmp_path)
    calls = {"n": 0}

    def failing(original):
        def write(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == step + 1:
                raise OSError(5, "Input/output error (injected)")
            return original(*args, **kwargs)

        return write

    for name in ("write_json", "write_labels", "atomic_write_bytes", "store"):
        monkeypatch.setattr(export_stage, name, failing(getattr(export_stage, name)))
    monkeypatch.setattr(export_stage.np, "savez", failing(np.savez))
    try:
        export_stage.run_export(folder, ExportConfig.of(calib=4, formats=("pte",)), out)
    except OSError:  # anything but a recorded per-file failure: nothing published
        assert tree_digest(tmp_path) == before, f"write {step + 1} changed the previous export"
        return
    except ExportFailed:  # one file failed and was recorded, the other is good: the new folder is published
        pass
    else:
        assert calls["n"] <= step, "every write succeeded, so the export must have run to the end"
    manifest = json.loads((out / "manifest.json").read_text())
    present = {p.name for p in out.glob("*.pte")}
    assert present == {a["file"] for a in manifest["artifacts"] if a["status"] == "ok"}
    for name in present:  # nothing half-written under a final name
        assert json.loads((out / f"{name}.json").read_text())["sha256"] == export_stage.sha256_file(out / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "data", "export"]


def test_labels_that_do_not_match_the_outputs_are_refused(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["labels"] = ["circle", "square", "triangle", "star"]  # 4 labels, 2 outputs
    (folder / "manifest.json").write_text(json.dumps(manifest))
    line = _one_error_line(run_cli("export", str(folder), "--out", str(tmp_path / "e")))
    assert "4 labels" in line and "2 outputs" in line
    assert not (tmp_path / "e").exists()


def _damage(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(change(manifest)))


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (lambda m: {k: v for k, v in m.items() if k != "weights_file"}, ["weights_file is missing"]),
        (lambda m: [m], ["holds a JSON list, not an object"]),
        (lambda m: {**m, "model": {**m["model"], "backbone": "resnet50"}}, ["model.backbone", "resnet50",
                                                                               "mobilenet_v2"]),
        (lambda m: {**m, "model": {**m["model"], "image_size": "32"}}, ["model.image_size", '"32"']),
        (lambda m: {**m, "model": None}, ["model is null"]),
        (lambda m: {**m, "preprocess": {**m["preprocess"], "mean": [0.5]}}, ["preprocess.mean", "3 numbers"]),
        (lambda m: {**m, "weights_file": "../../etc/passwd"}, ["weights_file", "a file name"]),
        (lambda m: {**m, "labels": ["circle", "a\nb"]}, ["label 'a\\nb'", "control character"]),
        (lambda m: {**m, "metrics": {}}, ["metrics.test.top1 is missing"]),
    ],
)
def test_a_damaged_checkpoint_manifest_is_one_line(tmp_path: Path, change, needles: list[str]) -> None:
    folder = make_checkpoint(tmp_path)
    _damage(folder, change)
    line = _one_error_line(run_cli("export", str(folder), "--out", str(tmp_path / "e")))
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    ("splits", "needle"),
    [
        ("[]", "holds a JSON list"),
        ("{broken", "is not valid JSON"),
        (json.dumps({"root": "/x", "source": "/x", "split_origin": "s", "classes": ["a", "b"],
                     "splits": {"train": [], "val": [], "test": []}}), "classes is"),
        (json.dumps({"root": "/x", "source": "/x", "split_origin": "s", "classes": LABELS,
                     "splits": {"train": [["../../secret.png", 0]], "val": [], "test": []}}),
         "splits.train: path"),
        (json.dumps({"root": "/x", "source": "/x", "split_origin": "s", "classes": LABELS,
                     "splits": {"train": [["a.png", 7]], "val": [], "test": []}}), "label 7"),
        (json.dumps({"root": "/x", "source": "/x", "split_origin": "s", "classes": LABELS,
                     "splits": {"train": []}}), "train, val and test"),
    ],
)
def test_a_damaged_splits_file_is_one_line(tmp_path: Path, splits: str, needle: str) -> None:
    folder = make_checkpoint(tmp_path)
    (folder / "splits.json").write_text(splits)
    line = _one_error_line(run_cli("export", str(folder), "--out", str(tmp_path / "e")))
    assert "splits" in line and needle in line, line
