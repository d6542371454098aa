"""edgetl export of keras checkpoints: TFLiteConverter variants verified in LiteRT, tfmot pruning with measured
per-layer sparsity and gzip size, QAT / prune-preserving QAT, recipes, and options refused across frameworks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgetl.config import ExportConfig, FinetuneConfig
from edgetl.errors import UserError
from edgetl.export import resolve_config, run_export
from edgetl.finetune import run_finetune
from tests.conftest import run_cli
from tests.test_export import make_checkpoint

pytestmark = pytest.mark.keras
pytest.importorskip("tf_keras")

TINY = {"framework": "keras", "backbone": "mobilenet_v2", "width": 0.35, "image_size": 32, "weights": "none",
        "epochs_finetune": 0, "batch_size": 32}


@pytest.fixture(scope="module")
def keras_checkpoint(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    os.environ["EDGETL_CACHE"] = str(shared_cache)
    run = tmp_path_factory.mktemp("keras-export-run")
    return run_finetune(FinetuneConfig.of(data="builtin:shapes", seed=2, **TINY), run)


def _sidecar(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text())


def test_pruned_fp32_and_int8_tflite_verified_with_sparsity_and_gzip(keras_checkpoint: Path, tmp_path: Path) -> None:
    out = run_export(keras_checkpoint, ExportConfig.of(quant=("fp32", "int8"), calib=24, prune=0.5, max_drop=100),
                     tmp_path / "export")
    names = ["mobilenet_v2-w0.35-32-fp32-pruned50.tflite", "mobilenet_v2-w0.35-32-int8-pruned50.tflite"]
    assert sorted(p.name for p in out.glob("*.tflite")) == names  # the default .pte is skipped for keras
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["framework"] == "keras" and manifest["config"]["compression"]["prune"] == 0.5
    pruning = manifest["pruning"]
    layers = {row["layer"]: row for row in pruning["layers"]}
    assert all(abs(row["sparsity"] - 0.5) < 0.01 for row in layers.values() if row["type"] in ("Conv2D", "Dense"))
    assert all(row["sparsity"] < 0.05 and not row["prunable"] for row in layers.values()
               if row["type"] == "DepthwiseConv2D")  # tfmot does not prune depthwise kernels
    assert "DepthwiseConv2D" in pruning["note"]
    fp32, int8 = (_sidecar(out, name) for name in names)
    assert fp32["framework"] == "keras" and fp32["input"]["dtype"] == "float32"
    assert int8["input"]["dtype"] == "int8" and int8["output"]["dtype"] == "int8"
    assert int8["input"]["quantization"]["scale"] > 0 and int8["quantization"]["calibration_images"] == 24
    for sidecar in (fp32, int8):
        assert sidecar["gzip_bytes"] < 0.8 * sidecar["bytes"]  # zeros compress: the pruning gain is in gzip
        assert sidecar["weight_sparsity"]["CONV_2D"]["sparsity"] > 0.45  # sparsity survives conversion
        assert sidecar["export_seconds"] > 0 and sidecar["verification"]["status"] == "ok"
    rows = {row["file"]: row for row in manifest["verification"]["rows"]}
    assert rows[names[0]]["agreement"] == 1.0 and rows[names[0]]["max_prob_diff"] < 1e-4  # fp32 = keras float
    assert manifest["float_reference"]["model"] == "pruned and stripped"
    assert pruning["fine_tune"]["epochs"] == 6 and pruning["fine_tune"]["lr"] == 1e-4  # the measured defaults
    assert (out / "labels.txt").read_text().split() == ["circle", "square", "triangle"]
    assert np.load(out / "test_inputs.npz")["x"].shape[1:] == (32, 32, 3)


def test_pruning_fine_tune_knobs_are_honoured_not_ignored(keras_checkpoint: Path, tmp_path: Path) -> None:
    out = run_export(keras_checkpoint, ExportConfig.of(formats=("tflite",), quant=("fp32",), prune="magnitude:0.3",
                                                    recovery_epochs=1, recovery_lr=5e-4, tune_images=24,
                                                    max_drop=100), tmp_path / "export")
    manifest = json.loads((out / "manifest.json").read_text())
    tune = manifest["pruning"]["fine_tune"]
    assert (tune["epochs"], tune["lr"], tune["images"], tune["train_images"]) == (1, 5e-4, 24, 24)
    assert len(tune["history"]) == 1 and manifest["config"]["compression"]["recovery_epochs"] == 1
    assert [p.name for p in out.glob("*.tflite")] == ["mobilenet_v2-w0.35-32-fp32-pruned30.tflite"]


@pytest.mark.slow
def test_fp16_dynamic_and_qat_int8(keras_checkpoint: Path, tmp_path: Path) -> None:
    out = run_export(keras_checkpoint, ExportConfig.of(formats=("tflite",), quant=("fp16", "dynamic", "int8"), calib=24,
                                                    qat=True, max_drop=100), tmp_path / "export")
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {row["quant"]: row for row in manifest["verification"]["rows"]}
    assert set(rows) == {"fp16", "dynamic", "int8"} and all(r["status"] == "ok" for r in rows.values())
    assert rows["fp16"]["agreement"] == 1.0
    assert manifest["quantization"]["method"].startswith("tfmot QAT")
    assert (out / "mobilenet_v2-w0.35-32-int8-qat.tflite").is_file()


@pytest.mark.slow
def test_prune_preserving_qat_keeps_sparsity_in_int8(keras_checkpoint: Path, tmp_path: Path) -> None:
    out = run_export(keras_checkpoint, ExportConfig.of(formats=("tflite",), quant=("int8",), calib=24, prune=0.5,
                                                    qat=True, max_drop=100), tmp_path / "export")
    sidecar = _sidecar(out, "mobilenet_v2-w0.35-32-int8-pruned50-qat.tflite")
    assert "PrunePreserve" in sidecar["quantization"]["method"]
    assert sidecar["weight_sparsity"]["CONV_2D"]["sparsity"] > 0.45


def test_keras_only_options_on_a_torch_checkpoint_name_its_framework(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path)  # --prune and --qat are torch options too
    for flags, fragment in ((["--quant", "fp16"], "fp16"), (["--quant", "dynamic"], "dynamic")):
        result = run_cli("export", str(folder), *flags)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert fragment in lines[0] and "framework is torch" in lines[0]


def test_torch_only_options_and_pte_on_a_keras_checkpoint(keras_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="framework is keras"):
        run_export(keras_checkpoint, ExportConfig.of(bias_correction=False), tmp_path / "a")
    with pytest.raises(UserError, match=r"^--distill 0.5: torch-only; this checkpoint's framework is keras"):
        run_export(keras_checkpoint, ExportConfig.of(prune=0.5, distill=0.5), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    result = run_cli("export", str(keras_checkpoint), "--formats", "pte", "--out", str(tmp_path / "b"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "keras checkpoint exports to .tflite only" in lines[0]
    assert not (tmp_path / "b").exists()


def test_keras_recipes_and_prune_range() -> None:
    config = resolve_config("keras-android-pruned50-int8")
    assert config.compression.prune == 0.5 and config.policy.qat and config.quantization.formats == ("tflite",)
    assert resolve_config("keras-all").quantization.quant == ("fp32", "fp16", "dynamic", "int8")
    with pytest.raises(UserError, match="--prune 1.5"):
        resolve_config(None, prune=1.5)
