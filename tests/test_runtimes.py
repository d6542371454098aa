"""edgetl.formats, the one way edgetl runs a model file, against the standalone copies that run on phones
(device_bench.py, golden_check.py): same files, same inputs, the same outputs and the same tensor
descriptions, for a float .tflite, an int8 .tflite (quantized input and output) and a .pte."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from edgetl import formats
from edgetl.errors import UserError
from tests.test_device_bench import tiny_models  # noqa: F401  (session fixture: tiny .tflite/.pte + inputs)

REPO = Path(__file__).resolve().parents[1]

# Built in a subprocess so this test process does not need litert-torch's converter loaded.
_MAKE_INT8 = textwrap.dedent("""
    import sys, torch, numpy as np, litert_torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    example = (torch.randn(1, 3, 32, 32),)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    graph = prepare_pt2e(torch.export.export(net, example).module(), quantizer)
    for _ in range(16):
        graph(torch.randn(1, 3, 32, 32))
    graph = convert_pt2e(graph, fold_quantize=False)
    litert_torch.convert(graph, example, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(sys.argv[1])
""")


@pytest.fixture(scope="module")
def int8_tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("litert_torch")
    path = tmp_path_factory.mktemp("int8") / "tiny-int8.tflite"
    done = subprocess.run([sys.executable, "-c", _MAKE_INT8, str(path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return path


def _script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"standalone_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _device_bench_outputs(bench: ModuleType, model: Path, inputs: Path) -> tuple[dict, dict, np.ndarray]:
    """device_bench's own run of every input (its tensor specs, and its outputs dequantized as an app does)."""
    args = argparse.Namespace(threads=1, warmup=0, iters=1, samples=None, inputs=inputs, markers=False)
    runner = bench.run_tflite if model.suffix == ".tflite" else bench.run_pte_python
    in_spec, out_spec, measured, _ = runner(model, args)
    outputs = np.stack([np.asarray(o, np.float32).reshape(-1) for o in measured.outputs])
    if out_spec.scale:
        outputs = (outputs - out_spec.zero_point) * np.float32(out_spec.scale)
    return in_spec.as_json(), out_spec.as_json(), outputs


def test_device_bench_and_golden_check_agree_with_runtimes(tiny_models: Path, int8_tflite: Path,  # noqa: F811
                                                          tmp_path: Path) -> None:
    bench = _script(REPO / "device_bench" / "device_bench.py")
    golden = _script(REPO / "export" / "golden_check.py")
    inputs = tiny_models / "test_inputs.npz"
    x = np.load(inputs)["x"]
    for model in (tiny_models / "tiny.tflite", int8_tflite, tiny_models / "tiny.pte"):
        ours = formats.run(model, x, threads=1)
        assert ours.shape == (len(x), 4) and ours.dtype == np.float32
        theirs = golden.run_tflite(model, x, 1) if model.suffix == ".tflite" else golden.run_pte(model, x)
        np.testing.assert_array_equal(ours, theirs.astype(np.float32), err_msg=f"golden_check, {model.name}")
        in_spec, out_spec, measured = _device_bench_outputs(bench, model, inputs)
        np.testing.assert_array_equal(ours, measured, err_msg=f"device_bench, {model.name}")
        described = formats.describe(model)
        for ours_tensor, theirs_tensor in ((described["inputs"][0], in_spec), (described["outputs"][0], out_spec)):
            assert {k: ours_tensor[k] for k in ("shape", "dtype")} == {k: theirs_tensor[k] for k in ("shape", "dtype")}
            if model.suffix == ".tflite":  # a .pte holds no tensor names or quantization parameters
                assert ours_tensor == theirs_tensor, model.name
    described = formats.describe(int8_tflite)
    assert described["inputs"][0]["dtype"] == "int8" and described["inputs"][0]["quantization"]["scale"] > 0
    assert described["delegation"]["whole_graph_delegated"] in (True, False) and described["ops"]


def test_softmax_and_quantization_helpers() -> None:
    logits = np.array([[1000.0, 1000.0], [0.0, np.log(3.0)]])
    np.testing.assert_allclose(formats.softmax(logits), [[0.5, 0.5], [0.25, 0.75]])
    q = formats.quantize(np.array([0.0, 0.26, -100.0, 100.0], np.float32), 0.5, -3, np.dtype(np.int8))
    assert q.dtype == np.int8 and q.tolist() == [-3, -2, -128, 127]
    np.testing.assert_allclose(formats.dequantize(q, 0.5, -3), [0.0, 0.5, -62.5, 65.0])


def test_unknown_format_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model.npy.*valid: \.tflite, \.pte, \.onnx"):
        formats.run(tmp_path / "model.npy", np.zeros((1, 2), np.float32))
