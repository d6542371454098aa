"""Keras backend fine-tuning on tiny runs: same checkpoint folder and manifest as torch, ImageNet weights
found in a temporary Keras cache without network, a repeatable CPU run, and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from edgetl.backbones import get_backbone
from edgetl.config import FinetuneConfig
from edgetl.errors import UserError
from edgetl.finetune import run_finetune
from edgetl.manifest import read_checkpoint_manifest, sha256_file
from tests.conftest import run_cli

pytestmark = pytest.mark.keras
pytest.importorskip("tf_keras")

TINY = {"framework": "keras", "backbone": "mobilenet_v2", "width": 0.35, "image_size": 32, "epochs_finetune": 1,
        "unfreeze": 2, "batch_size": 32}


def place_fake_imagenet_file(keras_home: Path, backbone: str, width: float, size: int) -> Path:
    """A randomly initialised no-top application saved under the exact name keras.applications looks for."""
    import edgetl.backends.keras  # noqa: F401 - sets TF_USE_LEGACY_KERAS before TensorFlow loads
    from edgetl.backends.keras.models import build_backbone

    source = get_backbone(backbone).keras_weight_source(width, size)
    target = keras_home / "models" / source.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    build_backbone(get_backbone(backbone), width, size).save_weights(str(target))
    return target


@pytest.fixture(scope="module")
def keras_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("keras-home")
    place_fake_imagenet_file(home, "mobilenet_v2", 0.35, 32)
    return home


@pytest.fixture(scope="module")
def keras_run(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path, keras_home: Path) -> Path:
    """One run on builtin:shapes with --weights imagenet served from the temporary Keras cache."""
    os.environ["EDGETL_CACHE"] = str(shared_cache)
    os.environ["KERAS_HOME"] = str(keras_home)
    run = tmp_path_factory.mktemp("keras-run")
    run_finetune(FinetuneConfig.of(data="builtin:shapes", seed=3, **TINY), run)
    return run / "checkpoint"


def test_keras_checkpoint_has_the_common_manifest(keras_run: Path, keras_home: Path) -> None:
    manifest = read_checkpoint_manifest(keras_run)
    assert manifest["framework"] == "keras" and manifest["weights_file"] == "model.weights.h5"
    assert manifest["weights_sha256"] == sha256_file(keras_run / "model.weights.h5")
    assert manifest["model"]["num_classes"] == 3 and manifest["model"]["feature_dim"] == 1280
    preprocess = manifest["preprocess"]
    assert preprocess["layout"] == "NHWC" and preprocess["mean"] == [0.5] * 3 and preprocess["std"] == [0.5] * 3
    init = manifest["init_weights"]
    assert init["kind"] == "imagenet" and init["source"].startswith("Keras cache (")  # not "downloaded from"
    assert init["path"].startswith(str(keras_home))  # found in the cache: no download was attempted
    assert {"tensorflow", "tf-keras", "numpy"} <= set(manifest["versions"])
    history = json.loads((keras_run / "history.json").read_text())
    assert {entry["stage"] for entry in history} == {1, 2}
    assert manifest["training"]["stage1"]["converged"] is True
    best = manifest["training"]["best"]
    assert best["rule"] == "end_of_schedule_only" and (best["stage"], best["epoch"]) == (2, 1)  # val trains too
    for split in ("val", "test"):
        figures = manifest["metrics"][split]
        assert sum(map(sum, figures["confusion_matrix"])) == figures["images"]
    assert (keras_run / "labels.txt").read_text().split() == ["circle", "square", "triangle"]


def test_keras_stage2_unfreezes_top_blocks_with_batchnorm_frozen() -> None:
    from edgetl.backends.keras import models  # sets TF_USE_LEGACY_KERAS before TensorFlow loads

    keras = models.keras
    model = models.build_classifier("mobilenet_v2", 0.35, 32, 3)
    groups = models.stages(model)
    assert len(groups) == 19  # stem, 17 inverted residual blocks, last 1x1 conv: the torch backend's stages
    assert models.set_trainable(model, 2) == 2
    trainable = {layer.name for layer in model.layers if layer.trainable and layer.weights}
    assert trainable == {"Conv_1", "block_16_expand", "block_16_depthwise", "block_16_project", "logits"}
    assert not any(layer.trainable for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))


def test_keras_same_seed_same_weights(keras_run: Path, tmp_path: Path, keras_home: Path, monkeypatch) -> None:
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    again = run_finetune(FinetuneConfig.of(data="builtin:shapes", seed=3, **TINY), tmp_path / "again")
    assert sha256_file(again / "model.weights.h5") == sha256_file(keras_run / "model.weights.h5")
    first = json.loads((keras_run / "history.json").read_text())
    second = json.loads((again / "history.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if "second" not in k and "per_s" not in k} for r in rows]  # noqa: E731
    assert strip(first) == strip(second)


def test_keras_config_errors_are_one_line_before_training() -> None:
    with pytest.raises(UserError, match="efficientnet_lite0 is torch-only"):
        FinetuneConfig.of(data="builtin:shapes", framework="keras", backbone="efficientnet_lite0").validate()
    config = FinetuneConfig.of(data="x", framework="keras", backbone="mobilenet_v3_small").validate()
    assert config.model.image_size is None  # decided from the folder (edgetl.recipe); 224 checked for weights meanwhile
    source = get_backbone("mobilenet_v2").keras_weight_source(0.5, 100)
    assert source.filename == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
    assert get_backbone("mobilenet_v2").keras_weight_source(1.0, 96).filename.endswith("_1.0_96_no_top.h5")


def test_keras_weights_file_that_does_not_fit(tmp_path: Path, keras_home: Path) -> None:
    wrong = place_fake_imagenet_file(tmp_path, "mobilenet_v3_small", 1.0, 32)
    result = run_cli("finetune", "--data", "builtin:shapes", "--framework", "keras", "--backbone", "mobilenet_v2",
                     "--width", "0.35", "--image-size", "32", "--weights", str(wrong))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not fit keras MobileNetV2" in lines[0], result.stderr


def test_missing_imagenet_file_offline_names_the_cache(tmp_path: Path) -> None:
    from edgetl.backends.keras import models

    os.environ["KERAS_HOME"] = str(tmp_path / "empty-home")
    try:
        with pytest.raises(UserError, match="place mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top"):
            models.resolve_imagenet_file(get_backbone("mobilenet_v2"), 0.35, 32)
    finally:
        os.environ.pop("KERAS_HOME", None)


def test_keras_model_files_are_weights_only_and_reload(keras_run: Path) -> None:
    from edgetl.backends.keras import models

    manifest = read_checkpoint_manifest(keras_run)
    model = models.build_classifier("mobilenet_v2", 0.35, 32, 3)
    model.load_weights(str(keras_run / "model.weights.h5"))
    x = np.zeros((1, 32, 32, 3), np.float32)
    assert model(x).shape == (1, manifest["model"]["num_classes"])
