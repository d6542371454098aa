"""Our own torch definitions of the MobileNet family.

Parameter names follow torchvision's MobileNetV2/V3 and the published EfficientNet-Lite0 state dict, so
the published ImageNet checkpoints load with `load_state_dict(strict=True)`. torchvision itself does not
import beside the pinned torch here, and we want to own the graph that gets quantized and exported.

Every model exposes the same small interface that fine-tuning, pruning and export rely on:
`forward_features` (pooled embedding), `head` (the trainable classifier), `stages()` (units from input
to output, for unfreezing the top K), `reset_head(num_classes)` and `feature_dim`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

# backbone name (as edgetl.backbones lists it) → the builder of its torch definition, filled by `register`
TORCH_MODELS: dict[str, Callable[[int, float], Backbone]] = {}
# modules that define backbones of their own (this one defines MobileNetV2/V3 and EfficientNet-Lite0)
DEFINITION_MODULES = ("edgetl.backends.torch.mobilenet_v4",)


def register(name: str) -> Callable[[Callable[[int, float], Backbone]], Callable[[int, float], Backbone]]:
    """Register a builder `(num_classes, width) → model` under a backbone name, where the model is defined."""

    def add(builder: Callable[[int, float], Backbone]) -> Callable[[int, float], Backbone]:
        if name in TORCH_MODELS:
            raise ValueError(f"backbone {name!r} is registered twice")
        TORCH_MODELS[name] = builder
        return builder

    return add


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channel counts as the MobileNet papers do (never more than 10% below the target)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] → [N, C]: the mean over H and W. The same values as adaptive average pooling to 1×1 and a
    flatten, but one op that ExecuTorch's XNNPACK delegate takes whole: adaptive pooling lowers to a mean and an
    as_strided copy of its [N, C, 1, 1] result, which XNNPACK does not take, so every pooling split the .pte into
    one more delegate partition with a portable copy between."""
    return x.mean((2, 3), keepdim=True).flatten(1)  # XNNPACK's mean keeps the dimensions; the flatten is a view


class ConvNormAct(nn.Sequential):
    """conv → BN → activation, indexed 0/1/2 like torchvision's Conv2dNormActivation."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: Callable[[], nn.Module] | None = nn.ReLU6,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch, eps=bn_eps, momentum=bn_momentum),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)
        self.out_channels = out_ch


class Backbone(nn.Module):
    """Shared interface; subclasses set `feature_dim` and implement the four hooks."""

    feature_dim: int
    head_layer: str  # state-dict prefix of the final Linear, replaced for a new set of classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def head(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def stages(self) -> list[nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset_head(self, num_classes: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def head_input_width(self) -> int:
        """Width of what the final Linear reads (the linear probe's features), from that layer itself: a method,
        not a property, since torch-pruning's state restore sets every attribute it saved."""
        return self.get_submodule(self.head_layer).in_features

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the final Linear reads (the probe fits that layer on it): the pooled features, through any
        hidden layer the head has before it."""
        return self.forward_features(x)

    def init_weights(self) -> None:
        """The initialisation torchvision uses, so `--weights none` is a fair from-scratch baseline."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)


# ---------------------------------------------------------------- MobileNetV2


class InvertedResidualV2(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(inp, hidden, kernel=1))
        layers += [
            ConvNormAct(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(Backbone):
    head_layer = "classifier.1"
    # expansion t, channels c, repeats n, first stride s
    SETTINGS = (
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)
    )

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        in_ch = make_divisible(32 * width)
        self.feature_dim = make_divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [ConvNormAct(3, in_ch, stride=2)]
        for t, c, n, s in self.SETTINGS:
            out_ch = make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidualV2(in_ch, out_ch, s if i == 0 else 1, t))
                in_ch = out_ch
        features.append(ConvNormAct(in_ch, self.feature_dim, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.feature_dim, num_classes))
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return global_pool(self.features(x))

    @property
    def head(self) -> nn.Module:
        return self.classifier

    def stages(self) -> list[nn.Module]:
        return list(self.features)

    def reset_head(self, num_classes: int) -> None:
        self.classifier[1] = nn.Linear(self.feature_dim, num_classes)
        nn.init.normal_(self.classifier[1].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[1].bias)


# ---------------------------------------------------------------- MobileNetV3


class Int8Hardswish(nn.Module):
    """x · relu6(x + 3) / 6, the same function as nn.Hardswish written with the ops whose int8 kernels XNNPACK and
    LiteRT both have (add, clamp, mul). ExecuTorch's XNNPACK partitioner takes hardswish in fp32 only, and PT2E's
    XNNPACK quantizer does not annotate it, so a plain Hardswish stays a float island between a dequantize and a
    quantize in both files and splits the .pte into several delegate partitions."""

    def __init__(self, dims: int = 4) -> None:
        super().__init__()
        # Constants of the input's rank ([1, 1, 1, 1] for a feature map), not Python scalars: litert-torch puts a
        # scalar operand's op back in NCHW between two TRANSPOSEs of the whole feature map, while a constant of the
        # input's rank stays in the NHWC layout of the rest
        self.register_buffer("three", torch.full((1,) * dims, 3.0), persistent=False)
        self.register_buffer("sixth", torch.full((1,) * dims, 1.0 / 6.0), persistent=False)

        # False once the / 6 has been moved into the weights of the linear layer that alone reads the output
        self.scaled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * nn.functional.hardtanh(x + self.three, 0.0, 6.0)
        return y * self.sixth if self.scaled else y


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)  # a mean, not adaptive pooling: see global_pool
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(scale))))
        return x * scale


