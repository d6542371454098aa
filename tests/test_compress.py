"""Compression on the torch backend, for real: channel pruning (torch-pruning) that removes parameters and
MACs and still exports, magnitude pruning with measured per-layer sparsity and a gzip win, PT2E QAT int8 files
verified in LiteRT and ExecuTorch, and bad specs refused with one line (exit 2) before any framework import.

Exports lower every file (30-60 s each on 2 cores): the default run makes one pruned + QAT pair, the
comparisons against dense exports are behind `slow`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgetl.config import ExportConfig, parse_prune, variant_tag
from edgetl.errors import UserError
from edgetl.export import resolve_config
from tests.conftest import run_cli
from tests.test_cli import _assert_one_line_error
from tests.test_export import make_checkpoint

PREFIX = "mobilenet_v2-w0.35-32-"


# ---------------------------------------------------------------- specs (no framework)


def test_prune_specs_parse_and_name_files() -> None:
    assert parse_prune("channels:0.5") == ("channels", 0.5)
    assert parse_prune(" Magnitude:0.75 ") == ("magnitude", 0.75)
    assert parse_prune(0.5) == ("magnitude", 0.5) and parse_prune("0.3") == ("magnitude", 0.3)  # keras meaning
    assert parse_prune(None) is None
    assert ExportConfig.of(prune="channels:0.50").validate().compression.prune == "channels:0.5"
    assert ExportConfig.of(prune=0.5).validate().compression.prune == 0.5  # keras checkpoints keep their float
    assert variant_tag("channels:0.5", True, "int8") == "-ch50-qat"
    assert variant_tag("channels:0.5", True, "fp32") == "-ch50"  # QAT shapes the int8 file only
    assert variant_tag("magnitude:0.8", False, "int8") == "-pruned80"  # the keras backend's name for it
    assert variant_tag(0.5, False, "fp32") == "-pruned50"
    assert variant_tag("channels:0.375", False, "int8") == "-ch37p5"
    assert variant_tag(None, False, "int8") == ""


@pytest.mark.parametrize("spec, needle", [
    ("channels:1", "not a usable fraction"), ("channels:0", "not a usable fraction"),
    ("magnitude:-0.2", "not a usable fraction"), ("1.5", "not a usable fraction"),
    ("chanels:0.5", "unknown form"), ("channels:half", "unknown form"), ("channels", "unknown form"),
])
def test_bad_prune_specs_are_user_errors(spec: str, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        resolve_config(None, prune=spec)


def test_qat_without_int8_and_channels_on_keras_are_refused() -> None:
    with pytest.raises(UserError, match="add int8"):
        resolve_config(None, quant="fp32", qat=True)
    with pytest.raises(UserError, match="channel pruning is torch-only.*magnitude:0.5"):
        resolve_config(None, prune="channels:0.5").for_backend("keras")
    resolve_config(None, prune="magnitude:0.5", qat=True).for_backend("torch")  # accepted
    with pytest.raises(UserError, match=r"--distill 1.5 is not usable; valid: 0 \(labels only\) to 1"):
        resolve_config(None, prune="channels:0.5", distill=1.5)
    with pytest.raises(UserError, match="--distill 0.5: torch-only"):
        resolve_config(None, prune="magnitude:0.5", distill=0.5).for_backend("keras")


def test_the_capability_table_decides_what_each_backend_is_asked() -> None:
    """Options a backend lacks are refused in one line naming it; the ones it has pass untouched."""
    keras = ExportConfig.of(prune=0.5, qat=True, quant=("fp32", "int8"), recovery_epochs=3, qat_epochs=4,
                         recovery_lr=1e-3, qat_lr=2e-4, tune_images=100).for_backend("keras")
    assert keras.quantization.formats == ("tflite",)  # .pte dropped
    assert (keras.compression.recovery_epochs, keras.policy.qat_epochs) == (3, 4)
    for options, needle in (({"fuse_clamp": False}, "fuse_clamp = false: torch-only"),
                            ({"formats": ("pte",)}, "--formats pte: a keras checkpoint exports to .tflite only"),
                            ({"quant": ("int8",), "bias_correction": False}, "--no-bias-correction: torch-only")):
        with pytest.raises(UserError, match=needle):
            ExportConfig.of(**options).for_backend("keras")
    with pytest.raises(UserError, match="--quant fp16, --quant dynamic: keras-only; this checkpoint's framework is "
                                        "torch"):
        ExportConfig.of(quant=("fp16", "int8", "dynamic")).for_backend("torch")
    with pytest.raises(UserError, match="checkpoint framework 'onnx' has no export backend; valid: torch, keras"):
        ExportConfig.of().for_backend("onnx")


def test_bad_specs_on_the_command_line_exit_2_with_one_line(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path)
    for spec, needles in (("1.0", ("--prune 1.0", "channels:R")), ("channels:0", ("channels:0", "0 < R")),
                          ("rows:0.5", ("rows:0.5", "unknown form", "magnitude:S"))):
        _assert_one_line_error(run_cli("export", str(checkpoint), "--prune", spec), *needles)
    _assert_one_line_error(run_cli("export", str(checkpoint), "--prune", "channels:0.5", "--distill", "2"),
                           "--distill 2", "valid: 0 (labels only) to 1")


def test_qat_or_pruning_without_reachable_training_images_exit_2(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path)
    for image in (tmp_path / "data").glob("*/train-*.png"):
        image.unlink()
    for flags in (["--qat"], ["--prune", "channels:0.5"]):
        result = run_cli("export", str(checkpoint), *flags, "--out", str(tmp_path / "export"))
        _assert_one_line_error(result, flags[0], "training images", str(tmp_path / "data"))
        assert not (tmp_path / "export").exists()
    keras = tmp_path / "keras"
    shutil.copytree(checkpoint, keras)
    manifest = json.loads((keras / "manifest.json").read_text())
    (keras / "manifest.json").write_text(json.dumps({**manifest, "framework": "keras"}))
    _assert_one_line_error(run_cli("export", str(keras), "--prune", "channels:0.5"), "torch-only", "keras")


# ---------------------------------------------------------------- the torch pieces

torch_only = pytest.mark.torch


def _listing_and_spec(checkpoint: Path) -> tuple:
    from edgetl.export import load_listing
    from edgetl.manifest import read_checkpoint

    manifest = read_checkpoint(checkpoint)
    return manifest, load_listing(checkpoint, manifest), manifest.preprocess.with_layout("NCHW")


@torch_only
@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "mobilenet_v3_small"])
def test_channel_pruning_removes_params_and_macs_and_keeps_depthwise_coupling(backbone: str,
                                                                              tiny_checkpoint: Path) -> None:
    import torch
    from torch import nn

    from edgetl.backends.torch.models import build_model
    from edgetl.backends.torch.prune import prune_channels
    from edgetl.backends.torch.recovery import Tune

    manifest, listing, spec = _listing_and_spec(tiny_checkpoint)
    torch.manual_seed(0)
    model = build_model(backbone, 1.0, 3).eval()
    first = [m.out_channels for stage in model.stages()[:2] for m in stage.modules() if isinstance(m, nn.Conv2d)]
    pruned, info = prune_channels(model, 0.5, 3, listing, spec, Tune(epochs=1, lr=1e-3, batch_size=32))
    # the stem and the first block keep every channel; the rest lose half
    assert [m.out_channels for stage in pruned.stages()[:2] for m in stage.modules()
            if isinstance(m, nn.Conv2d)] == first
    assert info["params_after"] < 0.4 * info["params_before"]
    assert info["macs_after"] < 0.45 * info["macs_before"]  # both sides of most convs halve: ~4x, never < 2x
    assert sum(b["macs_after"] for b in info["blocks"]) < sum(b["macs_before"] for b in info["blocks"])
    assert all(b["params_after"] <= b["params_before"] for b in info["blocks"]) and len(info["blocks"]) > 10
    # builtin:shapes trains on 96 images plus its 12 carved validation images (too few to rank models)
    assert info["recovery"]["steps"] >= 1 and info["recovery"]["train_images"] == 108
    for module in pruned.modules():
        if isinstance(module, nn.Conv2d) and module.groups > 1:  # depthwise: one filter per remaining channel
            assert module.groups == module.in_channels == module.out_channels
    x = torch.randn(2, 3, 32, 32)
    assert pruned(x).shape == (2, 3)
    exported = torch.export.export(pruned, (x,))  # the graph the exporters start from
    torch.testing.assert_close(exported.module()(x), pruned(x))


@torch_only
def test_distillation_loss_is_hintons_and_replaces_the_labels_when_weighted_1(tiny_checkpoint: Path) -> None:
    import torch

    from edgetl.backends.torch.export import load_model
    from edgetl.backends.torch.recovery import Tune, distillation_loss, fit

    teacher_logits = torch.tensor([[4.0, 0.0, -2.0], [0.5, 0.5, 3.0]])
    student_logits = torch.tensor([[0.0, 1.0, 0.0], [2.0, -1.0, 0.0]], requires_grad=True)
    teacher = torch.nn.Identity()  # the "teacher" of these logits: returns them as they are
    loss = distillation_loss(student_logits, teacher, teacher_logits, 4.0)
    p = torch.softmax(teacher_logits / 4, 1)
    expected = (p * (p.log() - torch.log_softmax(student_logits / 4, 1))).sum(1).mean() * 16
    torch.testing.assert_close(loss, expected)
    assert float(distillation_loss(teacher_logits, teacher, teacher_logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
    loss.backward()  # one gradient step moves the student's distribution towards the teacher's
    with torch.no_grad():
        stepped = student_logits - 0.5 * student_logits.grad
        assert float(distillation_loss(stepped, teacher, teacher_logits, 4.0)) < float(loss)

    # In training: with weight 1 the loss is the distance to the teacher alone. A teacher identical to the
    # student leaves almost nothing to learn (dropout aside), where the labels' cross-entropy is large.
    manifest, listing, spec = _listing_and_spec(tiny_checkpoint)
    losses = {}
    for weight in (0.0, 1.0):
        student, twin = load_model(tiny_checkpoint, manifest), load_model(tiny_checkpoint, manifest)
        record = fit(student, listing, spec, Tune(epochs=1, lr=1e-9, batch_size=32, distill=weight), "kd", teacher=twin)
        losses[weight] = record["history"][0]["train_loss"]
        assert record["distill"] == weight and record["temperature"] == 4.0
    assert losses[0.0] > 0.5 and losses[1.0] < 0.1 * losses[0.0]


@torch_only
def test_magnitude_pruning_reaches_its_sparsity_per_layer_while_training(tiny_checkpoint: Path) -> None:
    import torch
    from torch import nn

    from edgetl.backends.torch.export import load_model
    from edgetl.backends.torch.prune import prune_magnitude
    from edgetl.backends.torch.recovery import Tune

    manifest, listing, spec = _listing_and_spec(tiny_checkpoint)
    model = load_model(tiny_checkpoint, manifest)
    before = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruned, info = prune_magnitude(model, 0.6, listing, spec, Tune(epochs=3, lr=1e-3, batch_size=32))
    assert not any(name.endswith("_orig") for name, _ in pruned.named_parameters())  # masks made permanent
    prunable = [row for row in info["layers"] if row["prunable"]]
    assert prunable and all(row["sparsity"] >= 0.6 - 0.01 for row in prunable)
    assert all(row["sparsity"] < 0.2 for row in info["layers"] if row["type"] == "depthwise")
    assert info["sparsity_prunable"] >= 0.59 and len(info["schedule"]["updates"]) >= 3
    levels = [u["sparsity"] for u in info["schedule"]["updates"]]
    assert levels == sorted(levels) and levels[-1] == pytest.approx(0.6, abs=1e-3)  # a ramp, not a jump
    # the surviving weights were trained after pruning began (the optimiser kept the live tensors)
    name = next(row["layer"] for row in prunable if row["type"] == "Conv2d")
    weight = pruned.get_submodule(name).weight.detach()
    kept = weight != 0
    assert not torch.allclose(weight[kept], before[name][kept])
    assert pruned(torch.randn(1, 3, 32, 32)).shape == (1, 3)


# ---------------------------------------------------------------- exports verified in their runtimes


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _check_verified(out: Path, names: list[str]) -> dict[str, dict]:
    manifest = _manifest(out)
    assert sorted(a["file"] for a in manifest["artifacts"]) == sorted(names)
    assert all(a["status"] == "ok" for a in manifest["artifacts"]), manifest["artifacts"]
    sidecars = {}
    for name in names:
        sidecar = json.loads((out / f"{name}.json").read_text())
        assert sidecar["verification"]["status"] == "ok" and sidecar["bytes"] == (out / name).stat().st_size
        assert 0 < sidecar["gzip_bytes"] < sidecar["bytes"]
        sidecars[name] = sidecar
    return sidecars


@torch_only
def test_channel_pruned_qat_int8_exports_verified_in_both_runtimes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("executorch")
    pytest.importorskip("litert_torch")
    import torch
    import torch_pruning as tp

    from edgetl.backends.torch.models import build_model

    out = tmp_path / "export"
    result = run_cli("export", str(tiny_checkpoint), "--quant", "int8", "--prune", "channels:0.5", "--qat",
                     "--recovery-epochs", "2", "--qat-epochs", "1", "--calib", "32", "--max-drop", "100",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    names = [f"{PREFIX}int8-ch50-qat.tflite", f"{PREFIX}int8-ch50-qat.pte"]
    sidecars = _check_verified(out, names)
    assert "int8: .tflite and .pte agree" in result.stdout
    assert "pruned float model" in result.stdout  # what the drops are measured against, named
    manifest = _manifest(out)
    pruning, quantization = manifest["pruning"], manifest["quantization"]
    assert manifest["config"]["compression"]["prune"] == "channels:0.5" and manifest["config"]["policy"]["qat"] is True
    assert pruning["method"] == "channels" and pruning["macs_after"] < 0.5 * pruning["macs_before"]
    assert pruning["params_after"] < 0.5 * pruning["params_before"]
    assert len(pruning["recovery"]["history"]) == 2 and manifest["float_reference"]["model"].startswith("pruned")
    assert pruning["recovery"]["distill"] == 0.9 and pruning["recovery"]["temperature"] == 4.0  # the default
    assert quantization["qat"]["distill"] == 0.0
    assert quantization["method"] == "pt2e-qat" and quantization["qat"]["epochs"] == 1
    assert quantization["qat"]["train_images"] == 108 and quantization["qat"]["seconds"] > 0
    tflite = sidecars[names[0]]
    assert tflite["input"]["dtype"] == "int8" and tflite["pruning"]["spec"] == "channels:0.5"
    assert sidecars[names[1]]["delegation"]["compute_ops_outside"] == []
    # the pruned float model is in the folder and rebuilds with torch-pruning
    model = build_model("mobilenet_v2", 0.35, 3)
    tp.load_state_dict(model, torch.load(out / pruning["model_file"], weights_only=False))
    assert sum(p.numel() for p in model.parameters()) == pruning["params_after"]
    reference = np.load(out / "float_reference.npz")["logits"]
    x = torch.from_numpy(np.load(out / "test_inputs.npz")["x"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        np.testing.assert_allclose(model.eval()(x).numpy(), reference, atol=1e-4)


@torch_only
@pytest.mark.slow
def test_pruned_files_are_smaller_than_dense_ones(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Dense int8 vs 50% channels (smaller file) vs 80% magnitude (same file size, smaller gzip)."""
    from edgetl.export import run_export

    common = {"quant": ("fp32", "int8"), "calib": 32, "max_drop": 100, "recovery_epochs": 2}
    dense = run_export(tiny_checkpoint, ExportConfig.of(**common), tmp_path / "dense")
    channels = run_export(tiny_checkpoint, ExportConfig.of(prune="channels:0.5", **common), tmp_path / "ch")
    sparse = run_export(tiny_checkpoint, ExportConfig.of(prune="magnitude:0.8", **common), tmp_path / "sp")
    names = {key: [f"{PREFIX}{q}{tag}.{fmt}" for q in ("fp32", "int8") for fmt in ("tflite", "pte")]
             for key, tag in (("dense", ""), ("ch", "-ch50"), ("sp", "-pruned80"))}
    meta = {key: _check_verified(folder, names[key]) for key, folder in (("dense", dense), ("ch", channels),
                                                                          ("sp", sparse))}
    for d, c, s in zip(*(meta[key].values() for key in ("dense", "ch", "sp")), strict=True):
        assert c["bytes"] < 0.6 * d["bytes"], c["file"]
        assert abs(s["bytes"] - d["bytes"]) < 0.02 * d["bytes"], s["file"]  # zeros are still stored
        assert s["gzip_bytes"] < 0.75 * d["gzip_bytes"], s["file"]
    pruning = _manifest(sparse)["pruning"]
    assert all(row["sparsity"] >= 0.79 for row in pruning["layers"] if row["prunable"])
