"""Produces `timm_mobilenet_v4.json`: the state-dict names and shapes of timm's MobileNetV4 conv models, their
pretrained configs, and the logits of one seeded forward pass, which `tests/test_mobilenet_v4.py` checks edgetl's
definitions against without timm installed.

    pip download timm==1.0.31 --no-deps -d /tmp/timm && unzip -q /tmp/timm/timm-1.0.31-py3-none-any.whl -d /tmp/timm/src
    python tests/reference/timm_mobilenet_v4.py /tmp/timm/src

timm imports torchvision for its data transforms only, and torchvision does not import beside the pinned torch
here: the modules it touches are replaced by empty stand-ins before timm is imported. The models do not use them.
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import torch

VARIANTS = ("mobilenetv4_conv_small", "mobilenetv4_conv_medium")
WEIGHTS = {"mobilenetv4_conv_small": "e2400_r224_in1k", "mobilenetv4_conv_medium": "e500_r224_in1k"}
FORWARD_SIDE = 64
SEED = 0
OUT = Path(__file__).with_name("timm_mobilenet_v4.json")


class _Absent(types.ModuleType):
    """A torchvision module that only has to exist: any attribute is an inert class."""

    def __getattr__(self, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)

        class Inert(type):
            def __getattr__(cls, attr: str) -> str:
                if attr.startswith("__"):
                    raise AttributeError(attr)
                return f"{name}.{attr}"

        return Inert(name, (), {"__init__": lambda self, *args, **kwargs: None})


def _stand_in_torchvision() -> None:
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional", "torchvision.ops", "torchvision.ops.misc", "torchvision.models",
             "torchvision.models._utils", "torchvision.models.feature_extraction", "torchvision.datasets",
             "torchvision.io", "torchvision.utils", "torchvision.transforms.functional_tensor")
    for name in names:
        module = _Absent(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__path__ = []
        sys.modules[name] = module
    for name in names[1:]:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[name])
    modes = {"NEAREST": 0, "LANCZOS": 1, "BILINEAR": 2, "BICUBIC": 3, "BOX": 4, "HAMMING": 5}
    sys.modules["torchvision.transforms"].InterpolationMode = type("InterpolationMode", (), modes)


def seeded_state(state: dict[str, torch.Tensor], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Values for every tensor, drawn in key order from one seeded generator: the same values for any model with
    these names and shapes. Variances are kept positive and every value small, so the logits stay finite."""
    generator = torch.Generator().manual_seed(seed)
    filled = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            filled[name] = tensor.clone()
        elif name.endswith("running_var"):
            filled[name] = torch.rand(tensor.shape, generator=generator) + 0.5
        else:
            filled[name] = torch.randn(tensor.shape, generator=generator) * 0.1
    return filled


def seeded_input(side: int = FORWARD_SIDE, seed: int = SEED) -> torch.Tensor:
    return torch.randn((1, 3, side, side), generator=torch.Generator().manual_seed(seed + 1))


def main(timm_source: str) -> None:
    sys.path.insert(0, timm_source)
    _stand_in_torchvision()
    import timm

    record = {"timm": timm.__version__, "torch": torch.__version__, "forward_side": FORWARD_SIDE, "seed": SEED,
              "models": {}}
    for variant in VARIANTS:
        model = timm.create_model(f"{variant}.{WEIGHTS[variant]}", pretrained=False).eval()
        state = seeded_state(model.state_dict())
        model.load_state_dict(state)
        with torch.no_grad():
            logits = model(seeded_input())[0]
        config = model.pretrained_cfg
        record["models"][variant] = {
            "hf_hub_id": config["hf_hub_id"], "mean": list(config["mean"]), "std": list(config["std"]),
            "input_size": list(config["input_size"]), "interpolation": config["interpolation"],
            "state_dict": {name: list(tensor.shape) for name, tensor in state.items()},
            "logits": [round(float(v), 6) for v in logits],
        }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/timm/src")
