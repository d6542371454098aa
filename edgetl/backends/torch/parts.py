"""Each network block of an exported model as a graph of its own, for counting where a .pte's instructions go.

A .pte keeps its graph inside an opaque XNNPACK payload, so it cannot be cut after the fact the way a .tflite
can. Instead the very graph a .pte is lowered from (the float model, or its one PT2E Q/DQ graph) is cut into
blocks here and each block is lowered on its own: same operators, same weights, same scales and zero-points.

Blocks come from the module each node was traced from (torch.export's `nn_module_stack`): every inverted-residual
or MBConv block is a part; what comes before the first is the stem, what comes after the last the head. A
quantize/dequantize node goes with the node whose output it converts, so every cut lies on a float tensor that the
producing part has already quantized and dequantized; the consuming part starts with the same quantize/dequantize
(same scale and zero-point), which gives back exactly the same int8 values. So a part reads and returns float, like
the whole model, and pays one extra quantize of its input and dequantize of its output: part of the per-part
overhead the breakdown states. Tensors cross a cut as NHWC, the layout XNNPACK computes in (and the model's own
input has), so the permutes at a part's edges fold into the delegate.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from edgetl.backbones import is_block_class
from edgetl.backends.torch import quantize as _registers_quantized_decomposed_ops  # noqa: F401

QUANTIZE = torch.ops.quantized_decomposed.quantize_per_tensor.default
DEQUANTIZE = torch.ops.quantized_decomposed.dequantize_per_tensor.default
WEIGHTED = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
PERMUTE = torch.ops.aten.permute.default
_CHILD = re.compile(r"^(?:model\.)?(?P<path>[\w]+\.\d+)")  # `model.features.3.conv.0` → `features.3`


@dataclass
class GraphPart:
    """One block: its name and role, its nodes (in graph order) and, once built, its module and example inputs."""

    name: str
    role: str  # stem, block or head
    nodes: list[fx.Node] = field(default_factory=list)
    module: fx.GraphModule | None = None
    inputs: tuple[torch.Tensor, ...] = ()
    macs: int = 0
    # the whole graph's nodes whose values the part's inputs and outputs carry (in order), so the part can be fed
    # and checked against the whole graph run on other images (the numerics debugger)
    input_nodes: list[fx.Node] = field(default_factory=list)
    output_nodes: list[fx.Node] = field(default_factory=list)


def _block_of(node: fx.Node) -> str | None:
    """`features.3` for a node inside an inverted-residual (or MBConv) block, else None."""
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        if is_block_class(cls_name):
            return path.removeprefix("model.")
    return None


def _child_of(node: fx.Node) -> str | None:
    """`features.0` / `classifier.1`: the numbered child module a node sits in, for naming a stem or a head."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    for path, _ in stack:
        found = _CHILD.match(path)
        if found:
            return found["path"]
    return None


def _owner_source(node: fx.Node) -> fx.Node | None:
    """The node whose part a quantize/dequantize (or any node without a module) joins: its first input's."""
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op in ("call_function", "placeholder"):
            return arg
    return None


def constants(graph: fx.GraphModule) -> set[fx.Node]:
    """Nodes computed from weights alone (get_attr, and e.g. a weight's quantize/dequantize): every part that reads
    one gets its own copy, so they belong to no part."""
    found: set[fx.Node] = set()
    for node in graph.graph.nodes:
        if node.op == "get_attr" or (node.op == "call_function" and node.all_input_nodes
                                     and all(arg in found for arg in node.all_input_nodes)):
            found.add(node)
    return found


def split(graph: fx.GraphModule, fixed: set[fx.Node] | None = None) -> list[GraphPart]:
    """The stem, each block and the head of `graph`, each with its call_function nodes in graph order (`fixed`:
    `constants(graph)`, when the caller has it already)."""
    fixed = constants(graph) if fixed is None else fixed
    nodes = [n for n in graph.graph.nodes if n.op == "call_function" and n not in fixed]
    owner: dict[fx.Node, str | None] = {}
    for node in nodes:
        traced = bool(node.meta.get("nn_module_stack")) and node.target not in (QUANTIZE, DEQUANTIZE)
        if traced:  # a node of the model's own modules: its block, or none (stem and head layers)
            owner[node] = _block_of(node)
        else:  # a quantize/dequantize (or a layout node) converts its input: it goes with that input's part
            source = _owner_source(node)
            owner[node] = owner.get(source) if source is not None else None
    blocks = [n for n in nodes if owner[n] is not None]
    if not blocks:
        raise ValueError("no inverted-residual block in the graph: it cannot be cut into blocks")
    first, last = nodes.index(blocks[0]), nodes.index(blocks[-1])
    parts: list[GraphPart] = []
    for index, node in enumerate(nodes):
        role = "stem" if index < first else "head" if index > last else "block"
        name = owner[node] if role == "block" else role
        if role == "block" and owner[node] is None:  # a module-less node between blocks joins the one before
            name = parts[-1].name
        if not parts or parts[-1].name != name:
            if any(p.name == name for p in parts):
                raise ValueError(f"the nodes of {name} are not contiguous; cannot cut the graph into blocks")
            parts.append(GraphPart(name, role))
        parts[-1].nodes.append(node)
    for part in parts:
        if part.role != "block":  # named after the numbered modules holding its convs and linears, as a .tflite's
            weighted = [n for n in part.nodes if n.target in WEIGHTED]
            children = list(dict.fromkeys(c for c in map(_child_of, weighted) if c is not None))
            unnamed = any(_child_of(n) is None for n in weighted) or not children
            part.name = "+".join(([part.role] if unnamed and part.role == "stem" else []) + children
                                 + ([part.role] if unnamed and part.role == "head" else [])) or part.role
    return parts


