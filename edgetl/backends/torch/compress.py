"""What `edgetl export` asks of the torch backend when it compresses: prune, then QAT or PTQ.

`edgetl.export` calls `prune_model` (channels or magnitude, each with its short fine-tune) once, and hands
the pruned model to `export.build_graphs` (PTQ) or to `qat_graphs` here; the pruned model exists only in
memory, so `save_pruned` writes it into the export folder for reproducibility.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from edgetl import data
from edgetl.backends.torch.export import ChannelsLastInput, Graphs, _first_input_qparams, load_model
from edgetl.backends.torch.prune import prune_channels, prune_magnitude
from edgetl.backends.torch.prune import save_pruned as _save
from edgetl.backends.torch.qat import quantize_qat
from edgetl.backends.torch.recovery import Tune

# Learning rates of the short fine-tunes (AdamW, warm-up + cosine), measured on the demo model
# (docs/BENCHMARKS.md, "Compression (torch)"): channel pruning changes the network most and recovers at the
# fine-tuning rate of the top blocks; QAT at 1e-4 (2e-5 barely moved the early layers whose rounding costs).
LR = {"channels": 1e-3, "magnitude": 3e-4, "qat": 1e-4}
# Weight of the dense model's soft targets (temperature 4) against the labels. Channel pruning leaves the
# network near chance and 2700 labels are too little signal to rebuild it; the dense model's whole output
# distribution is far more (channels:0.5, 3 epochs: val 76.3% on labels alone, 82.3% with 0.9). Magnitude
# pruning and QAT were measured on labels alone and keep that default. Channel pruning also trains BatchNorm in
# batch mode and re-estimates its statistics afterwards (8 epochs, 50%: test top-1 83.7% frozen → 86.0%).
DISTILL = {"channels": 0.9, "magnitude": 0.0, "qat": 0.0}


def tune_for(manifest: dict, config, kind: str) -> Tune:
    """The checkpoint's own batch size, seed and label smoothing; epochs and images from the export config."""
    from edgetl.export import RECOVERY_EPOCHS

    trained = manifest.get("config", {})
    if kind == "qat":
        epochs, lr = int(config.qat_epochs), config.qat_lr
    else:
        epochs = RECOVERY_EPOCHS[kind] if config.recovery_epochs is None else int(config.recovery_epochs)
        lr = config.recovery_lr
    return Tune(
        epochs=epochs,
        lr=LR[kind] if lr is None else float(lr),
        distill=DISTILL[kind] if config.distill is None else float(config.distill),
        train_batchnorm=kind == "channels",  # a pruned network is rebuilt: its BN statistics must follow
        batch_size=int(trained.get("batch_size", 64)),
        images=config.tune_images,
        seed=int(trained.get("seed", config.seed)),
        label_smoothing=float(trained.get("label_smoothing", 0.1)),
    )


def _spec(manifest: dict) -> dict:
    return dict(manifest["preprocess"], layout="NCHW")


def prune_model(
    checkpoint: Path, manifest: dict, listing: data.DatasetListing, spec: tuple[str, float], config
) -> tuple[nn.Module, dict]:
    """The checkpoint's float model (NCHW), pruned as `spec` says and fine-tuned; plus the manifest record."""
    kind, ratio = spec
    torch.manual_seed(int(manifest.get("config", {}).get("seed", 0)))
    model = load_model(checkpoint, manifest)
    tune = tune_for(manifest, config, kind)
    teacher = load_model(checkpoint, manifest) if tune.distill > 0 else None
    if kind == "channels":
        model, info = prune_channels(model, ratio, int(manifest["model"]["num_classes"]), listing, _spec(manifest),
                                     tune, teacher)
    else:
        model, info = prune_magnitude(model, ratio, listing, _spec(manifest), tune, teacher)
    info["spec"] = f"{kind}:{ratio:g}"
    return model.eval(), info


def qat_graphs(
    checkpoint: Path, manifest: dict, listing: data.DatasetListing, model: nn.Module | None, config
) -> Graphs:
    """Float NHWC model and its QAT int8 graph (from `model` when pruned, else from the checkpoint).

    With distillation on, the teacher is always the dense checkpoint, also for a pruned model."""
    base = model if model is not None else load_model(checkpoint, manifest)
    size = manifest["model"]["image_size"]
    example = torch.zeros(1, size, size, 3)
    float_model = ChannelsLastInput(base).eval()
    tune = tune_for(manifest, config, "qat")
    teacher = ChannelsLastInput(load_model(checkpoint, manifest)).eval() if tune.distill > 0 else None
    torch.manual_seed(0)
    started = time.perf_counter()
    int8, info = quantize_qat(float_model, example, listing, _spec(manifest), tune, fuse_clamp=config.fuse_clamp,
                              teacher=teacher)
    info["seconds"] = round(time.perf_counter() - started, 1)
    info["input_quantization"] = _first_input_qparams(int8)
    return Graphs(float_model=float_model, example=example, int8=int8, quantization=info)


def save_pruned(model: nn.Module, folder: Path, info: dict) -> str:
    """The pruned float weights in the export folder (loadable with torch-pruning); returns the file name."""
    return _save(model, folder)


def summary(info: dict) -> str:
    """One line for the console."""
    if info["method"] == "channels":
        return (f"pruning: channels {info['ratio']:.0%} → parameters {info['params_before'] / 1e6:.2f} M → "
                f"{info['params_after'] / 1e6:.2f} M, MACs {info['macs_before'] / 1e6:.1f} M → "
                f"{info['macs_after'] / 1e6:.1f} M ({1 / info['macs_ratio']:.2f}× fewer)")
    return (f"pruning: magnitude {info['target_sparsity']:.0%} → {info['sparsity_prunable']:.1%} of prunable weights "
            f"zero ({info['sparsity_all']:.1%} of all conv/linear weights); see gzip sizes")
