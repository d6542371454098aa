"""PT2E post-training int8 quantization for XNNPACK, tuned for the MobileNet family.

Plain `XNNPACKQuantizer` PTQ lost 3-4 points of top-1 on EfficientNet-Lite0 here. Measured cause: the
quantizer does not fuse ReLU6 (`hardtanh`) into the preceding conv, it lets ReLU6 *share* the conv's
output quantization. The conv output spans e.g. [-30, 25], so the [0, 6] that survives ReLU6 gets only
~30 of the 256 levels. `ClampFusingQuantizer` observes the ReLU6 output instead (range [0, 6], all 256
levels) — which is also what XNNPACK and TFLite execute, since both fuse the clamp into the conv.
Likewise a mean (squeeze-excite, the last pooling) gets an output range of its own instead of sharing its input's:
on MobileNetV3-Small from scratch on sprites-5 the pooled features had three levels of the shared grid, and the
calibration logit error fell by 26–32% with each observer once they had their own.
Optional bias correction (Nagel et al. 2019) removes the mean output shift caused by weight rounding.

Float fallback of named layers (`float_layers`): such a layer keeps float weights and runs as a float kernel
between a dequantize of its int8 input and a quantize of its output, so every activation between layers, and
the model's input and output, stay int8 with the same observers.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable

import torch
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)
from torch import nn
from torchao.quantization.pt2e import MinMaxObserver, MovingAverageMinMaxObserver, ObserverBase
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec

ANNOTATION_KEY = "quantization_annotation"
CLAMP_OPS = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default)
CLAMP_PRODUCERS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default, torch.ops.aten.add.Tensor)
MEAN_OPS = (torch.ops.aten.mean.dim, torch.ops.aten.mean.default)


WEIGHTED_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


def module_of(node: torch.fx.Node) -> str | None:
    """Qualified name of the innermost module a graph node was traced from (torch.export's nn_module_stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


class ClampFusingQuantizer(XNNPACKQuantizer):
    """XNNPACKQuantizer that quantizes after ReLU6 rather than before it (see the module docstring), and keeps
    the weights of `float_layers` (module names) in float."""

    def __init__(self, float_layers: Iterable[str] = ()) -> None:
        super().__init__()
        self.float_layers = frozenset(float_layers)
        self.kept_float: set[str] = set()  # the float_layers found in the graph, for the caller to check

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        model = super().annotate(model)
        self._keep_float_weights(model)
        output_qspec = self.global_config.output_activation
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in CLAMP_OPS:
                continue
            producer = node.args[0]
            if not isinstance(producer, torch.fx.Node) or producer.target not in CLAMP_PRODUCERS:
                continue
            if len(producer.users) != 1:  # another user needs the unclamped value quantized
                continue
            annotation = producer.meta.get(ANNOTATION_KEY)
            if annotation is None or annotation.output_qspec is None:
                continue
            annotation.output_qspec = None
            node.meta[ANNOTATION_KEY] = QuantizationAnnotation(output_qspec=output_qspec, _annotated=True)
        self._observe_means(model, output_qspec)
        return model

    @staticmethod
    def _observe_means(model: torch.fx.GraphModule, output_qspec) -> None:
        """Give each spatial mean an output range of its own: XNNPACKQuantizer lets a mean share its input's, but the
        mean of a feature map spans a small part of that range (MobileNetV3-Small's last pooling: values up to 2.2
        on a grid of step 0.71, so three levels; its squeeze-excite means: 10–20 dB). Both runtimes' int8 mean takes
        an output scale of its own."""
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in MEAN_OPS:
                continue
            source = node.args[0]
            annotation = node.meta.get(ANNOTATION_KEY)
            if not isinstance(source, torch.fx.Node) or annotation is None or annotation.output_qspec is None:
                continue  # a mean the quantizer left float stays float
            node.meta[ANNOTATION_KEY] = QuantizationAnnotation(
                input_qspec_map={source: SharedQuantizationSpec(source)}, output_qspec=output_qspec, _annotated=True)

    def _keep_float_weights(self, model: torch.fx.GraphModule) -> None:
        """Drop the weight and bias specs of the float layers' conv/linear nodes; their input and output
        activation specs stay, so the int8 tensors around them are unchanged."""
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in WEIGHTED_OPS:
                continue
            if module_of(node) not in self.float_layers:
                continue
            annotation = node.meta.get(ANNOTATION_KEY)
            if annotation is None:
                continue
            for parameter in node.args[1:3]:
                annotation.input_qspec_map.pop(parameter, None)
            self.kept_float.add(module_of(node))


# How activation ranges are calibrated. "histogram": PT2E's default, the range that minimises the L2 error of all
# calibration values at once. "per-image": the running mean of each image's own min/max (one image per batch), so a
# few images whose activations run 100x larger than the rest do not set the range for all of them. "percentile":
# the range between the 0.01% and 99.99% quantiles of all calibration values pooled, so those few images' values are
# left out instead of averaged in.
ACTIVATION_OBSERVERS = ("histogram", "per-image", "percentile")
PER_IMAGE_AVERAGING = 0.02  # weight of each new image in the running min/max: about the last 50 images count
PERCENTILE_TAIL = 1e-4  # share of the pooled values left out at each end
PERCENTILE_SAMPLE = 131_072  # values kept per calibration batch and tensor (a seeded sample of larger tensors)


class PercentileObserver(MinMaxObserver):
    """Activation range from the PERCENTILE_TAIL and 1 - PERCENTILE_TAIL quantiles of every value observed so far.

    torchao's PT2E observers have no percentile one. The histogram observer keeps one range for all values and
    spreads its bins over it, so a few images whose activations run far outside the rest leave the bulk of the
    values too few levels (MobileNetV3-Small from scratch on sprites-5: 93% agreement with float on test images
    calibrated on 64 training images, about half on 256). The range and zero point come from MinMaxObserver, once,
    when they are asked for (the quantiles of the pool, not of each batch in turn)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.samples: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0:
            return x_orig
        values = x_orig.detach().float().flatten()
        if values.numel() > PERCENTILE_SAMPLE:
            values = values[torch.randint(0, values.numel(), (PERCENTILE_SAMPLE,), generator=self.generator)]
        self.samples.append(values)
        return x_orig

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.samples:
            low, high = torch.quantile(torch.cat(self.samples), torch.tensor([PERCENTILE_TAIL, 1 - PERCENTILE_TAIL]))
            self.min_val.copy_(low.to(self.min_val.dtype))
            self.max_val.copy_(high.to(self.max_val.dtype))
        return super().calculate_qparams()


def _observer_maker(activations: str, histogram):
    """The constructor of the activation observer named `activations` (`histogram`: the config's own)."""
    if activations not in ACTIVATION_OBSERVERS:
        raise ValueError(f"activation observer {activations!r}; valid: {', '.join(ACTIVATION_OBSERVERS)}")
    if activations == "per-image":
        return MovingAverageMinMaxObserver.with_args(averaging_constant=PER_IMAGE_AVERAGING, eps=2**-12)
    return PercentileObserver.with_args(eps=2**-12) if activations == "percentile" else histogram


class ObserverSet(ObserverBase):
    """Several activation observers fed by one calibration pass: each calibration batch goes through the network
    once, not once per observer, and each observer sees what it would alone. Before conversion, `choose_observers`
    puts one of them in the set's place; the set itself has no range to give. Only for observers fed whole batches:
    the per-image observer's running mean depends on the order in which it sees images and, where several tensors
    share one range, tensors, and that order differs in a batched pass."""

    def __init__(self, makers: tuple[tuple[str, object], ...] = (), **kwargs) -> None:
        observers = {name: maker.with_args(**kwargs)() for name, maker in makers}
        first = next(iter(observers.values()))
        super().__init__(dtype=first.dtype, is_dynamic=False)
        self.observers = nn.ModuleDict({name.replace("-", "_"): observer for name, observer in observers.items()})
        self.qscheme, self.quant_min, self.quant_max = first.qscheme, first.quant_min, first.quant_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for observer in self.observers.values():
            observer(x)
        return x

    @torch.jit.export
    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("an ObserverSet has no range of its own: choose one observer (choose_observers) first")


def choose_observers(prepared: torch.fx.GraphModule, activations: str) -> torch.fx.GraphModule:
    """A copy of the calibrated `prepared` model in which each ObserverSet is replaced by its `activations`
    observer (a set shared by several tensors gives them one shared observer), ready for `convert_pt2e`."""
    chosen = copy.deepcopy(prepared)
    for name, module in list(chosen._modules.items()):  # not named_children: it lists a shared set once
        if isinstance(module, ObserverSet):
            setattr(chosen, name, module.observers[activations.replace("-", "_")])
    return chosen


def make_quantizer(fuse_clamp: bool = True, float_layers: Iterable[str] = (),
                   activations: str | tuple[str, ...] = "histogram") -> XNNPACKQuantizer:
    """Symmetric per-channel int8 weights, per-tensor int8 activations observed as `activations` says (several
    names: an ObserverSet of those observers)."""
    float_layers = tuple(float_layers)
    if float_layers and not fuse_clamp:
        raise ValueError("float fallback of layers needs the clamp-fusing quantizer (fuse_clamp=True)")
    quantizer = ClampFusingQuantizer(float_layers) if fuse_clamp else XNNPACKQuantizer()
    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    histogram = config.input_activation.observer_or_fake_quant_ctr
    if isinstance(activations, str):
        observer = _observer_maker(activations, histogram)
    else:
        observer = ObserverSet.with_args(makers=tuple((name, _observer_maker(name, histogram))
                                                      for name in activations))
    if observer is not histogram:
        config = dataclasses.replace(
            config, input_activation=dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=observer),
            output_activation=dataclasses.replace(config.output_activation, observer_or_fake_quant_ctr=observer))
    return quantizer.set_global(config)


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of `model` with every BatchNorm folded into the conv that feeds it.

    Pairs are found by running the model once and matching each BN's input tensor with a conv's output,
    so it works for any of our backbones without knowing their layout. PT2E folds BN too; doing it here
    first lets bias correction see the weights that will actually be quantized.
    """
    model = copy.deepcopy(model).eval()
    producers: dict[int, nn.Conv2d] = {}
    pairs: list[tuple[nn.Conv2d | None, nn.BatchNorm2d]] = []
    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(lambda m, i, o: producers.__setitem__(id(o), m)))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_hook(lambda m, i, o: pairs.append((producers.get(id(i[0])), m))))
    with torch.no_grad():
        model(example)
    for hook in hooks:
        hook.remove()
    names = {module: name for name, module in model.named_modules()}
    for conv, bn in pairs:
        if conv is None:
            continue
        scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight = nn.Parameter(conv.weight.detach() * scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach())
        parent, _, attr = names[bn].rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    return model


WEIGHT_QMAX = 127  # XNNPACKQuantizer's weights: symmetric per output channel, -127..127


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel scale of the int8 grid, as PT2E's PerChannelMinMaxObserver computes it (amax / 127)."""
    dims = tuple(range(1, weight.ndim))
    return weight.abs().amax(dim=dims, keepdim=True).clamp_min(1e-12) / WEIGHT_QMAX


def fake_quant_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """Round weights to the grid XNNPACKQuantizer will use (per output channel, symmetric, ±127)."""
    scale = weight_scale(weight)
    return (weight / scale).round().clamp(-WEIGHT_QMAX, WEIGHT_QMAX) * scale


def bias_correct(model: nn.Module, calibration: torch.Tensor, float_layers: Iterable[str] = ()) -> nn.Module:
    """Quantize weights in place of PT2E and fold the mean output error of each layer into its bias.

    One forward pass over the whole calibration batch: each layer sees the input produced by the already
    corrected layers before it, so corrections do not pile up. Re-quantizing the rounded weights in PT2E
    reproduces them exactly (same per-channel max, values already on the grid). `float_layers` keep their
    float weights (and bias): PT2E will not quantize them.
    """
    keep_float = frozenset(float_layers)
    model = copy.deepcopy(model).eval()
    originals: dict[nn.Module, torch.Tensor] = {}

    def correct(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Conv2d):
            reference = nn.functional.conv2d(
                inputs[0], originals[module], module.bias, module.stride, module.padding, module.dilation,
                module.groups,
            )
            shift = (reference - output).mean(dim=(0, 2, 3))
            view = (1, -1, 1, 1)
        else:
            reference = nn.functional.linear(inputs[0], originals[module], module.bias)
            shift = (reference - output).reshape(-1, output.shape[-1]).mean(dim=0)
            view = (1, -1)
        if module.bias is None:
            module.bias = nn.Parameter(shift.clone())
        else:
            module.bias.data += shift
        return output + shift.view(view)

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear) and name not in keep_float:
            originals[module] = module.weight.detach().clone()
            module.weight.data = fake_quant_per_channel(module.weight.detach())
            hooks.append(module.register_forward_hook(correct))
    with torch.no_grad():
        model(calibration)
    for hook in hooks:
        hook.remove()
    return model


