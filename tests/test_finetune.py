"""The fine-tuning stage end to end on small real runs: checkpoint contents, figures, reproducibility,
bad files skipped and recorded, and never a half-written checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from edgetl.config import FinetuneConfig
from edgetl.datasets import resolve_builtin
from edgetl.errors import UserError
from edgetl.finetune import run_finetune
from edgetl.manifest import read_checkpoint_manifest, sha256_file

FAST = {"backbone": "efficientnet_lite0", "image_size": 48, "epochs_finetune": 1, "unfreeze": 1,
        "batch_size": 32}


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    """One pretrained run on builtin:shapes with a corrupt and a truncated file added, shared by tests."""
    import os

    os.environ["EDGETL_CACHE"] = str(shared_cache)
    data = tmp_path_factory.mktemp("data") / "shapes"
    shutil.copytree(resolve_builtin("builtin:shapes"), data)
    (data / "circle" / "broken.png").write_bytes(b"\x89PNG not really")
    good = (data / "square" / "0001.png").read_bytes()
    (data / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    run = tmp_path_factory.mktemp("run")
    os.environ["TORCH_HOME"] = str(tmp_path_factory.mktemp("torch-home"))
    run_finetune(FinetuneConfig.of(data=str(data), seed=1, **FAST), run)
    return run / "checkpoint"


def test_checkpoint_folder_is_complete_and_described(shapes_run: Path) -> None:
    manifest = read_checkpoint_manifest(shapes_run)
    assert (shapes_run / "labels.txt").read_text().split() == ["circle", "square", "triangle"]
    assert manifest["framework"] == "torch" and manifest["model"]["num_classes"] == 3
    assert manifest["weights_sha256"] == sha256_file(shapes_run / "model.pt")
    assert manifest["preprocess"]["resize"] == {"height": 48, "width": 48, "method": "bilinear", "keep_aspect": False}
    assert manifest["init_weights"]["kind"] == "imagenet"
    assert set(manifest["versions"]) >= {"torch", "edgetl", "numpy"}
    figures = manifest["metrics"]["test"]
    assert 0.0 <= figures["top1"] <= 1.0 and figures["top1_ci95"][0] <= figures["top1"] <= figures["top1_ci95"][1]
    assert len(figures["confusion_matrix"]) == 3
    assert sum(map(sum, figures["confusion_matrix"])) == figures["images"] == 12
    assert set(figures["per_class_top1"]) == {"circle", "square", "triangle"}
    # builtin:shapes would carve 12 validation images: too few to rank models, so they train instead
    assert manifest["metrics"]["val"]["images"] == 0 and manifest["metrics"]["val"]["top1"] is None
    assert manifest["data"]["counts"]["train"] == {"circle": 36, "square": 36, "triangle": 36}
    assert manifest["recipe"]["choices"]["validation"]["source"] == "auto"
    assert manifest["metrics"]["test"]["top1"] >= 0.75  # pretrained features separate shapes easily
    history = json.loads((shapes_run / "history.json").read_text())
    assert {entry["stage"] for entry in history} == {1, 2}
    assert manifest["training"]["stage1"]["converged"] is True
    best = manifest["training"]["best"]
    assert best["rule"] == "end_of_schedule_only" and (best["stage"], best["epoch"]) == (2, 1)


def test_bad_files_are_skipped_counted_and_listed(shapes_run: Path) -> None:
    manifest = read_checkpoint_manifest(shapes_run)
    skipped = {entry["path"]: entry["reason"] for entry in manifest["data"]["skipped"]}
    assert "circle/broken.png" in skipped  # caught by the header probe
    assert "square/truncated.png" in skipped  # caught at decode time
    assert manifest["data"]["skipped_count"] == len(skipped) == 2
    splits = json.loads((shapes_run / "splits.json").read_text())["splits"]
    assert not {p for records in splits.values() for p, _ in records} & set(skipped)


def test_same_seed_gives_the_same_weights_on_cpu(tmp_path: Path) -> None:
    config = FinetuneConfig.of(data="builtin:shapes", seed=5, **FAST)
    first = run_finetune(config, tmp_path / "a")
    second = run_finetune(config, tmp_path / "b")
    assert sha256_file(first / "model.pt") == sha256_file(second / "model.pt")
    strip = [{k: v for k, v in e.items() if "second" not in k and "per_s" not in k}
             for e in json.loads((first / "history.json").read_text())]
    assert strip == [{k: v for k, v in e.items() if "second" not in k and "per_s" not in k}
                     for e in json.loads((second / "history.json").read_text())]


def test_interrupted_run_leaves_no_checkpoint_and_keeps_the_old_one(tmp_path: Path, monkeypatch) -> None:
    from edgetl.backends.torch import finetune as backend

    config = FinetuneConfig.of(data="builtin:shapes", **{**FAST, "epochs_finetune": 0})
    run = tmp_path / "run"
    checkpoint = run_finetune(config, run)
    before = sha256_file(checkpoint / "model.pt")

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(backend, "save_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_finetune(config, run)
    assert sha256_file(checkpoint / "model.pt") == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]  # no temporary folder left behind


def test_checkpoint_reader_rejects_incomplete_and_unknown_versions(shapes_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "checkpoint"
    shutil.copytree(shapes_run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(UserError, match="schema_version 99"):
        read_checkpoint_manifest(copy)
    (copy / "labels.txt").unlink()
    with pytest.raises(UserError, match="missing labels.txt"):
        read_checkpoint_manifest(copy)
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint_manifest(tmp_path / "nope")


def test_grayscale_folder_trains_as_rgb(tmp_path: Path) -> None:
    for name, value in (("dark", 30), ("light", 220)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(8):
            Image.new("L", (20, 20), value + i).save(tmp_path / "data" / name / f"{i}.bmp")
    checkpoint = run_finetune(
        FinetuneConfig.of(data=str(tmp_path / "data"), **{**FAST, "image_size": 32, "epochs_finetune": 0}),
        tmp_path / "run",
    )
    assert read_checkpoint_manifest(checkpoint)["data"]["counts"]["test"] == {"dark": 1, "light": 1}


def test_random_init_backbone_gets_batchnorm_statistics_from_the_data(tmp_path: Path) -> None:
    """From-scratch runs must not freeze the meaningless init statistics (mean 0, var 1) of BN layers."""
    import torch

    from edgetl.backends.torch.finetune import ImageRecords, _loader, estimate_batchnorm_statistics
    from edgetl.backends.torch.models import build_model
    from edgetl.data import preprocess_spec, scan_folder

    listing = scan_folder(resolve_builtin("builtin:shapes"))
    spec = preprocess_spec(32, (0.5,) * 3, (0.5,) * 3)
    loader = _loader(ImageRecords(listing.root, listing.splits["train"], spec), 16, 0, True, 0)
    model = build_model("mobilenet_v3_small").eval()
    seen = estimate_batchnorm_statistics(model, loader, torch.device("cpu"), max_images=48)
    assert seen >= 48 and not model.training
    first_bn = model.features[0][1]
    assert float(first_bn.running_var.mean()) != pytest.approx(1.0, abs=1e-3)
    assert first_bn.momentum == pytest.approx(0.01)  # restored after the cumulative pass
    images = torch.stack([ImageRecords(listing.root, listing.splits["val"], spec)[i][0] for i in range(6)])
    with torch.inference_mode():
        features = model.forward_features(images)
    assert float(features.std(0).mean()) > 1e-3  # features differ between images


def test_a_from_scratch_checkpoint_keeps_the_batchnorm_statistics_of_its_own_weights(tmp_path: Path) -> None:
    """A from-scratch stage 2 trains BN in batch mode; MobileNetV3's running averages (momentum 0.01) lag weights that
    move, and MobileNetV3-Large validated as one class (val loss 22) with them. Before each validation the trainer
    estimates them again, so the kept model's statistics are those of the training images under its own weights."""
    import torch

    from edgetl.backends.torch.export import load_model
    from edgetl.backends.torch.finetune import BN_ESTIMATE_IMAGES, ImageRecords, _loader, estimate_batchnorm_statistics
    from edgetl.export import load_listing
    from edgetl.manifest import read_checkpoint

    config = FinetuneConfig.of(data="builtin:shapes", backbone="mobilenet_v3_small", weights="none", image_size=32,
                               epochs_finetune=2, unfreeze=-1, batch_size=16, lr_finetune=3e-2, seed=0)
    checkpoint = run_finetune(config, tmp_path / "run")
    manifest = read_checkpoint_manifest(checkpoint)
    assert manifest["training"]["best"]["stage"] == 2  # the statistics of trained weights, not of the initial ones
    assert "before every validation" in manifest["init_weights"]["batchnorm_before_validation"]
    typed = read_checkpoint(checkpoint)
    kept = load_model(checkpoint, typed)
    layers = {name: module for name, module in kept.named_modules() if isinstance(module, torch.nn.BatchNorm2d)}
    saved = {name: module.running_mean.clone() for name, module in layers.items()}

    listing = load_listing(checkpoint, typed)
    loader = _loader(ImageRecords(listing.root, listing.splits["train"], typed.preprocess.with_layout("NCHW")),
                     16, 0, True, 0)
    estimate_batchnorm_statistics(kept, loader, torch.device("cpu"), BN_ESTIMATE_IMAGES)
    for name, module in layers.items():
        torch.testing.assert_close(saved[name], module.running_mean, rtol=1e-4, atol=1e-5, msg=name)


