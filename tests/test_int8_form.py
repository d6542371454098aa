"""MobileNetV3 in int8 with no float island: hardswish, the squeeze-excite gate and the poolings are written as ops
both int8 runtimes take whole, the rewrite computes the same function, the .tflite holds int8 operators only, the
.pte lowers as one XNNPACK partition that runs every op in int8 (read back from the partition's own graph), and each
runtime's output equals the Q/DQ graph's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")

from edgetl.backends.torch.export import (  # noqa: E402
    ChannelsLastInput,
    convert_tflite,
    logits,
    lower_pte,
    quantize_ptq_graph,
)
from edgetl.backends.torch.models import Int8Hardswish, build_model, to_int8_form  # noqa: E402
from edgetl.backends.torch.quantize import fold_batchnorm  # noqa: E402

SIZE = 32


def _trained_looking(backbone: str) -> torch.nn.Module:
    """A model whose BatchNorm statistics and affine terms are not the identity, as after training."""
    torch.manual_seed(0)
    model = build_model(backbone, 1.0, num_classes=4)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return ChannelsLastInput(model.eval()).eval()


@pytest.mark.torch
@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_the_int8_form_computes_the_same_function(backbone: str) -> None:
    model = _trained_looking(backbone)
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (4, SIZE, SIZE, 3)).astype(np.float32))
    folded = fold_batchnorm(model, x[:1])
    with torch.no_grad():
        expected = folded(x)
        rewritten = to_int8_form(folded)
        got = rewritten(x)
    assert not any(isinstance(m, torch.nn.Hardswish | torch.nn.Hardsigmoid) for m in rewritten.modules())
    assert any(isinstance(m, Int8Hardswish) for m in rewritten.modules())
    assert got.shape == expected.shape == (4, 4) and torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="after BatchNorm is folded"):
        to_int8_form(_trained_looking(backbone))  # the gate's / 6 needs the projection's BN folded away


def _tflite_ops(payload: bytes) -> list[tuple[str, int]]:
    """(operator name, output tensor type) of every operator of a single-subgraph .tflite."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(payload, 0)
    names = {value: key for key, value in vars(schema.BuiltinOperator).items() if not key.startswith("_")}
    sub = model.subgraphs[0]
    made = []
    for op in sub.operators:
        code = model.operatorCodes[op.opcodeIndex]
        made.append((names[max(code.builtinCode, code.deprecatedBuiltinCode)], sub.tensors[op.outputs[0]].type))
    return made


@pytest.mark.torch
def test_mobilenet_v3_int8_has_no_float_island_and_each_runtime_gives_the_graphs_output(tmp_path: Path) -> None:
    from ai_edge_litert import schema_py_generated as schema

    from edgetl import formats

    model = _trained_looking("mobilenet_v3_small")
    rng = np.random.default_rng(1)
    calibration = rng.uniform(-1, 1, (32, SIZE, SIZE, 3)).astype(np.float32)
    example = torch.zeros(1, SIZE, SIZE, 3)
    graph, _ = quantize_ptq_graph(model, example, calibration)

    tflite = convert_tflite(graph, example, quantized=True)
    ops = _tflite_ops(tflite)
    floats = [name for name, kind in ops if kind == schema.TensorType.FLOAT32]
    assert floats == [] and not any(name in ("DEQUANTIZE", "QUANTIZE", "TRANSPOSE") for name, _ in ops), ops
    assert {"HARD_SWISH", "LOGISTIC"}.isdisjoint(name for name, _ in ops)  # hardswish as int8 add/mul
    payload, delegation = lower_pte(graph, example)
    assert delegation["subgraphs"] == 1 and delegation["compute_ops_outside"] == []
    # Inside the partition, as XNNPACK runs it: every op int8, and no conversion but the image's into int8 and the
    # logits' out of it. Each of the 19 hardswishes is XNNPACK's int8 one (it was an add, a clamp and a multiply,
    # the add once a float add between two conversions); what adds and multiplies remain are the residual
    # connections and the squeeze-excite gates
    nodes = delegation["xnnpack_nodes"]
    assert delegation["xnnpack_float_compute"] == {} and delegation["xnnpack_conversions"] == 2, nodes
    assert delegation["int8_hardswish"] == nodes["XNNHardswish"] == 19, nodes
    assert nodes["XNNAdd"] == 6 and nodes["XNNMultiply"] == 9, nodes

    images = rng.uniform(-1, 1, (8, SIZE, SIZE, 3)).astype(np.float32)
    expected = logits(graph, images).reshape(len(images), -1)
    output_step = float(next(n for n in reversed(graph.graph.nodes) if "dequantize_per_tensor" in str(n.target))
                        .args[1])
    for name, data in (("m.tflite", tflite), ("m.pte", payload)):
        path = tmp_path / name
        path.write_bytes(data)
        got = formats.run(path, images)
        assert np.abs(got - expected).max() <= 2 * output_step + 1e-6, name  # rounding, not another function
        if name.endswith(".tflite"):  # one XNNPACK delegate node from input to output, means with their own ranges
            assert formats.describe(path)["delegation"]["whole_graph_delegated"], name
        assert (got.argmax(1) == expected.argmax(1)).all(), name