class InvertedResidualV3(nn.Module):
    def __init__(self, inp: int, kernel: int, exp: int, out: int, use_se: bool, act: str, stride: int) -> None:
        super().__init__()
        act_layer = nn.Hardswish if act == "HS" else nn.ReLU
        bn = {"bn_eps": 1e-3, "bn_momentum": 0.01}
        layers: list[nn.Module] = []
        if exp != inp:
            layers.append(ConvNormAct(inp, exp, kernel=1, act=act_layer, **bn))
        layers.append(ConvNormAct(exp, exp, kernel=kernel, stride=stride, groups=exp, act=act_layer, **bn))
        if use_se:
            layers.append(SqueezeExcitation(exp, make_divisible(exp // 4)))
        layers.append(ConvNormAct(exp, out, kernel=1, act=None, **bn))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and inp == out
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res_connect else self.block(x)

    def to_int8_form(self) -> None:
        """Rewrite the squeeze-excite gate, in place and exactly, into ops int8 kernels run: hardsigmoid(y) =
        relu6(y + 3) / 6, so fc2's bias takes the + 3, a ReLU6 (fused into fc2 by every int8 runtime) replaces the
        hardsigmoid, and the / 6 moves into the projection's weights, which read the gated tensor linearly. Needs
        BatchNorm folded first (the projection's BN is then an Identity), as export does before quantizing."""
        excite = next((m for m in self.block if isinstance(m, SqueezeExcitation)), None)
        project = self.block[-1]
        if excite is not None and isinstance(excite.scale_activation, nn.Hardsigmoid):
            if not isinstance(project[1], nn.Identity) or excite.fc2.bias is None:
                raise ValueError("the squeeze-excite gate is rewritten for int8 only after BatchNorm is folded")
            with torch.no_grad():
                excite.fc2.bias += 3.0
                project[0].weight /= 6.0
            excite.scale_activation = nn.ReLU6()
        # Each Int8Hardswish inside the block feeds linear layers only, so its final / 6 (an int8 multiply over the
        # whole expanded tensor) moves into their weights: the next conv's, or the squeeze-excite's fc1 and the
        # projection's (the gated tensor is 6x larger too). Exact whatever follows each conv.
        layers = list(self.block)
        for layer, after in zip(layers, layers[1:], strict=False):
            act = layer[2] if isinstance(layer, ConvNormAct) and len(layer) > 2 else None
            if not isinstance(act, Int8Hardswish) or not act.scaled:
                continue
            with torch.no_grad():
                if isinstance(after, ConvNormAct):
                    after[0].weight /= 6.0
                elif isinstance(after, SqueezeExcitation):
                    after.fc1.weight /= 6.0
                    project[0].weight /= 6.0
                else:
                    continue
            act.scaled = False


def to_int8_form(model: nn.Module) -> nn.Module:
    """`model` (BatchNorm folded) rewritten in place, computing the same function, into the ops that both int8
    runtimes quantize whole: every Hardswish as Int8Hardswish (its / 6 moved into the next linear layer where that
    layer alone reads it), every squeeze-excite gate as a ReLU6. Backbones without them are returned as they are."""
    for module in list(model.modules()):
        flat = any(isinstance(child, nn.Linear) for child in module.children())  # a classifier's [N, C] tensors
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Hardswish):
                setattr(module, name, Int8Hardswish(2 if flat else 4))
    for module in list(model.modules()):
        if isinstance(module, InvertedResidualV3):
            module.to_int8_form()
        elif isinstance(module, MobileNetV3):
            module.fold_head_hardswish()
    return model


# (in, kernel, expanded, out, squeeze-excite, activation, stride), as in the MobileNetV3 paper
V3_LARGE = (
    (16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
    (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
    (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
    (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
    (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1),
)
V3_SMALL = (
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1),
)


class MobileNetV3(Backbone):
    head_layer = "classifier.3"

    def __init__(self, variant: str, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        config, last_channel = (V3_LARGE, 1280) if variant == "large" else (V3_SMALL, 1024)
        bn = {"bn_eps": 1e-3, "bn_momentum": 0.01}
        first = make_divisible(16 * width)
        features: list[nn.Module] = [ConvNormAct(3, first, stride=2, act=nn.Hardswish, **bn)]
        for inp, k, exp, out, se, act, stride in config:
            features.append(
                InvertedResidualV3(
                    make_divisible(inp * width), k, make_divisible(exp * width), make_divisible(out * width),
                    se, act, stride,
                )
            )
        last_in = features[-1].out_channels
        self.feature_dim = 6 * last_in
        features.append(ConvNormAct(last_in, self.feature_dim, kernel=1, act=nn.Hardswish, **bn))
        self.features = nn.Sequential(*features)
        self.hidden_dim = make_divisible(last_channel * width)
        self.classifier = nn.Sequential(
            nn.Linear(self.feature_dim, self.hidden_dim),
            nn.Hardswish(),
            nn.Dropout(dropout),
            nn.Linear(self.hidden_dim, num_classes),
        )
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return global_pool(self.features(x))

    @property
    def head(self) -> nn.Module:
        return self.classifier

    def stages(self) -> list[nn.Module]:
        return list(self.features)

    def fold_head_hardswish(self) -> None:
        """In the int8 form: the last feature map's hardswish is pooled (linear) into the hidden Linear, and the
        hidden hardswish goes through dropout (off in eval) into the final Linear, so each one's / 6 moves into that
        Linear's weights."""
        last, hidden = self.features[-1][2], self.classifier[1]
        for act, linear in ((last, self.classifier[0]), (hidden, self.classifier[3])):
            if isinstance(act, Int8Hardswish) and act.scaled:
                with torch.no_grad():
                    linear.weight /= 6.0
                act.scaled = False

    def head_input(self, x: torch.Tensor) -> torch.Tensor:
        """The pretrained hidden Linear + Hardswish (dropout is off in eval mode) before the final Linear."""
        return self.classifier[:3](self.forward_features(x))

    def reset_head(self, num_classes: int) -> None:
        self.classifier[3] = nn.Linear(self.hidden_dim, num_classes)
        nn.init.normal_(self.classifier[3].weight, 0, 0.01)
        nn.init.zeros_(self.classifier[3].bias)


# ---------------------------------------------------------------- EfficientNet-Lite0


class MBConvLite(nn.Module):
    """EfficientNet-Lite block: no squeeze-excite, ReLU6; names follow the published Lite0 state dict."""

    def __init__(self, inp: int, out: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(inp, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=1e-3, momentum=0.01)
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=1e-3, momentum=0.01)
        self._project_conv = nn.Conv2d(hidden, out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out, eps=1e-3, momentum=0.01)
        self.act = nn.ReLU6()
        self.use_res_connect = stride == 1 and inp == out
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.use_res_connect else y




class EfficientNetLite0(Backbone):
    head_layer = "_fc"
    # repeats, kernel, first stride, expansion, in, out
    STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        if width != 1.0:
            raise ValueError("EfficientNet-Lite0 has width 1.0 only")
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks = []
        for repeats, kernel, stride, expand, inp, out in self.STAGES:
            for i in range(repeats):
                blocks.append(MBConvLite(inp if i == 0 else out, out, kernel, stride if i == 0 else 1, expand))
        # A Sequential, not a ModuleList (the same state-dict names): called as one module, it appears in the
        # traced module paths, so litert-torch's tensor names say `_blocks` and a .tflite can be cut by block
        self._blocks = nn.Sequential(*blocks)
        self.feature_dim = 1280
        self._conv_head = nn.Conv2d(320, self.feature_dim, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(self.feature_dim, eps=1e-3, momentum=0.01)
        self.act = nn.ReLU6()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(self.feature_dim, num_classes)
        self.init_weights()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._blocks(self.act(self._bn0(self._conv_stem(x))))
        x = self.act(self._bn1(self._conv_head(x)))
        return global_pool(x)

    @property
    def head(self) -> nn.Module:
        return nn.Sequential(self._dropout, self._fc)

    def stages(self) -> list[nn.Module]:
        stem = nn.ModuleList([self._conv_stem, self._bn0])
        head = nn.ModuleList([self._conv_head, self._bn1])
        return [stem, *self._blocks, head]

    def reset_head(self, num_classes: int) -> None:
        self._fc = nn.Linear(self.feature_dim, num_classes)
        nn.init.normal_(self._fc.weight, 0, 0.01)
        nn.init.zeros_(self._fc.bias)


@register("mobilenet_v2")
def _mobilenet_v2(num_classes: int, width: float) -> Backbone:
    return MobileNetV2(num_classes, width)


@register("mobilenet_v3_small")
def _mobilenet_v3_small(num_classes: int, width: float) -> Backbone:
    return MobileNetV3("small", num_classes, width)


@register("mobilenet_v3_large")
def _mobilenet_v3_large(num_classes: int, width: float) -> Backbone:
    return MobileNetV3("large", num_classes, width)


@register("efficientnet_lite0")
def _efficientnet_lite0(num_classes: int, width: float) -> Backbone:
    return EfficientNetLite0(num_classes, width)


def registered() -> dict[str, Callable[[int, float], Backbone]]:
    """Every backbone's builder: the definitions in modules of their own register when first imported, named here
    as strings so that they import this module and not the reverse."""
    for module in DEFINITION_MODULES:
        importlib.import_module(module)
    return TORCH_MODELS


def build_model(backbone: str, width: float = 1.0, num_classes: int = 1000) -> Backbone:
    """A freshly initialised model; the caller loads weights and resets the head."""
    builders = registered()
    if backbone not in builders:
        raise ValueError(f"no torch definition for {backbone!r}; registered: {', '.join(builders)}")
    return builders[backbone](num_classes, width)
