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
    # Inside the partition, as XNNPACK runs it: every add int8 (the hardswish's relu6(x + 3) was a float add
    # between two conversions), and no conversion but the image's into int8 and the logits' out of it
    nodes = delegation["xnnpack_nodes"]
    assert delegation["xnnpack_float_compute"] == {} and delegation["xnnpack_conversions"] == 2, nodes
    assert nodes["XNNAdd"] >= 10 and nodes["XNNMultiply"] >= 10

    images = rng.uniform(-1, 1, (8, SIZE, SIZE, 3)).astype(np.float32)
    expected = logits(graph, images).reshape(len(images), -1)
    output_step = float(next(n for n in reversed(graph.graph.nodes) if "dequantize_per_tensor" in str(n.target))
                        .args[1])
    for name, data in (("m.tflite", tflite), ("m.pte", payload)):
        path = tmp_path / name
        path.write_bytes(data)
        got = formats.run(path, images)
        assert np.abs(got - expected).max() <= 2 * output_step + 1e-6, name  # rounding, not another function
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
