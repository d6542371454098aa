"""MobileNetV4 (conv variants), defined with timm's state-dict names and shapes.

Qin et al. 2024, "MobileNetV4: Universal Models for the Mobile Ecosystem". The published ImageNet weights are
timm checkpoints on the Hugging Face Hub (`timm/mobilenetv4_conv_small.e2400_r224_in1k`, ...), so every module
here is named as timm names it (`conv_stem`, `bn1`, `blocks.S.B.pw_exp.conv`, `conv_head`, `norm_head`,
`classifier`) and those files load with `load_state_dict(strict=True)`. The conv variants use ReLU, BatchNorm,
convolutions and residual adds only: no squeeze-excite and no hard-swish, so every op has an int8 kernel in
both runtimes. `tests/test_mobilenet_v4.py` checks the names and shapes against a file produced from timm.
"""

from __future__ import annotations

import torch
from torch import nn

from edgetl.backends.torch.models import Backbone, make_divisible, register

# One block per entry, as timm's arch strings decode them:
#   ("cn", kernel, stride, out)              conv + BN + ReLU (timm's ConvBnAct, no skip)
#   ("er", kernel, stride, expand, out)      fused inverted residual (timm's EdgeResidual)
#   ("uir", start, mid, stride, expand, out) universal inverted residual; start/mid: depthwise kernel, 0 = none
# Stages are the inner tuples (timm's `blocks.S`); a stage's first block takes the stride.
CONV_SMALL = (
    (("cn", 3, 2, 32), ("cn", 1, 1, 32)),
    (("cn", 3, 2, 96), ("cn", 1, 1, 64)),
    (("uir", 5, 5, 2, 3, 96),) + (("uir", 0, 3, 1, 2, 96),) * 4 + (("uir", 3, 0, 1, 4, 96),),
    (("uir", 3, 3, 2, 6, 128), ("uir", 5, 5, 1, 4, 128), ("uir", 0, 5, 1, 4, 128), ("uir", 0, 5, 1, 3, 128))
    + (("uir", 0, 3, 1, 4, 128),) * 2,
    (("cn", 1, 1, 960),),
)
CONV_MEDIUM = (
    (("er", 3, 2, 4, 48),),
    (("uir", 3, 5, 2, 4, 80), ("uir", 3, 3, 1, 2, 80)),
    (("uir", 3, 5, 2, 6, 160),) + (("uir", 3, 3, 1, 4, 160),) * 2
    + (("uir", 3, 5, 1, 4, 160), ("uir", 3, 3, 1, 4, 160), ("uir", 3, 0, 1, 4, 160), ("uir", 0, 0, 1, 2, 160),
       ("uir", 3, 0, 1, 4, 160)),
    (("uir", 5, 5, 2, 6, 256), ("uir", 5, 5, 1, 4, 256)) + (("uir", 3, 5, 1, 4, 256),) * 2
    + (("uir", 0, 0, 1, 4, 256), ("uir", 3, 0, 1, 4, 256), ("uir", 3, 5, 1, 2, 256), ("uir", 5, 5, 1, 4, 256))
    + (("uir", 0, 0, 1, 4, 256),) * 2 + (("uir", 5, 0, 1, 2, 256),),
    (("cn", 1, 1, 960),),
)
VARIANTS = {"small": CONV_SMALL, "medium": CONV_MEDIUM}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """timm's symmetric 'same' padding for odd kernels: (kernel - 1) // 2 on every side."""
    return nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False)


