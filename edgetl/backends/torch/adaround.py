"""Learned weight rounding (AdaRound, Nagel et al. 2020) for the layers whose int8 rounding costs most.

Rounding each weight to the nearest int8 level is not the best choice for the layer's output: AdaRound learns,
per weight, whether to round down or up, so that the layer's output on calibration images (no labels) matches
the float layer's. torchao / executorch have observers, PT2E passes and QAT but no learned rounding, so this
module adds only that step, on the BN-folded float model *before* PT2E:

- the grid is the one PT2E will use (per output channel, symmetric, ±127, scale = amax / 127), so the result is
  written back as float weights `scale × q` that PT2E's observer re-quantizes to exactly the chosen integers `q`
  (the element that sets each channel's amax keeps its nearest rounding, so the scale does not move);
- the graph, the kernels and the int8 input/output are unchanged: both converters (ExecuTorch, litert-torch)
  read the same Q/DQ graph, so both formats get the learned rounding.

Layers are optimised in network order; each sees the input produced by the layers already rounded before it
(the other layers float) and reconstructs the float model's output of that layer.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from edgetl.backends.torch.quantize import WEIGHT_QMAX, weight_scale

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (AdaRound's values)
REFERENCE_SIDE = 128  # input side at which the default images and batch apply (`sized_for`)
MIN_IMAGES, MIN_BATCH = 32, 8


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class _Reached(Exception):
    """Raised by a capture hook once its layer has run: nothing after that layer is needed."""


def _capture(model: nn.Module, layer: nn.Module, x: torch.Tensor, what: str, batch: int = 64) -> torch.Tensor:
    """The input or output of `layer` when `model` runs on `x`. Each pass stops at the layer: the most
    sensitive layers are mostly early and large (EfficientNet-Lite0 at 224 px: the stem, block 0's 112×112
    depthwise conv), so running the rest of the network for them was most of the capture's cost."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen.append((inputs[0] if what == "input" else output).detach())
        raise _Reached

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for chunk in torch.split(x, batch):
                with contextlib.suppress(_Reached):
                    model(chunk)
    finally:
        handle.remove()
    if len(seen) != len(torch.split(x, batch)):
        raise ValueError("the layer did not run once per batch: its activations cannot be captured")
    return torch.cat(seen)


def _apply(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, weight, layer.bias)
    return nn.functional.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _recon(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over images and positions (AdaRound's reconstruction loss)."""
    return ((out - target) ** 2).sum(dim=1).mean()


def learn_rounding(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, iterations: int = 400,
                   batch: int = 32, reg: float = 0.01, lr: float = 1e-2, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The int8 integers of `layer.weight` (same shape) that best reconstruct `target` from `x`, and a record.

    Falls back to nearest rounding when the learned one does not reconstruct better on all of `x`."""
    weight = layer.weight.detach()
    scale = weight_scale(weight)
    scaled = weight / scale
    floor = scaled.floor()
    nearest = scaled.round().clamp(-WEIGHT_QMAX, WEIGHT_QMAX)
    rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).clone().requires_grad_(True)
    optimiser = torch.optim.Adam([v], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    warmup = int(0.2 * iterations)
    for step in range(iterations):
        pick = torch.randint(0, len(x), (min(batch, len(x)),), generator=generator)
        soft = (floor + _rectified_sigmoid(v)).clamp(-WEIGHT_QMAX, WEIGHT_QMAX) * scale
        loss = _recon(_apply(layer, x[pick], soft), target[pick])
        if step >= warmup:  # then push every h towards 0 or 1, with an annealed exponent
            beta = 20 + (2 - 20) * (step - warmup) / max(iterations - warmup, 1)
            h = _rectified_sigmoid(v)
            loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        learned = (floor + (_rectified_sigmoid(v) >= 0.5).float()).clamp(-WEIGHT_QMAX, WEIGHT_QMAX)
        # the element that sets each channel's amax keeps ±127, so PT2E's observer finds the same scale
        dims = tuple(range(1, weight.ndim))
        extreme = weight.abs() == weight.abs().amax(dim=dims, keepdim=True)
        learned = torch.where(extreme, nearest, learned)
        error_nearest = float(_recon(_apply(layer, x, nearest * scale), target))
        error_learned = float(_recon(_apply(layer, x, learned * scale), target))
    kept = error_learned < error_nearest
    chosen = learned if kept else nearest
    return chosen, {
        "error_nearest": round(error_nearest, 8), "error_learned": round(error_learned, 8),
        "kept": bool(kept), "changed_share": round(float((chosen != nearest).float().mean()), 5),
    }


def sized_for(calibration: torch.Tensor, images: int = 256, batch: int = 32) -> tuple[int, int]:
    """Images and batch for learned rounding, sized in pixels rather than images: an input of more than
    REFERENCE_SIDE² pixels takes proportionally fewer of both (224 px: 84 images, batches of 10), so each
    optimisation step and the captured activations cost what they cost at 128 px, and every step still sees
    as many activation positions. A smaller input keeps the defaults."""
    pixels = int(calibration.shape[1]) * int(calibration.shape[2])  # NHWC
    share = min(1.0, REFERENCE_SIDE ** 2 / max(pixels, 1))
    return max(MIN_IMAGES, round(images * share)), max(MIN_BATCH, round(batch * share))


def adaround(model: nn.Module, calibration: torch.Tensor, layers: list[str], iterations: int = 400,
             images: int = 256, seed: int = 0) -> tuple[nn.Module, dict]:
    """`model` (BN-folded, float) with the named layers' weights replaced by learned int8 roundings (as float
    values on the int8 grid), and the record the manifest keeps. `model` is changed in place. `images` is the
    count at REFERENCE_SIDE px (`sized_for`)."""
    started = time.perf_counter()
    images, batch = sized_for(calibration, images)
    x = calibration[:images]
    float_model = _frozen_copy(model)
    modules = dict(model.named_modules())
    float_modules = dict(float_model.named_modules())
    order = [name for name, _ in model.named_modules() if name in set(layers)]
    rows = []
    for name in order:
        layer_started = time.perf_counter()
        layer = modules[name]
        inputs = _capture(model, layer, x, "input")  # earlier layers already rounded
        target = _capture(float_model, float_modules[name], x, "output")
        integers, row = learn_rounding(layer, inputs, target, iterations=iterations, batch=batch, seed=seed)
        layer.weight.data = integers * weight_scale(layer.weight.detach())
        rows.append({"layer": name, **row, "seconds": round(time.perf_counter() - layer_started, 1)})
    return model, {
        "method": "AdaRound-style learned rounding (rectified sigmoid, annealed regulariser), layer output "
                  "reconstructed on unlabelled calibration images; weights written back on the int8 grid",
        "layers": rows,
        "iterations": int(iterations),
        "images": int(len(x)),
        "batch": int(batch),
        "seconds": round(time.perf_counter() - started, 1),
    }


def _frozen_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()