@pytest.mark.torch
def test_a_pte_whose_partitions_cannot_be_read_back_is_still_made_and_says_so(monkeypatch) -> None:
    """Reading the partitions back (flatc) only describes the file: without flatc the .pte is made all the same."""
    from edgetl.backends.torch import xnnpack_graph

    def no_flatc() -> str:
        raise FileNotFoundError("no executable flatc: neither ExecuTorch's nor one on PATH")

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    example = torch.zeros(1, 3, 8, 8)
    read, read_info = lower_pte(net, example)
    assert read_info["xnnpack_float_compute"]["XNNConv2d"] == 1 and "xnnpack_unread" not in read_info
    monkeypatch.setattr(xnnpack_graph, "_flatc", no_flatc)
    payload, delegation = lower_pte(net, example)
    assert payload == read and delegation["subgraphs"] == 1
    assert delegation["xnnpack_nodes"] is None and delegation["xnnpack_unread"].startswith("FileNotFoundError")


class _ConvHardswish(torch.nn.Module):
    """A conv and a written-out hardswish that is the output (as where `--parts` cuts a block)."""

    def __init__(self, scaled: bool) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act = Int8Hardswish()
        self.act.scaled = scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class _SelfGated(torch.nn.Module):
    """A written-out hardswish whose output is multiplied by its own mean: both factors would carry the / 6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act = Int8Hardswish()
        self.act.scaled = False
        self.out = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        return self.out(y * y.mean((2, 3), keepdim=True))


@pytest.mark.torch
def test_the_pte_hardswish_keeps_every_int8_weight_and_only_moves_a_sixth_it_can_follow() -> None:
    """The .pte's rewrite: the same int8 weights, scales moved by exactly 6, the same function up to the one
    rounding it drops; a hardswish whose / 6 reaches no weights (a cut block's output) keeps the written-out form,
    one whose / 6 was never moved is rewritten with it."""
    import copy

    from edgetl.backends.torch.export import _fold_weight_quantization
    from edgetl.backends.torch.hardswish import native_hardswish

    rng = np.random.default_rng(2)
    calibration = rng.uniform(-1, 1, (32, SIZE, SIZE, 3)).astype(np.float32)
    graph, _ = quantize_ptq_graph(_trained_looking("mobilenet_v3_small"), torch.zeros(1, SIZE, SIZE, 3), calibration)
    shared = _fold_weight_quantization(graph)
    lowered = copy.deepcopy(shared)
    assert native_hardswish(lowered) == 19
    kinds = [node.target for node in lowered.graph.nodes if node.op == "call_function"]
    assert kinds.count(torch.ops.aten.hardswish.default) == 19 and torch.ops.aten.hardtanh.default in kinds  # gates

    def int8_constants(module: torch.nn.Module) -> list[torch.Tensor]:
        return [value for _, value in sorted(module.named_buffers()) if value.dtype == torch.int8]

    assert all(torch.equal(a, b) for a, b in zip(int8_constants(shared), int8_constants(lowered), strict=True))
    images = torch.from_numpy(rng.uniform(-1, 1, (16, SIZE, SIZE, 3)).astype(np.float32))
    expected, got = shared(images), lowered(images)
    output_step = float(next(n for n in reversed(graph.graph.nodes) if "dequantize_per_tensor" in str(n.target))
                        .args[1])
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert (got - expected).abs().max() <= 8 * output_step  # one rounding fewer per hardswish, not a new function

    for small_model, rewritten in ((_ConvHardswish(False), 0), (_ConvHardswish(True), 1), (_SelfGated(), 0)):
        torch.manual_seed(0)
        small = ChannelsLastInput(small_model.eval()).eval()
        cut, _ = quantize_ptq_graph(small, torch.zeros(1, SIZE, SIZE, 3), calibration)
        folded = _fold_weight_quantization(cut)
        before = folded(images)
        assert native_hardswish(folded) == rewritten
        if rewritten:
            payload, delegation = lower_pte(cut, torch.zeros(1, SIZE, SIZE, 3))
            assert delegation["xnnpack_nodes"].get("XNNHardswish") == 1 and delegation["xnnpack_float_compute"] == {}
        step = float(next(n for n in reversed(cut.graph.nodes) if "dequantize_per_tensor" in str(n.target)).args[1])
        assert (folded(images) - before).abs().max() <= 2 * step



class _Pooled(torch.nn.Module):
    """A feature map that varies over space (no bias to dominate it), pooled by a mean into a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.conv(x)).mean((2, 3), keepdim=True).flatten(1))


