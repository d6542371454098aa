"""The torch export backend for real: the quantizer's ReLU6 handling, BatchNorm folding, bias correction,
and one end-to-end int8 export at 32 px verified in LiteRT and ExecuTorch.

Lowering costs 30-60 s per file on a 2-core machine, so the default run exports two files; the full
fp32 + int8 set is behind `slow`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from torch import nn  # noqa: E402

from edgetl.backends.torch.quantize import bias_correct, fold_batchnorm, quantize_ptq  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

pytestmark = pytest.mark.torch
PREFIX = "mobilenet_v2-w0.35-32-"
DEVICE_BENCH = Path(__file__).resolve().parents[1] / "device_bench" / "device_bench.py"


class Tiny(nn.Module):
    """conv → BN → ReLU6 → depthwise → BN → ReLU6 → pool → linear: the MobileNet pattern in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)
        self.act = nn.ReLU6()  # as in our models: exported as aten.hardtanh(0, 6)
        for bn in (self.bn, self.bn2):  # non-trivial statistics so folding has something to do
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 3)
            bn.bias.data.uniform_(-2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        x = self.act(self.bn2(self.dw(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_batchnorm_folds_into_the_conv_without_changing_outputs() -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    x = torch.randn(4, 3, 16, 16)
    folded = fold_batchnorm(model, x[:1])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_bias_correction_removes_the_mean_error_of_rounded_weights() -> None:
    torch.manual_seed(0)
    model = fold_batchnorm(Tiny().eval(), torch.zeros(1, 3, 16, 16))
    model.fc.weight.data *= 40  # coarse weights: rounding to 8 bits shifts the outputs visibly
    x = torch.randn(64, 3, 16, 16)
    corrected = bias_correct(model, x)
    rounded = fold_batchnorm(model, x[:1])  # a copy (nothing left to fold) with plainly rounded weights
    for module in rounded.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            w = module.weight.data
            scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True) / 127
            module.weight.data = (w / scale).round() * scale
    with torch.no_grad():
        reference = model(x)
        error_plain = (rounded(x) - reference).mean(dim=0).abs().max()
        error_corrected = (corrected(x) - reference).mean(dim=0).abs().max()
    assert error_corrected < error_plain / 5


def test_relu6_outputs_are_quantized_after_the_clamp() -> None:
    """The measured fix: conv output is not quantized on its own; the ReLU6 output is, over [0, 6]."""
    torch.manual_seed(0)
    model = fold_batchnorm(Tiny().eval(), torch.zeros(1, 3, 16, 16))
    calibration = [torch.randn(16, 3, 16, 16) * 3 for _ in range(2)]
    graph = quantize_ptq(model, torch.zeros(1, 3, 16, 16), calibration)
    clamps = [n for n in graph.graph.nodes if n.op == "call_function" and "hardtanh" in str(n.target)]
    assert len(clamps) == 2
    for clamp in clamps:
        producer = clamp.args[0]
        assert "conv" in str(producer.target)  # no quantize/dequantize between conv and ReLU6
        (user,) = clamp.users
        assert "quantize_per_tensor" in str(user.target)
        scale, zero_point = user.args[1], user.args[2]
        assert zero_point == -128 and scale <= 6.0 / 255 + 1e-6  # the int8 range covers [0, 6] at most


def _check_export(out: Path, quants: tuple[str, ...]) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "edgetl.export"
    assert all(a["status"] == "ok" for a in manifest["artifacts"])
    test = np.load(out / "test_inputs.npz")
    assert test["x"].dtype == np.float32 and test["x"].shape[1:] == (32, 32, 3) and test["y"].dtype == np.int64
    made = {Path(a["file"]).suffix.lstrip(".") for a in manifest["artifacts"]}
    for quant in quants:
        for fmt in made:
            name = f"{PREFIX}{quant}.{fmt}"
            sidecar = json.loads((out / f"{name}.json").read_text())
            assert sidecar["sha256"] and sidecar["bytes"] == (out / name).stat().st_size
            assert sidecar["preprocess"]["layout"] == "NHWC" and sidecar["labels"] == manifest["labels"]
            assert sidecar["verification"]["status"] == "ok"
            assert "torch" in sidecar["versions"] and "executorch" in sidecar["versions"]
            if fmt == "pte":
                assert sidecar["delegation"]["delegated_nodes"] > 0
                assert sidecar["delegation"]["compute_ops_outside"] == []
            if fmt == "tflite" and quant == "int8":
                assert sidecar["input"]["dtype"] == "int8" and sidecar["input"]["quantization"]["scale"] > 0
                assert sidecar["output"]["dtype"] == "int8"
    record = json.loads((out / "verification.json").read_text())
    text = (out / "verification.txt").read_text()
    table_rows = [line for line in text.splitlines() if line.lstrip().startswith(PREFIX) and ": " not in line]
    assert len(table_rows) == len(made) * len(quants)
    for row in record["rows"]:  # a line under the table for each int8 file that changed a class, none otherwise
        said = f"{row['file']}: {row.get('changed')} of {row['images']} test images change class" in text
        assert said == (row["quant"] == "int8" and row["changed"] > 0), (row, text)
    for pair in record["cross_format_agreement"]:
        assert pair["agreement"] >= 0.9  # same graph, each format in its own runtime
    return record


def test_int8_export_runs_in_every_runtime(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """One PT2E Q/DQ graph, three files: .tflite in LiteRT, .pte in ExecuTorch, .onnx in ONNX Runtime; all three
    verified on the test images and compared pairwise; the .onnx holds int8 weights and runs in device_bench."""
    import onnx

    out = tmp_path / "export"
    result = run_cli("export", str(tiny_checkpoint), "--quant", "int8", "--calib", "32", "--max-drop", "100",
                     "--formats", "tflite,pte,onnx", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    for pair in ("int8: .tflite and .pte agree", "int8: .tflite and .onnx agree", "int8: .pte and .onnx agree"):
        assert pair in result.stdout
    record = _check_export(out, ("int8",))
    assert {row["file"] for row in record["rows"]} == {PREFIX + "int8.tflite", PREFIX + "int8.pte",
                                                      PREFIX + "int8.onnx"}
    assert len(record["cross_format_agreement"]) == 3
    sidecar = json.loads((out / f"{PREFIX}int8.onnx.json").read_text())
    assert sidecar["runtime"] == "ONNX Runtime (CPUExecutionProvider)" and "onnxruntime" in sidecar["versions"]
    assert sidecar["input"]["quantized_inside"]["scale"] > 0  # float in, quantized by the graph's first node
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= set(sidecar["ops"])
    graph = onnx.load(str(out / f"{PREFIX}int8.onnx")).graph
    weights = [t for t in graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == onnx.TensorProto.INT8 for t in weights)  # stored int8, as in the others
    benched = subprocess.run([sys.executable, str(DEVICE_BENCH), str(out / f"{PREFIX}int8.onnx"), "--inputs",
                              str(out / "test_inputs.npz"), "--iters", "3", "--warmup", "1"],
                             capture_output=True, text=True, timeout=300)
    assert benched.returncode == 0, benched.stderr
    document = json.loads(benched.stdout)
    assert document["runtime"]["name"] == "onnxruntime" and document["model"]["format"] == "onnx"
    row = next(r for r in record["rows"] if r["file"].endswith(".onnx"))
    assert document["accuracy"]["top1"] == pytest.approx(row["top1"])  # device_bench scores as verification did


@pytest.mark.slow
def test_full_export_fp32_matches_the_checkpoint_exactly(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = run_cli("export", str(tiny_checkpoint), "--recipe", "all", "--calib", "32", "--max-drop", "100",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    record = _check_export(out, ("fp32", "int8"))
    for row in record["rows"]:
        if row["quant"] == "fp32":
            assert row["agreement"] == 1.0 and row["max_prob_diff"] < 1e-4
    sizes = {row["file"]: (out / row["file"]).stat().st_size for row in record["rows"]}
    assert sizes[PREFIX + "int8.pte"] < 0.35 * sizes[PREFIX + "fp32.pte"]