def test_the_console_skipped_count_is_the_manifests(tmp_path: Path) -> None:
    """Files that fail only at full decode (a truncated PNG passes the header check) are added to the
    listing's skips during training; the closing line counts them all, as the manifest does."""
    import re

    from tests.conftest import run_cli

    data = tmp_path / "shapes"
    shutil.copytree(resolve_builtin("builtin:shapes"), data)
    (data / "circle" / "broken.png").write_bytes(b"\x89PNG not really")
    good = (data / "square" / "0001.png").read_bytes()
    (data / "square" / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "triangle" / ".DS_Store").write_bytes(b"finder")
    result = run_cli("finetune", "--data", str(data), "--backbone", "mobilenet_v2", "--width", "0.35",
                     "--weights", "none", "--image-size", "32", "--epochs-finetune", "0",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "checkpoint" / "manifest.json").read_text())
    reasons = {entry["path"]: entry["reason"] for entry in manifest["data"]["skipped"]}
    assert set(reasons) == {"circle/broken.png", "square/truncated.png"}
    assert manifest["data"]["ignored"] == [{"path": "triangle/.DS_Store", "reason": "hidden file"}]
    assert manifest["data"]["warnings"] == []
    said = re.findall(r"skipped (\d+) file\(s\) in all", result.stdout + result.stderr)
    assert said == [str(manifest["data"]["skipped_count"])] == ["2"]
    final = re.findall(r"images used: train (\d+), val (\d+), test (\d+)", " ".join(result.stdout.split()))
    assert final == [tuple(str(sum(manifest["data"]["counts"][split].values())) for split in ("train", "val", "test"))]


