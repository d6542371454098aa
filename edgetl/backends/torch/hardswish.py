"""The .pte's hardswish as one int8 XNNPACK operator instead of an add, a clamp and a multiply.

Both int8 files are made from one Q/DQ graph, in which each hardswish is written x · relu6(x + 3)
(`models.Int8Hardswish`) with its / 6 moved into the weights of the linear layer that reads it: LiteRT's XNNPACK
delegate takes int8 ADD and MUL, but not an int8 HARD_SWISH, which would split the .tflite into a partition per
hardswish. XNNPACK's own subgraph API does run an int8 hardswish (one pass, a table of 256 values); ExecuTorch's
partitioner only offers it in fp32. In the .pte the written-out form costs far more than in the .tflite (the add's
constant reaches XNNPACK through a transpose that ExecuTorch's channels-last pass inserts): MobileNetV3-Large at
128 px, 16.69 M a76 instructions per invoke against 14.48 M with the int8 hardswish.

`native_hardswish` rewrites the graph that is lowered to the .pte, not the shared one: each written-out hardswish
becomes `aten.hardswish` between the same dequantize and a quantize, and its / 6 comes back out of the weights that
took it (their per-channel weight scales × 6, the scales of the int8 tensors in between / 6: the same int8 values
and weights). The one change in arithmetic: relu6(x + 3) is no longer rounded to int8 before the multiply, one
rounding fewer than the shared graph and the .tflite. A hardswish whose / 6 cannot be followed to weights (another
operator reads the tensor) keeps the written-out form.
"""

from __future__ import annotations

import torch
import torchao.quantization.pt2e  # noqa: F401 - defines the quantized_decomposed operators named below

_aten = torch.ops.aten
_Q = torch.ops.quantized_decomposed.quantize_per_tensor.default
_DQ = torch.ops.quantized_decomposed.dequantize_per_tensor.default
_DQ_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default
_WEIGHTED = {_aten.conv2d.default, _aten.linear.default}
# Operators whose output scales with their first input, so the / 6 passes through them to the next quantize
_LINEAR_IN_INPUT = {_aten.mean.dim, _aten.flatten.using_ints, _aten.dropout.default, _aten.view.default,
                    _aten.reshape.default, _aten.adaptive_avg_pool2d.default, _aten.avg_pool2d.default}


def _constant(module: torch.fx.GraphModule, node: object) -> float | None:
    """The value of a one-element constant the graph dequantizes (or reads as is), else None."""
    if not isinstance(node, torch.fx.Node):
        return None
    scale = zero_point = None
    if node.op == "call_function" and node.target == _DQ:
        node, scale, zero_point = node.args[0], node.args[1], node.args[2]
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    value = getattr(module, node.target)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        return None
    if scale is None:
        return float(value)
    return (float(value) - float(zero_point)) * float(scale)


def _is(module: torch.fx.GraphModule, node: object, target: float) -> bool:
    """Whether `node` is a one-element constant equal to `target` (within half its int8 step)."""
    value = _constant(module, node)
    step = float(node.args[1]) if value is not None and node.op == "call_function" else 0.0
    return value is not None and abs(value - target) <= 0.5 * step + 1e-6