def _pooling_rounding_error(graph: torch.fx.GraphModule, images: torch.Tensor) -> torch.Tensor:
    """The mean squared error that the int8 round trip of the last pooling (mean → quantize → dequantize) adds to
    the pooled features the classifier reads."""
    from torch import fx

    pooled = [node for node in graph.graph.nodes if node.target == torch.ops.aten.mean.dim][-1]
    read = next(iter(next(iter(pooled.users)).users))
    kept: dict = {}

    class Keep(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            value = super().run_node(node)
            if node in (pooled, read):
                kept[node] = value
            return value

    with torch.no_grad():
        Keep(graph).run(images)
    return (kept[read] - kept[pooled]).pow(2).mean()


@pytest.mark.torch
def test_each_spatial_mean_is_quantized_on_a_range_of_its_own(monkeypatch) -> None:
    """XNNPACKQuantizer lets a mean share its input's int8 grid; the mean of a feature map spans a small part of
    it. Every mean now has a grid of its own: each of MobileNetV3-Small's (the squeeze-excite gates' and the last
    pooling), and on a feature map that varies over space, rounding the pooled features the classifier reads adds
    far less error than on the shared grid."""
    from edgetl.backends.torch.quantize import ClampFusingQuantizer

    rng = np.random.default_rng(3)
    calibration = rng.uniform(-1, 1, (32, SIZE, SIZE, 3)).astype(np.float32)
    example = torch.zeros(1, SIZE, SIZE, 3)
    graph, _ = quantize_ptq_graph(_trained_looking("mobilenet_v3_small"), example, calibration)
    means = [node for node in graph.graph.nodes if node.target == torch.ops.aten.mean.dim]
    assert len(means) == 10  # nine squeeze-excite gates and the last pooling
    steps = []
    for mean in means:
        source, quantized = mean.args[0], next(iter(mean.users))
        assert "dequantize_per_tensor" in str(source.target) and "quantize_per_tensor" in str(quantized.target)
        steps.append((float(quantized.args[1]), float(source.args[1])))
    # at 32 px the first six means pool maps of 8 × 8 or 2 × 2 (a finer grid); the last four pool 1 × 1 maps, where
    # the mean is its input and so is its range
    assert all(own < shared for own, shared in steps[:6]) and all(own <= shared for own, shared in steps[6:]), steps

    torch.manual_seed(0)
    pooled = ChannelsLastInput(_Pooled().eval()).eval()
    own, _ = quantize_ptq_graph(pooled, example, calibration)
    mean = next(node for node in own.graph.nodes if node.target == torch.ops.aten.mean.dim)
    assert float(next(iter(mean.users)).args[1]) < 0.25 * float(mean.args[0].args[1])  # 4x finer at least
    monkeypatch.setattr(ClampFusingQuantizer, "_observe_means", staticmethod(lambda model, spec: None))
    shared, _ = quantize_ptq_graph(pooled, example, calibration)
    images = torch.from_numpy(rng.uniform(-1, 1, (16, SIZE, SIZE, 3)).astype(np.float32))
    own_error, shared_error = _pooling_rounding_error(own, images), _pooling_rounding_error(shared, images)
    assert own_error < 0.1 * shared_error, (own_error, shared_error)


@pytest.mark.torch
def test_the_debugger_compares_each_pte_block_with_the_graph_it_was_lowered_from(tmp_path: Path) -> None:
    """A .pte block runs each hardswish as one int8 operator, one rounding fewer than the shared graph, so the
    debugger's reference for it is that block as lowered (computed in torch): the runtime gives it exactly, while
    the shared graph's output lies a step away in places, which on a real network read as a departure."""
    from edgetl import numerics
    from edgetl.backends.torch.numerics import block_signals

    model = _trained_looking("mobilenet_v3_small")
    rng = np.random.default_rng(4)
    calibration = rng.uniform(-1, 1, (32, SIZE, SIZE, 3)).astype(np.float32)
    graph, _ = quantize_ptq_graph(model, torch.zeros(1, SIZE, SIZE, 3), calibration)
    signals = block_signals(model, graph, calibration[:8], lower=True, selected=("features.4",))
    signal = next(s for s in signals if s.name == "features.4")
    assert signal.pte is not None and signal.lowered_output is not None
    assert all(s.lowered_output is None for s in signals if s.name != "features.4")  # only the selected is lowered
    runner = numerics.PteBlocks(tmp_path / "m.pte", signals, tmp_path)
    got = runner.run("features.4", signal.graph_inputs).reshape(signal.graph_output.shape)
    assert numerics.departure(got, runner.expected(signal), signal.step)["steps_max"] == 0.0
    assert np.abs(signal.lowered_output - signal.graph_output).max() >= 0.99 * signal.step  # not the shared graph
    assert numerics.TfliteBlocks.expected(signal) is signal.graph_output  # the .tflite is the shared graph's
