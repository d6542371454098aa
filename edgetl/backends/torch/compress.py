"""Compression on the torch backend: channel or magnitude pruning with its recovery fine-tune, and PT2E
quantization-aware training, with the measured defaults of each.

Only imported when an export prunes or trains (torch-pruning is heavy); `backend.TorchBackend` calls it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from edgetl import data
from edgetl.backends.base import TuneDefaults, trained_settings, tune_for
from edgetl.backends.torch.export import ChannelsLastInput, first_input_qparams, load_model
from edgetl.backends.torch.prune import prune_channels, prune_magnitude, save_pruned
from edgetl.backends.torch.qat import quantize_qat

# Measured on the demo model (docs/BENCHMARKS.md, "Compression (torch)"):
# - epochs: channels:0.5 leaves the network at chance; 3 epochs on labels alone recovered val top-1 to 76.3%,
#   8 epochs distilled from the dense model with BatchNorm trained reach 86.0% test top-1 in float (dense
#   86.5%; ~1 min per epoch on an idle 2-core host). 2 QAT epochs at 1e-4 took int8 from 0.9 point below
#   float to 1.2 above (1 epoch at 2e-5 recovered 22%).
# - learning rates (AdamW, warm-up + cosine): channel pruning changes the network most and recovers at the
#   fine-tuning rate of the top blocks; QAT at 1e-4 (2e-5 barely moved the early layers whose rounding costs).
# - distillation (weight of the dense model's soft targets at temperature 4): channel pruning leaves the
#   network near chance and 2700 labels are too little signal to rebuild it (channels:0.5, 3 epochs: val 76.3%
#   on labels alone, 82.3% with 0.9); magnitude pruning and QAT were measured on labels alone. Channel pruning
#   also trains BatchNorm in batch mode and re-estimates its statistics (8 epochs, 50%: 83.7% frozen → 86.0%).
DEFAULTS = TuneDefaults(
    epochs={"channels": 8, "magnitude": 4, "qat": 2},
    lr={"channels": 1e-3, "magnitude": 3e-4, "qat": 1e-4},
    distill={"channels": 0.9, "magnitude": 0.0, "qat": 0.0},
)


def _spec(manifest) -> dict:
    return manifest.preprocess.with_layout("NCHW")


def prune_model(checkpoint: Path, manifest, listing: data.DatasetListing, spec: tuple[str, float],
                config) -> tuple[nn.Module, dict]:
    """The checkpoint's float model (NCHW), pruned as `spec` says and fine-tuned; plus the manifest record."""
    kind, ratio = spec
    torch.manual_seed(int(trained_settings(manifest.config).get("seed", 0)))
    model = load_model(checkpoint, manifest)
    tune = tune_for(manifest.config, config, kind, DEFAULTS)
    teacher = load_model(checkpoint, manifest) if tune.distill > 0 else None
    if kind == "channels":
        model, info = prune_channels(model, ratio, manifest.model.num_classes, listing, _spec(manifest), tune,
                                     teacher)
    else:
        model, info = prune_magnitude(model, ratio, listing, _spec(manifest), tune, teacher)
    info["spec"] = f"{kind}:{ratio:g}"
    return model.eval(), info


def qat_int8(checkpoint: Path, manifest, listing: data.DatasetListing, float_model: nn.Module, example: torch.Tensor,
             config) -> tuple[torch.fx.GraphModule, dict]:
    """The QAT int8 graph of the NHWC `float_model` (pruned or not), and what the manifest records.

    With distillation on, the teacher is always the dense checkpoint, also for a pruned model."""
    tune = tune_for(manifest.config, config, "qat", DEFAULTS)
    teacher = ChannelsLastInput(load_model(checkpoint, manifest)).eval() if tune.distill > 0 else None
    torch.manual_seed(0)
    started = time.perf_counter()
    int8, info = quantize_qat(float_model, example, listing, _spec(manifest), tune,
                              fuse_clamp=config.quantization.fuse_clamp, teacher=teacher)
    info["seconds"] = round(time.perf_counter() - started, 1)
    info["input_quantization"] = first_input_qparams(int8)
    return int8, info


def save(model: nn.Module, folder: Path) -> str:
    """The pruned float weights in the export folder (loadable with torch-pruning); returns the file name."""
    return save_pruned(model, folder)


def summary(info: dict) -> str:
    """One line for the console."""
    if info["method"] == "channels":
        return (f"pruning: channels {info['ratio']:.0%} → parameters {info['params_before'] / 1e6:.2f} M → "
                f"{info['params_after'] / 1e6:.2f} M, MACs {info['macs_before'] / 1e6:.1f} M → "
                f"{info['macs_after'] / 1e6:.1f} M ({1 / info['macs_ratio']:.2f}× fewer)")
    return (f"pruning: magnitude {info['target_sparsity']:.0%} → {info['sparsity_prunable']:.1%} of prunable weights "
            f"zero ({info['sparsity_all']:.1%} of all conv/linear weights); see gzip sizes")