def _match(module: torch.fx.GraphModule, clamp: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(the input's dequantize, the product x · relu6(x + 3)) of a written-out hardswish ending in `clamp`."""
    if clamp.target != _aten.hardtanh.default or tuple(clamp.args[1:3]) != (0.0, 6.0):
        return None
    add = clamp.args[0]
    if not isinstance(add, torch.fx.Node) or add.target != _aten.add.Tensor or len(add.users) != 1:
        return None
    source, three = add.args[0], add.args[1]
    if not isinstance(source, torch.fx.Node) or source.target != _DQ:
        return None
    if not _is(module, three, 3.0):
        return None
    if len(clamp.users) != 1 or (rounded := next(iter(clamp.users))).target != _Q or len(rounded.users) != 1:
        return None
    gate = next(iter(rounded.users))
    if gate.target != _DQ or len(gate.users) != 1 or (product := next(iter(gate.users))).target != _aten.mul.Tensor:
        return None
    other = product.args[0] if product.args[1] is gate else product.args[1]
    if not isinstance(other, torch.fx.Node) or other.target != _DQ or other.args[0] is not source.args[0]:
        return None
    return source, product


def _sixth_after(module: torch.fx.GraphModule, quantized: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The multiplies by 1/6 that alone read `quantized` (a hardswish whose / 6 was not moved), else None."""
    found = []
    for dequantized in quantized.users:
        if dequantized.target != _DQ or len(dequantized.users) != 1:
            return None
        scaled = next(iter(dequantized.users))
        if scaled.target != _aten.mul.Tensor or scaled.args[0] is not dequantized:
            return None
        if not _is(module, scaled.args[1], 1.0 / 6.0):
            return None
        if len(scaled.users) != 1 or next(iter(scaled.users)).target != _Q:
            return None
        found.append(scaled)
    return found or None


def _follow(start: torch.fx.Node) -> tuple[list[torch.fx.Node], list[torch.fx.Node]] | None:
    """The quantize/dequantize nodes whose scale is divided by 6 when the tensor quantized by `start` is, and the
    weight dequantizes (per channel) that take the 6 back; None when the / 6 reaches anything else."""
    scaled_nodes: list[torch.fx.Node] = []
    weights: list[torch.fx.Node] = []
    quantizes = [start]
    seen: set[torch.fx.Node] = set()
    other_factors: list[object] = []  # the other factor of each multiply the / 6 passes through

    def value_read_by(user: torch.fx.Node, value: torch.fx.Node) -> bool:
        if user.target in _WEIGHTED and user.args[0] is value:
            weight = user.args[1]
            if not isinstance(weight, torch.fx.Node) or weight.target != _DQ_CHANNEL or len(weight.users) != 1:
                return False
            weights.append(weight)
            return True
        if user.target == _aten.mul.Tensor and value in user.args[:2] and user.args[0] is not user.args[1]:
            other_factors.append(user.args[1] if user.args[0] is value else user.args[0])
            return output_of(user)
        if user.target in _LINEAR_IN_INPUT and user.args[0] is value:
            return output_of(user)
        return False

    def output_of(node: torch.fx.Node) -> bool:
        for user in node.users:
            if user.target == _Q:
                quantizes.append(user)
            elif not value_read_by(user, node):
                return False
        return True

    while quantizes:
        quantize = quantizes.pop()
        if quantize in seen:
            continue
        seen.add(quantize)
        scaled_nodes.append(quantize)
        for dequantized in quantize.users:
            if dequantized.target != _DQ:
                return None
            scaled_nodes.append(dequantized)
            if not all(value_read_by(user, dequantized) for user in list(dequantized.users)):
                return None
    for other in other_factors:  # a product of two factors that both carry the / 6 would carry / 36
        if isinstance(other, torch.fx.Node) and other.target == _DQ and other.args[0] in seen:
            return None
    return scaled_nodes, weights


def _divide_scale(node: torch.fx.Node, by: float) -> None:
    node.args = (node.args[0], float(node.args[1]) / by, *node.args[2:])


def _multiply_weight_scales(module: torch.fx.GraphModule, weight: torch.fx.Node, by: float) -> None:
    scale = weight.args[1]
    name = f"{str(scale.target).replace('.', '_')}_hardswish"
    while hasattr(module, name):
        name += "_"
    module.register_buffer(name, getattr(module, scale.target) * by)
    with module.graph.inserting_before(weight):
        weight.replace_input_with(scale, module.graph.get_attr(name))


def native_hardswish(module: torch.fx.GraphModule) -> int:
    """Rewrite, in place, each written-out hardswish of a Q/DQ graph (weights already folded to int8) into one
    `aten.hardswish`; returns how many were rewritten."""
    rewritten = 0
    for clamp in list(module.graph.nodes):
        if clamp.op != "call_function" or (matched := _match(module, clamp)) is None:
            continue
        source, product = matched
        if len(product.users) != 1 or (quantized := next(iter(product.users))).target != _Q:
            continue
        sixths = _sixth_after(module, quantized)
        plan = None if sixths else _follow(quantized)
        if sixths is None and plan is None:
            continue
        with module.graph.inserting_before(product):
            hardswish = module.graph.call_function(_aten.hardswish.default, (source,))
        if sixths:  # the / 6 is still there: the multiply by it reads the hardswish instead
            for scaled in sixths:
                next(iter(scaled.users)).replace_input_with(scaled, hardswish)
        else:
            scaled_nodes, weights = plan
            quantized.replace_input_with(product, hardswish)
            for node in scaled_nodes:
                _divide_scale(node, 6.0)
            for weight in weights:
                _multiply_weight_scales(module, weight, 6.0)
        rewritten += 1
    if rewritten:
        module.graph.eliminate_dead_code()
        module.recompile()
    return rewritten