def _values(graph: fx.GraphModule, example: torch.Tensor) -> dict[fx.Node, object]:
    """Every node's value when `graph` runs on `example` (boundary inputs for the parts, and MAC counts)."""
    seen: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            value = super().run_node(node)
            seen[node] = value
            return value

    with torch.no_grad():
        Recorder(graph).run(example)
    return seen


def build(graph: fx.GraphModule, example: torch.Tensor) -> list[GraphPart]:
    """`split`, then each part as a GraphModule of its own with example inputs and MACs per image."""
    fixed = constants(graph)
    parts = split(graph, fixed)
    values = _values(graph, example)
    part_of = {node: index for index, part in enumerate(parts) for node in part.nodes}
    for index, part in enumerate(parts):
        _Builder(graph, part, index, part_of, fixed, values).build()
    return parts


class _Builder:
    """Copies one part's nodes into a graph of its own: what it reads from earlier parts becomes an input (requantized
    with the producer's scale when the producer dequantized it), a weight's own computation is copied in."""

    def __init__(self, graph: fx.GraphModule, part: GraphPart, index: int, part_of: dict[fx.Node, int],
                 fixed: set[fx.Node], values: dict[fx.Node, object]) -> None:
        self.graph, self.part, self.index, self.part_of = graph, part, index, part_of
        self.fixed, self.values = fixed, values
        self.new = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.inputs: list[torch.Tensor] = []
        self.received: dict[fx.Node, fx.Node] = {}  # the producer's node → this part's input

    def receive(self, node: fx.Node) -> fx.Node:
        if node in self.env:
            return self.env[node]
        if node.op == "get_attr":
            self.env[node] = self.new.get_attr(node.target)
        elif node in self.fixed:  # a weight's own computation (e.g. its quantize): copied into this part
            self.env[node] = self.new.node_copy(node, self.receive)
        else:
            source = node.args[0] if node.target is DEQUANTIZE else node  # requantize what the producer dequantized
            if source not in self.received:
                value = self.values[node]  # every dequantize of one quantize holds the same value
                placeholder = self.new.placeholder(f"input_{len(self.inputs)}")
                cut = node.op != "placeholder"  # the model's own input stays as the model takes it (NHWC)
                if cut and isinstance(value, torch.Tensor) and value.dim() == 4:  # NHWC across a cut
                    value = value.permute(0, 2, 3, 1).contiguous()
                    placeholder = self.new.call_function(PERMUTE, (placeholder, [0, 3, 1, 2]))
                self.received[source] = placeholder
                self.inputs.append(value)
                self.part.input_nodes.append(node)
            if node.target is DEQUANTIZE:
                quantize = self.new.call_function(QUANTIZE, (self.received[source], *source.args[1:]))
                self.env[node] = self.new.call_function(DEQUANTIZE, (quantize, *node.args[1:]))
            else:
                self.env[node] = self.received[source]
        return self.env[node]

    def _nhwc(self, node: fx.Node) -> fx.Node:
        """A 4-D output leaves the part as NHWC (XNNPACK's own layout, so the permute costs nothing inside it;
        an NCHW output of 1×1 spatial size also trips ExecuTorch's output resize); anything else as it is."""
        value = self.values.get(node)
        if isinstance(value, torch.Tensor) and value.dim() == 4 and any(u.op != "output" for u in node.users):
            return self.new.call_function(PERMUTE, (self.env[node], [0, 2, 3, 1]))
        return self.env[node]

    def build(self) -> None:
        part = self.part
        for node in part.nodes:
            for arg in node.all_input_nodes:
                if arg not in self.env and self.part_of.get(arg) != self.index:
                    self.receive(arg)
            self.env[node] = self.new.node_copy(node, self.env.__getitem__)
        part.output_nodes = _outputs(part, self.part_of, self.index)
        outputs = [self._nhwc(n) for n in part.output_nodes]
        self.new.output(tuple(outputs) if len(outputs) > 1 else outputs[0])
        part.module = fx.GraphModule(self.graph, self.new)
        part.inputs = tuple(self.inputs)
        part.macs = sum(_macs(node, self.values) for node in part.nodes)


def _outputs(part: GraphPart, part_of: dict[fx.Node, int], index: int) -> list[fx.Node]:
    """The nodes of `part` that a later part or the graph's output reads (one dequantize per quantize)."""
    outputs: list[fx.Node] = []
    sent: set[fx.Node] = set()
    for node in part.nodes:
        read_later = any(user.op == "output" or part_of.get(user, index) != index for user in node.users)
        if not read_later:
            continue
        key = node.args[0] if node.target is DEQUANTIZE else node
        if key not in sent:
            sent.add(key)
            outputs.append(node)
    if not outputs:
        raise ValueError(f"part {part.name} has no output")
    return outputs


def _macs(node: fx.Node, values: dict[fx.Node, object]) -> int:
    """Multiply-accumulates per image of a conv or linear node, from the shapes seen on the example."""
    if node.target not in WEIGHTED:
        return 0
    output, weight = values.get(node), values.get(node.args[1])
    if not isinstance(output, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return 0
    return int(output[0].numel() * weight[0].numel())
