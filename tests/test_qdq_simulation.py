"""The Q/DQ graph's evaluation form gives its logits bit for bit, and the calibrations of several activation
observers share one preparation (bias correction once) yet equal the graphs made one at a time."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")

from edgetl.backends.torch import export as graphs_of  # noqa: E402
from edgetl.backends.torch import quantize  # noqa: E402
from edgetl.backends.torch.qdq_simulation import (  # noqa: E402
    DEQUANTIZE,
    QUANTIZE,
    has_activation_quantization,
    int8_rounding,
    simulation,
)
from tests.test_int8_form import _trained_looking as _model  # noqa: E402

SIZE = 32


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (count, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize(("scale", "zero_point"), [(0.0173, -128), (0.0173, 0), (0.31, 17), (2.5e-4, -3)])
def test_int8_rounding_equals_quantize_then_dequantize_bit_for_bit(scale: float, zero_point: int) -> None:
    generator = torch.Generator().manual_seed(1)
    levels = torch.arange(-300, 300, dtype=torch.float32)
    x = torch.cat([
        torch.randn(100_000, generator=generator) * 200 * scale,  # inside and far outside the grid
        (levels + 0.5) * scale, (levels - 0.5) * scale, levels * scale,  # ties and exact levels
        torch.tensor([0.0, -0.0, 1e30, -1e30]),
    ])
    quantized = QUANTIZE(x, scale, zero_point, -128, 127, torch.int8)
    expected = DEQUANTIZE(quantized, scale, zero_point, -128, 127, torch.int8)
    assert torch.equal(int8_rounding(x, scale, zero_point, -128, 127), expected)


@pytest.mark.torch
@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "efficientnet_lite0"])
def test_the_evaluation_form_gives_the_graphs_logits_bit_for_bit(backbone: str) -> None:
    graph, _ = graphs_of.quantize_ptq_graph(_model(backbone), torch.zeros(1, SIZE, SIZE, 3), _images(16))
    nodes_before = len(graph.graph.nodes)
    simulated = simulation(graph)
    targets = {node.target for node in simulated.graph.nodes if node.op == "call_function"}
    assert not any("quantized_decomposed" in str(target) for target in targets)  # every Q/DQ pair rewritten
    assert has_activation_quantization(graph) and not has_activation_quantization(simulated)
    assert len(graph.graph.nodes) == nodes_before  # the graph the formats are made from is untouched
    images = torch.from_numpy(_images(8, seed=2))
    with torch.no_grad():
        expected, got = graph(images), simulated(images)
    assert torch.equal(got, expected)
    assert np.array_equal(graphs_of.logits(graph, images.numpy()), expected.numpy())  # logits() runs the form


@pytest.mark.torch
def test_the_observers_calibrations_share_one_preparation(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU6(),
                              torch.nn.Conv2d(8, 8, 3, groups=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 4))
    model, example, images = graphs_of.ChannelsLastInput(net.eval()).eval(), torch.zeros(1, SIZE, SIZE, 3), _images(16)
    alone = {name: graphs_of.quantize_ptq_graph(model, example, images, activations=name)[0]
             for name in quantize.ACTIVATION_OBSERVERS}
    corrections = []
    original = graphs_of.bias_correct
    monkeypatch.setattr(graphs_of, "bias_correct", lambda *args: corrections.append(1) or original(*args))
    together = graphs_of.quantize_ptq_graphs(model, example, images, quantize.ACTIVATION_OBSERVERS)
    assert len(corrections) == 1 and list(together) == list(quantize.ACTIVATION_OBSERVERS)
    ranges = {name: [node.args[1:3] for node in graph.graph.nodes if node.target == QUANTIZE]
              for name, (graph, _) in together.items()}
    assert ranges["histogram"] != ranges["per-image"] != ranges["percentile"]  # each its own calibration
    probe = torch.from_numpy(_images(4, seed=3))
    for name, graph in alone.items():
        made, info = together[name]
        assert info["activations"].endswith(graphs_of.OBSERVED_AS[name])
        qparams = [node.args[1:3] for node in made.graph.nodes if node.target == QUANTIZE]
        assert qparams == [node.args[1:3] for node in graph.graph.nodes if node.target == QUANTIZE]
        with torch.no_grad():
            assert torch.equal(made(probe), graph(probe))


def test_learned_rounding_captures_a_layer_without_running_the_rest_of_the_network() -> None:
    from edgetl.backends.torch.adaround import _capture

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                              torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(10, 3, 16, 16)
    later_calls = []
    net[4].register_forward_hook(lambda *_: later_calls.append(1))
    for what in ("input", "output"):
        got = _capture(net, net[2], x, what, batch=4)
        with torch.no_grad():
            expected = net[1](net[0](x)) if what == "input" else net[2](net[1](net[0](x)))
        assert torch.equal(got, expected)
    assert later_calls == []  # no capture ran the layers after the one it captures
