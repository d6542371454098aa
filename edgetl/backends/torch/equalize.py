"""Cross-layer equalization and bias absorption (Nagel et al. 2019, "Data-Free Quantization"), label-free.

Two convs with a ReLU-like activation between them compute the same function when conv1's output channel i is
divided by s_i and conv2's input channel i multiplied by s_i, because relu(x / s) = relu(x) / s. Choosing
s_i = sqrt(r1_i / r2_i) (r: the largest |weight| of channel i in each conv) gives both the same range, so a
channel whose weights are tiny in one layer and huge in the other no longer wastes the int8 grid of either.
Bias absorption then moves the part of conv1's bias that the activation never clips into conv2's bias, which
narrows the activation's range. In the MobileNet family the pairs are expand → depthwise and depthwise →
projection, the depthwise-separable blocks the paper targets.

ReLU6 is not scale-invariant: relu6(x / s) · s clips at 6·s instead of 6. The paper replaces ReLU6 by ReLU, which
changes the float model. Here a channel is rescaled only as far as the calibration images show it stays exact:
a channel whose pre-activation never exceeds 6 may take any s_i ≥ max_i / 6 (it then never reaches the clip),
and a channel that does reach 6 keeps s_i = 1. Bias absorption likewise takes only a channel that never clips
(ReLU6) and is never below its shift. The float model's logits on the calibration images are therefore unchanged
up to float rounding; `equalize` reports how far they moved, and how many channels it could rescale.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

RELU6_CLIP = 6.0
ROUNDS = 4  # the paper iterates pairs until the scales settle; a chain expand → dw → project settles in a few
MIN_RANGE = 1e-8  # a channel whose weights are all (near) zero in either conv keeps its scale


class _Consumers(TorchFunctionMode):
    """Counts, for every tensor, the torch calls that read it: a conv output that anything besides its
    activation reads (a residual sum, a squeeze-excite product) cannot be rescaled."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[int, int] = {}
        self.seen: list[object] = []  # every input and result stays alive, so no id is reused during the pass

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for value in (*args, *(kwargs or {}).values()):
            if isinstance(value, torch.Tensor):
                self.reads[id(value)] = self.reads.get(id(value), 0) + 1
                self.seen.append(value)
        result = func(*args, **(kwargs or {}))
        self.seen.append(result)
        return result


def _activation_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.ReLU6) or (isinstance(module, nn.Hardtanh) and module.min_val == 0.0
                                        and module.max_val == RELU6_CLIP):
        return "relu6"
    return None


def _separable(conv: nn.Conv2d) -> bool:
    """Convs whose input channel i has a column of its own: dense (groups 1) or depthwise."""
    return conv.groups == 1 or conv.groups == conv.in_channels == conv.out_channels


def find_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Conv2d, str, nn.Conv2d]]:
    """(conv1, activation kind, conv2) where conv2 alone reads the activation of conv1's output, found by running
    `model` once (any backbone, no knowledge of its layout)."""
    convs: dict[int, nn.Conv2d] = {}  # output tensor id → conv
    inputs: dict[int, nn.Conv2d] = {}  # input tensor id → conv reading it
    acts: list[tuple[int, str, int]] = []  # (input id, kind, output id)
    keep: list[torch.Tensor] = []  # holds every tensor seen, so no id is reused during the pass
    hooks = []

    def on_conv(module, args, output):
        keep.extend((args[0], output))
        convs[id(output)] = module
        inputs[id(args[0])] = module

    def on_act(kind):
        def hook(module, args, output):
            keep.extend((args[0], output))
            acts.append((id(args[0]), kind, id(output)))
        return hook

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(on_conv))
        elif (kind := _activation_kind(module)) is not None:
            hooks.append(module.register_forward_hook(on_act(kind)))
    consumers = _Consumers()
    try:
        with torch.no_grad(), consumers:
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    pairs = []
    for source, kind, output in acts:
        conv1, conv2 = convs.get(source), inputs.get(output)
        if conv1 is None or conv2 is None or conv1 is conv2:
            continue
        if consumers.reads.get(source, 0) != 1 or consumers.reads.get(output, 0) != 1:
            continue  # conv1's output or the activation is read elsewhere too
        if conv2.in_channels != conv1.out_channels or not _separable(conv1) or not _separable(conv2):
            continue
        pairs.append((conv1, kind, conv2))
    return pairs


def _pre_activation_ranges(model: nn.Module, convs: list[nn.Conv2d],
                           calibration: torch.Tensor) -> dict[nn.Conv2d, tuple[torch.Tensor, torch.Tensor]]:
    """Per output channel min and max of each conv's output over the calibration images."""
    ranges: dict[nn.Conv2d, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, args, output):
        low, high = output.amin(dim=(0, 2, 3)), output.amax(dim=(0, 2, 3))
        if module in ranges:
            low, high = torch.minimum(low, ranges[module][0]), torch.maximum(high, ranges[module][1])
        ranges[module] = (low, high)

    hooks = [conv.register_forward_hook(hook) for conv in convs]
    try:
        with torch.no_grad():
            for chunk in torch.split(calibration, 32):
                model(chunk)
    finally:
        for handle in hooks:
            handle.remove()
    return ranges


