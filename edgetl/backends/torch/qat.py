"""PT2E quantization-aware training: the int8 graph's weights learn around their own rounding.

The float NHWC model (pruned or not) has its BatchNorms folded first, so the exported graph has no BN
left to put in train or eval mode (small data would wreck BN statistics, as in fine-tuning). The project's
quantizer (ReLU6 outputs quantized after the clamp) is set to its QAT configuration: fake-quantize modules
with moving-average ranges on activations and per-channel symmetric weights. A few epochs at a small learning
rate on the training split, then `convert_pt2e(fold_quantize=False)`: the same Q/DQ form PTQ produces, so
`lower_pte` and `convert_tflite` take it unchanged.
"""

from __future__ import annotations

import time

import torch
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config
from torch import nn
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

from edgetl import data
from edgetl.backends.torch.models import to_int8_form
from edgetl.backends.torch.quantize import ClampFusingQuantizer, fold_batchnorm
from edgetl.backends.torch.recovery import Tune, fit, top1, val_arrays
from edgetl.ui import console


def make_qat_quantizer(fuse_clamp: bool = True) -> XNNPACKQuantizer:
    """`quantize.make_quantizer`'s scheme with fake-quantize modules instead of observers."""
    quantizer = ClampFusingQuantizer() if fuse_clamp else XNNPACKQuantizer()
    return quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True, is_qat=True))


def quantize_qat(
    model: nn.Module, example: torch.Tensor, listing: data.DatasetListing, spec: dict, tune: Tune,
    fuse_clamp: bool = True, teacher: nn.Module | None = None,
) -> tuple[torch.fx.GraphModule, dict]:
    """QAT of an NHWC float model; returns the converted int8 (Q/DQ) graph and what the manifest records."""
    started = time.perf_counter()
    folded = to_int8_form(fold_batchnorm(model, example))  # the same int8-friendly ops as post-training
    batch = torch.export.Dim("batch", min=1, max=4096)
    sample = torch.cat([example, example]) if example.shape[0] == 1 else example
    graph = torch.export.export(folded, (sample,), dynamic_shapes=({0: batch},)).module()
    prepared = prepare_qat_pt2e(graph, make_qat_quantizer(fuse_clamp))
    x_val, y_val = val_arrays(listing, spec)
    console.print(f"int8: PT2E quantization-aware training ({tune.epochs} epochs, lr {tune.lr:g})…")
    training = fit(prepared, listing, spec, tune, "quantization-aware training", nhwc=True, teacher=teacher)
    with torch.no_grad():
        converted = convert_pt2e(prepared, fold_quantize=False)
    val = top1(converted, x_val, y_val, nhwc=True)
    info = {
        "method": "pt2e-qat",
        "quantizer": "XNNPACKQuantizer (executorch) QAT config"
                     + (", ReLU6 outputs observed after the clamp, each mean on its own range" if fuse_clamp else ""),
        "weights": "int8, symmetric, per output channel (BatchNorm folded first), fake-quantized while training",
        "activations": "int8, per tensor, affine, moving-average ranges learnt in QAT",
        "fuse_clamp": bool(fuse_clamp),
        "qat": {**training, "val_top1_int8_graph": None if val is None else round(val, 5),
                "data": "the checkpoint's training split, fine-tuning preprocessing and augmentation"},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return converted, info