def quantize_ptq(
    model: nn.Module,
    example: torch.Tensor,
    calibration: Iterable[torch.Tensor],
    fuse_clamp: bool = True,
    float_layers: Iterable[str] = (),
    activations: str = "histogram",
) -> torch.fx.GraphModule:
    """PT2E PTQ: export with a dynamic batch, observe the calibration batches, convert to Q/DQ form.
    `float_layers`: module names whose weights stay float (each must be a conv or linear of `model`).

    `fold_quantize=False` keeps weights as float + quantize/dequantize: litert-torch needs that form, and
    ExecuTorch lowers it to the same int8 XNNPACK kernels, so both formats start from this one graph.
    """
    prepared = _prepare(model, example, fuse_clamp, float_layers, activations)
    with torch.no_grad():
        for chunk in calibration:
            for image in torch.split(chunk, 1) if activations == "per-image" else (chunk,):
                prepared(image)
    return convert_pt2e(prepared, fold_quantize=False)


def quantize_ptq_observers(model: nn.Module, example: torch.Tensor, calibration: Iterable[torch.Tensor],
                           observers: tuple[str, ...], fuse_clamp: bool = True,
                           float_layers: Iterable[str] = ()) -> dict[str, torch.fx.GraphModule]:
    """`quantize_ptq` for each activation observer in `observers`, the same graphs it makes one observer at a time:
    the observers fed whole batches share one export and one calibration pass (`ObserverSet`); the per-image one,
    fed one image at a time, keeps a pass of its own."""
    calibration = tuple(calibration)
    batched = tuple(name for name in observers if name != "per-image")
    made = {}
    if "per-image" in observers or len(batched) == 1:
        made = {name: quantize_ptq(model, example, calibration, fuse_clamp, float_layers, name)
                for name in observers if name == "per-image" or len(batched) == 1}
    if len(batched) > 1:
        prepared = _prepare(model, example, fuse_clamp, float_layers, batched)
        with torch.no_grad():
            for chunk in calibration:
                prepared(chunk)
        made.update({name: convert_pt2e(choose_observers(prepared, name), fold_quantize=False) for name in batched})
    return {name: made[name] for name in observers}


def _prepare(model: nn.Module, example: torch.Tensor, fuse_clamp: bool, float_layers: Iterable[str],
             activations: str | tuple[str, ...]) -> torch.fx.GraphModule:
    """The model exported with a dynamic batch and prepared with observers, ready for calibration."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    sample = torch.cat([example, example]) if example.shape[0] == 1 else example
    graph = torch.export.export(model, (sample,), dynamic_shapes=({0: batch},)).module()
    float_layers = tuple(float_layers)
    quantizer = make_quantizer(fuse_clamp, float_layers, activations)
    prepared = prepare_pt2e(graph, quantizer)
    missing = sorted(set(float_layers) - getattr(quantizer, "kept_float", set()))
    if missing:
        raise ValueError(f"float layer(s) not found among the quantized conv/linear nodes: {', '.join(missing)}")
    return prepared