def _row_range(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().flatten(1).amax(dim=1)


def _column_range(conv: nn.Conv2d) -> torch.Tensor:
    weight = conv.weight.detach().abs()
    if conv.groups == 1:
        return weight.transpose(0, 1).flatten(1).amax(dim=1)
    return weight.flatten(1).amax(dim=1)  # depthwise: input channel i is output channel i's only column


def _scale(conv1: nn.Conv2d, conv2: nn.Conv2d, factor: torch.Tensor) -> None:
    """conv1's output channel i / factor_i, conv2's input channel i · factor_i."""
    with torch.no_grad():
        conv1.weight /= factor.view(-1, *([1] * (conv1.weight.ndim - 1)))
        if conv1.bias is not None:
            conv1.bias /= factor
        if conv2.groups == 1:
            conv2.weight *= factor.view(1, -1, *([1] * (conv2.weight.ndim - 2)))
        else:
            conv2.weight *= factor.view(-1, *([1] * (conv2.weight.ndim - 1)))


def equalize(model: nn.Module, calibration: torch.Tensor, absorb_bias: bool = True) -> tuple[nn.Module, dict]:
    """A copy of `model` (BatchNorm folded, NCHW-in-the-graph backbone or its NHWC wrapper) with cross-layer
    equalization and bias absorption applied where they are exact on `calibration`, and a record of it."""
    model = copy.deepcopy(model).eval()
    pairs = find_pairs(model, calibration[:2])
    if not pairs:
        return model, {"pairs": 0, "channels": 0, "rescaled_channels": 0, "absorbed_channels": 0}
    with torch.no_grad():
        reference = torch.cat([model(chunk) for chunk in torch.split(calibration, 32)])
    ranges = _pre_activation_ranges(model, [conv1 for conv1, _, _ in pairs], calibration)
    cumulative = {conv1: torch.ones(conv1.out_channels) for conv1, _, _ in pairs}
    for _ in range(ROUNDS):
        for conv1, kind, conv2 in pairs:
            r1, r2 = _row_range(conv1), _column_range(conv2)
            wanted = torch.where((r1 > MIN_RANGE) & (r2 > MIN_RANGE), torch.sqrt(r1 / r2.clamp_min(MIN_RANGE)),
                                 torch.ones_like(r1))
            total = cumulative[conv1] * wanted
            if kind == "relu6":
                high = ranges[conv1][1]
                exact = high <= RELU6_CLIP
                total = torch.where(exact, torch.maximum(total, high.clamp_min(0.0) / RELU6_CLIP),
                                    torch.ones_like(total))
            _scale(conv1, conv2, total / cumulative[conv1])
            cumulative[conv1] = total
    absorbed = 0
    if absorb_bias:
        for conv1, kind, conv2 in pairs:
            absorbed += _absorb(conv1, kind, conv2, ranges[conv1], cumulative[conv1])
    rescaled = sum(int(((scale - 1).abs() > 1e-6).sum()) for scale in cumulative.values())
    with torch.no_grad():
        moved = torch.cat([model(chunk) for chunk in torch.split(calibration, 32)]) - reference
    record = {
        "pairs": len(pairs),
        "channels": sum(conv1.out_channels for conv1, _, _ in pairs),
        "rescaled_channels": rescaled,
        "absorbed_channels": absorbed,
        "relu6_pairs": sum(kind == "relu6" for _, kind, _ in pairs),
        "logit_max_abs_change": float(f"{float(moved.abs().max()):.3g}"),
        "rule": "exact on the calibration images: a ReLU6 channel is rescaled only when it never reaches 6",
    }
    return model, record


def _absorb(conv1: nn.Conv2d, kind: str, conv2: nn.Conv2d, pre_range: tuple[torch.Tensor, torch.Tensor],
            scale: torch.Tensor) -> int:
    """Move c_i = the smallest pre-activation value (when positive) out of conv1's bias into conv2's: the
    activation never clips channel i at 0 then, so relu(x - c) + c = relu(x). Only into a 1×1 conv2 without
    padding (a depthwise conv's zero padding would see the shift at the borders) and only where exact."""
    if conv1.bias is None or conv2.kernel_size != (1, 1) or conv2.padding not in ((0, 0), "valid") or \
            conv2.groups != 1:
        return 0
    low, high = pre_range[0] / scale, pre_range[1] / scale
    shift = low.clamp_min(0.0)
    if kind == "relu6":
        shift = torch.where(high <= RELU6_CLIP, shift, torch.zeros_like(shift))
    if not bool((shift > 0).any()):
        return 0
    with torch.no_grad():
        conv1.bias -= shift
        moved = conv2.weight[:, :, 0, 0] @ shift
        if conv2.bias is None:
            conv2.bias = nn.Parameter(moved.clone())
        else:
            conv2.bias += moved
    return int((shift > 0).sum())


def describe(record: dict) -> str:
    """One line for the console."""
    if not record.get("pairs"):
        return "no conv pair with a ReLU between them: nothing to equalize"
    share = record["rescaled_channels"] / max(1, record["channels"])
    return (f"{record['pairs']} conv pairs, {record['rescaled_channels']} of {record['channels']} channels rescaled "
            f"({math.floor(share * 100)}%), {record['absorbed_channels']} biases absorbed; float logits moved by at "
            f"most {record['logit_max_abs_change']:g} on the calibration images")