def test_a_relative_data_folder_is_found_from_any_directory(tmp_path: Path, monkeypatch) -> None:
    """The checkpoint records the data folder absolute (export may run elsewhere) and what the user typed."""
    from edgetl.data import DatasetListing
    from edgetl.finetune import load_listing

    shutil.copytree(resolve_builtin("builtin:shapes"), tmp_path / "work" / "plain")
    monkeypatch.chdir(tmp_path / "work")
    listing = load_listing(FinetuneConfig.of(data="plain"))
    assert listing.source == "plain" and listing.root == tmp_path / "work" / "plain"
    monkeypatch.chdir(tmp_path)
    assert DatasetListing.from_json(json.loads(json.dumps(listing.to_json()))).root.is_dir()


def test_a_last_training_batch_of_one_image_does_not_stop_batchnorm(tmp_path: Path) -> None:
    """From scratch at 32 px MobileNetV2 ends at a 1x1 feature map: a batch of one image has one value per channel,
    which BatchNorm cannot train on. 3 x 12 images give 30 training images; with batches of 29 the last is one."""
    for index, name in enumerate(("a", "b", "c")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (24, 24), (80 * index, 7 * i, 120)).save(tmp_path / "data" / name / f"{i}.png")
    from edgetl.finetune import load_listing

    # the statistics pass of a from-scratch backbone at the default batch, then stage 2 with a lone last image
    for epochs, short in ((0, False), (2, True)):
        config = FinetuneConfig.of(data=str(tmp_path / "data"), backbone="mobilenet_v2", width=0.35, weights="none",
                                image_size=32, epochs_finetune=epochs, unfreeze=-1, seed=0)
        train = len(load_listing(config).splits["train"])
        for batch in ((train - 1,) if short else (None,)):
            run = tmp_path / f"run-{epochs}-{batch}"
            checkpoint = run_finetune(config.with_(batch_size=batch), run)
            history = json.loads((checkpoint / "history.json").read_text())
            assert bool([entry for entry in history if entry.get("stage") == 2]) == bool(epochs), history