class ConvBnAct(nn.Module):
    """conv → bn1 → ReLU: a plain conv block (timm's `cn` block, names `conv`, `bn1`)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = _conv(in_ch, out_ch, kernel, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU()
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn1(self.conv(x)))


class ConvNorm(nn.Module):
    """conv → bn → optional ReLU, named `conv` and `bn` as timm's layers inside a universal inverted residual."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        super().__init__()
        self.conv = _conv(in_ch, out_ch, kernel, stride, groups)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class UniversalInvertedResidual(nn.Module):
    """MobileNetV4's universal inverted bottleneck: an optional depthwise conv before the 1×1 expansion (no
    activation), the expansion, an optional depthwise conv after it, then the linear 1×1 projection. With both
    depthwise convs it is the paper's ExtraDW, with the second only a MobileNetV2 block, with the first only a
    ConvNeXt-like block, with neither a feed-forward block. The stride sits on the middle conv when there is one."""

    def __init__(self, in_ch: int, out_ch: int, start: int, mid: int, stride: int, expand: float) -> None:
        super().__init__()
        hidden = make_divisible(in_ch * expand)
        self.dw_start = (ConvNorm(in_ch, in_ch, start, 1 if mid else stride, groups=in_ch, act=False)
                         if start else nn.Identity())
        self.pw_exp = ConvNorm(in_ch, hidden, 1)
        self.dw_mid = ConvNorm(hidden, hidden, mid, stride, groups=hidden) if mid else nn.Identity()
        self.pw_proj = ConvNorm(hidden, out_ch, 1, act=False)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw_proj(self.dw_mid(self.pw_exp(self.dw_start(x))))
        return x + y if self.has_skip else y


class EdgeResidual(nn.Module):
    """Fused inverted residual: a full k×k conv expands (and strides), a linear 1×1 conv projects (timm's names
    `conv_exp`, `bn1`, `conv_pwl`, `bn2`)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: float) -> None:
        super().__init__()
        hidden = make_divisible(in_ch * expand)
        self.conv_exp = _conv(in_ch, hidden, kernel, stride)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.act = nn.ReLU()
        self.conv_pwl = _conv(hidden, out_ch, 1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pwl(self.act(self.bn1(self.conv_exp(x)))))
        return x + y if self.has_skip else y


def _block(kind: tuple, in_ch: int) -> nn.Module:
    if kind[0] == "cn":
        _, kernel, stride, out = kind
        return ConvBnAct(in_ch, out, kernel, stride)
    if kind[0] == "er":
        _, kernel, stride, expand, out = kind
        return EdgeResidual(in_ch, out, kernel, stride, expand)
    _, start, mid, stride, expand, out = kind
    return UniversalInvertedResidual(in_ch, out, start, mid, stride, expand)


class MobileNetV4(Backbone):
    """Stem, five stages of blocks, then timm's head: global pooling, a 1×1 conv to 1280 channels with BatchNorm
    and ReLU (on the pooled 1×1 map, so it costs 1.2 M MACs whatever the input size), and the classifier."""

    head_layer = "classifier"

    def __init__(self, variant: str, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        if width != 1.0:
            raise ValueError("MobileNetV4 has width 1.0 only")
        self.conv_stem = _conv(3, STEM_CHANNELS, 3, 2)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.act = nn.ReLU()
        in_ch, stages = STEM_CHANNELS, []
        for stage in VARIANTS[variant]:
            blocks = []
            for kind in stage:
                blocks.append(_block(kind, in_ch))
                in_ch = blocks[-1].out_channels
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.feature_dim = HEAD_CHANNELS
        self.conv_head = nn.Conv2d(in_ch, HEAD_CHANNELS, 1, bias=False)
        self.norm_head = nn.BatchNorm2d(HEAD_CHANNELS)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.act(self.bn1(self.conv_stem(x))))
        x = x.mean((2, 3), keepdim=True)  # a mean, not adaptive pooling: see models.global_pool
        return self.act(self.norm_head(self.conv_head(x))).flatten(1)

    @property
    def head(self) -> nn.Module:
        return nn.Sequential(self.dropout, self.classifier)

    def stages(self) -> list[nn.Module]:
        stem = nn.ModuleList([self.conv_stem, self.bn1])
        head = nn.ModuleList([self.conv_head, self.norm_head])
        return [stem, *(block for stage in self.blocks for block in stage), head]

    def reset_head(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        nn.init.normal_(self.classifier.weight, 0, 0.01)
        nn.init.zeros_(self.classifier.bias)


@register("mobilenet_v4_conv_small")
def _mobilenet_v4_conv_small(num_classes: int, width: float) -> Backbone:
    return MobileNetV4("small", num_classes, width)


@register("mobilenet_v4_conv_medium")
def _mobilenet_v4_conv_medium(num_classes: int, width: float) -> Backbone:
    return MobileNetV4("medium", num_classes, width)
