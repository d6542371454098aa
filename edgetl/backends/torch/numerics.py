"""What the numerics debugger compares a runtime against: each block's output in the float model and in the PT2E
int8 (Q/DQ) graph, on the same images, plus each block of the Q/DQ graph lowered to a .pte of its own.

Blocks are the parts `parts.py` cuts (stem, every inverted-residual block, head), found by module path in both
graphs, so a block of the float model and of the int8 graph hold the same layers. Values leave as numpy arrays in
the layout the runtimes use: NHWC for feature maps, [N, classes] for logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx, nn

from edgetl.backends.torch import parts as cut
from edgetl.backends.torch.export import lower_pte, pte_graph


@dataclass
class BlockSignals:
    """One block: its output in the float model and in the int8 graph, what it reads in the int8 graph (as its own
    .pte takes it), and the keys that chain a block's outputs to the next block's inputs."""

    name: str
    role: str
    float_output: np.ndarray | None
    graph_output: np.ndarray
    graph_inputs: list[np.ndarray]
    input_keys: list[str]
    output_key: str
    step: float | None  # the int8 grid's step (scale) of the block's output; None for a float output
    macs: int = 0
    pte: bytes | None = None
    # the block's output in the graph its .pte was lowered from, where that differs from the shared graph (each
    # hardswish as one int8 operator, `hardswish.native_hardswish`: one rounding fewer); None where it is the same
    lowered_output: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


def _key(node: fx.Node) -> str:
    """One name per quantized tensor: a dequantize stands for the quantize it reads."""
    return (node.args[0] if node.target is cut.DEQUANTIZE else node).name


def _runtime_layout(value: object, node: fx.Node) -> np.ndarray:
    """A graph value as the runtimes hold it: 4-D feature maps NHWC (the model's own input already is)."""
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if tensor.dim() == 4 and node.op != "placeholder":
        tensor = tensor.permute(0, 2, 3, 1)
    return tensor.detach().float().contiguous().numpy()


def _float_outputs(float_model: nn.Module, images: torch.Tensor) -> dict[str, tuple[fx.Node, np.ndarray]]:
    """Each block's output in the float model: block name → (node, value)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    sample = torch.cat([images[:1], images[:1]])
    graph = torch.export.export(float_model, (sample,), dynamic_shapes=({0: batch},)).module()
    fixed = cut.constants(graph)
    blocks = cut.split(graph, fixed)
    part_of = {node: index for index, part in enumerate(blocks) for node in part.nodes}
    values = cut._values(graph, images)
    found = {}
    for index, part in enumerate(blocks):
        node = cut._outputs(part, part_of, index)[-1]
        found[part.name] = (node, _runtime_layout(values[node], node))
    return found


def block_names(float_model: nn.Module, example: torch.Tensor) -> list[str]:
    """The blocks' names, in order, as `block_signals` names them (the float model's cut: the int8 graph's blocks
    take the same module paths)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    graph = torch.export.export(float_model, (torch.cat([example, example]),), dynamic_shapes=({0: batch},)).module()
    return [part.name for part in cut.split(graph, cut.constants(graph))]


def block_signals(float_model: nn.Module, int8_graph: fx.GraphModule, images: np.ndarray,
                  lower: bool = True, selected: tuple[str, ...] = ()) -> list[BlockSignals]:
    """The float model's and the int8 graph's value at every block boundary on `images` (NHWC float32), and with
    `lower` each int8 block (each `selected` one, when any is) as a .pte of its own (batch 1, like the exported
    file)."""
    batch = torch.from_numpy(np.ascontiguousarray(images))
    graph_values = cut._values(int8_graph, batch)
    blocks = cut.build(int8_graph, batch[:1])
    floats = _float_outputs(float_model, batch)
    signals = []
    for block in blocks:
        output = block.output_nodes[-1]
        step = float(output.args[1]) if output.target is cut.DEQUANTIZE else None
        float_output = floats.get(block.name)
        signal = BlockSignals(
            name=block.name, role=block.role,
            float_output=float_output[1] if float_output else None,
            graph_output=_runtime_layout(graph_values[output], output),
            graph_inputs=[_runtime_layout(graph_values[node], node) for node in block.input_nodes],
            input_keys=[_key(node) for node in block.input_nodes], output_key=_key(output), step=step,
            macs=block.macs)
        if float_output is None:
            signal.notes.append("the float model has no block of this name")
        if lower and (not selected or block.name in selected):
            try:
                signal.pte, _ = lower_pte(block.module, block.inputs)
            except Exception as error:  # noqa: BLE001 - one block that cannot be lowered is reported, not fatal
                signal.notes.append(f"its .pte could not be lowered ({type(error).__name__}: {error})")
            else:
                signal.lowered_output = _as_lowered(block.module, signal.graph_inputs)
        signals.append(signal)
    return signals


def _as_lowered(block: fx.GraphModule, inputs: list[np.ndarray]) -> np.ndarray | None:
    """The block's output computed by the graph `lower_pte` lowers it from (weights folded to int8, each written-out
    hardswish as one operator), on the shared graph's inputs to it; None when that graph is the shared one. A cut
    block reads and returns the runtimes' layout, as its .pte does."""
    lowered, rewritten = pte_graph(block)  # folding works on a copy: the block is left as it is
    if not rewritten:
        return None
    with torch.no_grad():
        value = lowered(*(torch.from_numpy(np.ascontiguousarray(array)) for array in inputs))
    value = value[-1] if isinstance(value, tuple | list) else value
    return value.detach().float().contiguous().numpy()
