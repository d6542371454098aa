"""The Q/DQ graph in the form it is evaluated in: the same numbers, in fewer passes over each feature map.

PT2E writes each activation's int8 rounding as quantize (multiply, round, add, clamp, cast to int8) followed by
dequantize (cast, subtract, multiply): eight passes and two dtype conversions per tensor, and each weight is
dequantized again on every call. At 224 px that made one pass of 64 images through EfficientNet-Lite0's Q/DQ graph
2.6 times as slow as the float model (8.0 s against 3.1 s, one thread, 2026-12-07), and the label-free remedies
(ranges, equalization, the observer choice) judge every candidate by such passes. Here each quantize/dequantize
pair becomes `round(x / scale)` clamped to the int8 levels minus the zero point, times the scale: the same
float32 operations in the same order (1 / scale as PT2E computes it, the zero point added and taken away exactly),
so the logits are bit for bit the graph's; and each weight is dequantized once. Only for evaluation: the formats
are made from the Q/DQ graph itself.
"""

from __future__ import annotations

import copy

import torch

QUANTIZE = torch.ops.quantized_decomposed.quantize_per_tensor.default
DEQUANTIZE = torch.ops.quantized_decomposed.dequantize_per_tensor.default
DEQUANTIZE_PER_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default


def int8_rounding(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> torch.Tensor:
    """dequantize(quantize(x)) of PT2E's decomposed ops, in four passes: clamp(round(x * (1 / scale)) + zp,
    quant_min, quant_max) - zp equals clamp(round(x * (1 / scale)), quant_min - zp, quant_max - zp) exactly for
    every value an int8 grid can hold."""
    rounded = x * (1.0 / scale)
    rounded.round_()
    rounded.clamp_(quant_min - zero_point, quant_max - zero_point)
    return rounded.mul_(scale)


def has_activation_quantization(module: torch.nn.Module) -> bool:
    """Whether `module` is a Q/DQ graph with activation quantizers (what `simulation` rewrites)."""
    return isinstance(module, torch.fx.GraphModule) and any(
        node.op == "call_function" and node.target == QUANTIZE for node in module.graph.nodes)


def simulation(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of the Q/DQ `graph` that computes the same logits faster (module docstring): constant weights and
    operands quantized and dequantized once, each activation's quantize/dequantize pair as one `int8_rounding`."""
    from torchao.quantization.pt2e.constant_fold import constant_fold

    simulated = copy.deepcopy(graph)
    constant_fold(simulated)  # each weight's quantize on its float constant: an int8 constant
    nodes = simulated.graph
    erased: set[torch.fx.Node] = set()
    for number, node in enumerate(list(nodes.nodes)):
        if node.op != "call_function" or node in erased:
            continue
        if node.target in (DEQUANTIZE, DEQUANTIZE_PER_CHANNEL) and \
                all(arg.op == "get_attr" for arg in node.all_input_nodes):  # a weight or a constant operand
            args = [getattr(simulated, arg.target) if isinstance(arg, torch.fx.Node) else arg for arg in node.args]
            name = f"_dequantized_weight_{number}"
            simulated.register_buffer(name, node.target(*args))
            with nodes.inserting_before(node):
                node.replace_all_uses_with(nodes.get_attr(name))
            nodes.erase_node(node)
        elif node.target == QUANTIZE and isinstance(node.args[1], float) and isinstance(node.args[2], int):
            readers = list(node.users)
            if not readers or any(reader.target != DEQUANTIZE or tuple(reader.args[1:]) != tuple(node.args[1:])
                                  for reader in readers):
                continue  # an int8 tensor read as such (or on other parameters) stays as PT2E wrote it
            with nodes.inserting_after(node):
                rounded = nodes.call_function(int8_rounding, tuple(node.args[:5]))
            for reader in readers:
                reader.replace_all_uses_with(rounded)
                nodes.erase_node(reader)
                erased.add(reader)
            nodes.erase_node(node)
    nodes.eliminate_dead_code()
    simulated.recompile()
    return simulated
