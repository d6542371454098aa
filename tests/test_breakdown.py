"""Where the instructions go: block names from the exported tensors' module paths, the summary's arithmetic,
and (marker `arm`) the real thing — each block of a tiny int8 .tflite counted alone on the emulated a76,
twice, repeatable like the total, its sum within the stated per-part overhead of the whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetl import breakdown
from tests.conftest import run_cli

_STEM = ("edgetl.backends.torch.export.ChannelsLastInput/edgetl.backends.torch.models.MobileNetV2_model/"
         "torch.nn.modules.container.Sequential_features/edgetl.backends.torch.models.ConvNormAct_0/"
         "torch.nn.modules.conv.Conv2d_0;2")
_BLOCK = _STEM.replace("ConvNormAct_0/torch.nn.modules.conv.Conv2d_0;2", "InvertedResidualV2_12;")


def test_block_names_come_from_the_module_path_of_the_tensors() -> None:
    assert breakdown._block_of([_STEM]) == ("features.0", "ConvNormAct")
    assert breakdown._block_of([_BLOCK]) == ("features.12", "InvertedResidualV2")
    assert breakdown._block_of(["serving_default_output_0_output"]) is None
    # an EfficientNet-Lite stem sits outside any container; a MobileNetV3 head holds its classifier's layers
    assert breakdown._joined([None, None], "stem") == "stem"
    assert breakdown._joined([("features.12", "ConvNormAct"), None, ("classifier.0", "Linear")], "head") == (
        "features.12+classifier.0+head")
    assert breakdown._joined([("features.0", "ConvNormAct")], "stem") == "features.0"


@pytest.mark.torch
def test_an_efficientnet_tflite_is_cut_into_its_blocks_named_as_the_pte_parts(tmp_path: Path) -> None:
    """EfficientNet-Lite0's blocks sit in `_blocks` (a Sequential, so litert-torch writes the container into the
    tensor names); its stem and head convs sit under no numbered module."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    from edgetl.backends.torch.export import ChannelsLastInput, convert_tflite
    from edgetl.backends.torch.models import build_model

    torch.manual_seed(0)
    model = ChannelsLastInput(build_model("efficientnet_lite0", 1.0, num_classes=3)).eval()
    path = tmp_path / "lite0.tflite"
    path.write_bytes(convert_tflite(model, torch.zeros(1, 32, 32, 3), quantized=False))
    parts = breakdown.tflite_parts(path)
    assert [p.name for p in parts] == ["stem", *[f"_blocks.{i}" for i in range(16)], "head"]
    assert [p.role for p in parts].count("block") == 16


def test_summary_states_each_share_and_how_far_the_sum_is_from_the_whole() -> None:
    parts = [{"name": "features.0", "instructions_per_invoke": 300, "macs": 1000},
             {"name": "features.1", "instructions_per_invoke": 800, "macs": 0}]
    record = breakdown.summarize(parts, whole=1000, whole_macs=1000)
    assert record["sum_of_parts"] == 1100 and record["sum_minus_whole"] == 100
    assert record["sum_minus_whole_relative"] == pytest.approx(0.1)
    assert record["overhead_per_extra_part"] == 100
    assert parts[0]["share_of_whole"] == pytest.approx(0.3) and parts[0]["instructions_per_mac"] == pytest.approx(0.3)
    assert parts[1]["instructions_per_mac"] is None  # no MACs: no ratio, never a division by zero
    assert all(p["int8_loss_share"] is None for p in parts) and record["int8_loss_share_source"] is None
    assert "per-invoke overhead" in record["gap_reason"] and record["format"] == "tflite"
    pte = breakdown.summarize([dict(p) for p in parts], whole=1000, whole_macs=1000, fmt="pte")
    assert pte["format"] == "pte" and "--parts" in pte["method"] and "quantizes its float" in pte["gap_reason"]


def test_each_block_gets_its_share_of_the_int8_loss_from_the_sensitivity_table() -> None:
    def table(*errors: tuple[str, float]) -> dict:
        return {"images": 64, "layers": len(errors) + 1,
                "rows": [{"layer": name, "logit_error": e, "measured": True} for name, e in errors]
                + [{"layer": "model.late", "measured": False}]}

    mobilenet = {"parts": [{"name": "features.0", "role": "stem"}, {"name": "features.1", "role": "block"},
                           {"name": "features.2", "role": "block"}, {"name": "features.18+head", "role": "head"}]}
    breakdown.attribute_int8_loss(mobilenet, table(
        ("model.features.0.0", 0.4), ("model.features.1.conv.0.0", 0.2), ("model.features.1.conv.1", 0.2),
        ("model.features.2.conv.0.0", 0.1), ("model.features.18.0", 0.05), ("model.classifier.1", 0.05)))
    assert [p["int8_loss_share"] for p in mobilenet["parts"]] == [0.4, 0.4, 0.1, 0.1]  # classifier: after the blocks
    assert "rounded to int8 alone on 64" in mobilenet["int8_loss_share_source"]
    assert "1 layer(s) not measured" in mobilenet["int8_loss_share_source"]
    # EfficientNet-Lite: the stem conv sits under no container, so it goes by position (before the first block)
    lite = {"parts": [{"name": "stem", "role": "stem"}, {"name": "_blocks.0", "role": "block"},
                      {"name": "head", "role": "head"}]}
    breakdown.attribute_int8_loss(lite, table(("model._conv_stem", 0.3), ("model._blocks.0._depthwise_conv", 0.5),
                                              ("model._conv_head", 0.1), ("model._fc", 0.1)))
    assert [p["int8_loss_share"] for p in lite["parts"]] == [0.3, 0.5, 0.2]
    untouched = {"parts": [{"name": "features.0", "role": "stem", "int8_loss_share": None}]}
    breakdown.attribute_int8_loss(untouched, {"rows": []})  # no measured layer: nothing is made up
    assert untouched["parts"][0]["int8_loss_share"] is None and "int8_loss_share_source" not in untouched


def assert_parts_chain_to_the_whole(model: Path, folder: Path) -> None:
    """The cut is faithful: every part keeps the whole's scale/zero-point at its cuts, and the parts run one after
    another in LiteRT give the whole's int8 output bit for bit."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    def load(path: Path) -> Interpreter:
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
        return interpreter

    def invoke(interpreter: Interpreter, x: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    folder.mkdir()
    whole = load(model)
    scales = {d["name"]: d["quantization"] for d in whole.get_tensor_details()}
    x = np.random.default_rng(0).integers(-128, 128, size=(1, 32, 32, 3), dtype=np.int8)
    y = x
    for part in breakdown.tflite_parts(model):
        piece = load(breakdown.write_part(model, part, folder / f"{part.name}.tflite"))
        for cut in (*piece.get_input_details(), *piece.get_output_details()):
            assert cut["dtype"] == np.int8 and cut["quantization"] == scales[cut["name"]], (part.name, cut["name"])
        y = invoke(piece, y)
    assert np.array_equal(y, invoke(whole, x)), (y, invoke(whole, x))


# Measured 2026-12-01 on the tiny model below (a76, qemu 7.2): 5.4 k instructions per extra part in LiteRT 2.3.0,
# 10.6 k in ExecuTorch 1.5.1 (a program per part: method execute, delegate dispatch, a quantize of its input and a
# dequantize of its output). The stated distance: the sum exceeds the whole by less than this per extra part.
MAX_OVERHEAD_PER_EXTRA_PART = {"tflite": 10_000, "pte": 20_000}


@pytest.mark.arm
@pytest.mark.slow  # 5 to 12 minutes of qemu on two cores; the a76 runs of test_arm64 and test_sweep stay in `make test`
def test_breakdown_on_the_emulated_a76_repeats_and_sums_to_the_whole(tiny_checkpoint: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    done = run_cli("export", str(tiny_checkpoint), "--formats", "tflite,pte", "--quant", "int8", "--parts",
                   "--out", str(export))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_parts_chain_to_the_whole(export / "mobilenet_v2-w0.35-32-int8.tflite", tmp_path / "parts")
    runs = []
    for attempt in (1, 2):
        out = tmp_path / f"bench{attempt}"
        result = run_cli("bench", str(export), "--target", "arm64-a76", "--arm-iters", "2", "--breakdown",
                         "--out", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append({f: json.loads((out / f"mobilenet_v2-w0.35-32-int8.{f}@arm64-a76.json").read_text())["runs"][0]
                     for f in ("tflite", "pte")})
    heads = {"tflite": "features.18+head", "pte": "features.18+classifier.1"}
    for fmt in ("tflite", "pte"):
        first, second = (r[fmt]["breakdown"] for r in runs)
        names = [p["name"] for p in first["parts"]]
        assert names[0] == "features.0" and names[-1] == heads[fmt] and len(names) == 19  # stem, 17 blocks, head
        assert [p["role"] for p in first["parts"]].count("block") == 17
        whole = runs[0][fmt]["emulation"]["instructions_per_invoke"]
        assert first["whole_instructions_per_invoke"] == whole
        assert abs(whole - runs[1][fmt]["emulation"]["instructions_per_invoke"]) <= 5e-6 * whole
        for a, b in zip(first["parts"], second["parts"], strict=True):
            assert a["macs"] > 0 and a["instructions_per_invoke"] > 1000
            assert abs(a["instructions_per_invoke"] - b["instructions_per_invoke"]) <= 5e-6 * whole, (fmt, a["name"])
        gap = first["sum_of_parts"] - whole
        assert 0 < gap < MAX_OVERHEAD_PER_EXTRA_PART[fmt] * (len(names) - 1), (fmt, first)
        assert first["sum_minus_whole"] == gap
        assert sum(p["int8_loss_share"] for p in first["parts"]) == pytest.approx(1, abs=1e-3)  # the export's table
        assert "sensitivity table" in first["int8_loss_share_source"]
    tflite, pte = (runs[0][fmt]["breakdown"] for fmt in ("tflite", "pte"))
    assert sum(p["macs"] for p in tflite["parts"]) == tflite["whole_macs"]
    assert [p["macs"] for p in pte["parts"]] == [p["macs"] for p in tflite["parts"]]  # the same blocks, both ways
    assert "--parts" in pte["method"] and "quantizes its float" in pte["gap_reason"]


def test_a_pte_without_parts_or_with_stale_parts_has_no_breakdown_and_says_why(tmp_path: Path) -> None:
    from edgetl.errors import UserError

    model = tmp_path / "m.pte"
    model.write_bytes(b"pte")
    with pytest.raises(UserError, match="export with --parts"):
        breakdown.pte_parts(model, "a" * 64)
    folder = breakdown.parts_folder(tmp_path, model.name)
    folder.mkdir()
    (folder / "parts.json").write_text(json.dumps({"kind": breakdown.PARTS_KIND, "sha256": "b" * 64, "parts": [
        {"name": "features.0", "role": "stem", "file": "00-features.0.pte", "macs": 5}]}))
    with pytest.raises(UserError, match="another version of the file"):
        breakdown.pte_parts(model, "a" * 64)
    found = breakdown.pte_parts(model, "b" * 64)
    assert found[0]["path"] == folder / "00-features.0.pte" and found[0]["macs"] == 5


def test_the_sweep_report_tables_and_plots_each_counted_breakdown() -> None:
    from edgetl import report

    parts = [{"name": "features.0", "role": "stem", "instructions_per_invoke": 40_000, "macs": 110_000},
             {"name": "features.18+head", "role": "head", "instructions_per_invoke": 70_000, "macs": 0}]
    record = {"id": "int8-ptq/m.tflite", "target": "arm64-a76", **breakdown.summarize(parts, 100_000, 110_000)}
    document = {"breakdowns": [record]}
    blocks = report.breakdown_sections(document)
    assert blocks[0] == ("h2", "Where the instructions go")
    kind, headers, rows = blocks[2]
    assert kind == "table" and headers[-1] == "int8 loss share" and rows[0][-1] == "–"  # empty until a table exists
    assert rows[0][:5] == ["features.0", "stem", "0.110", "0.0400", "40.0%"] and rows[1][2] == "–"
    assert "+10.0%" in blocks[1][1] and "per-invoke overhead" in blocks[1][1]
    assert report.breakdown_plot(document)[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.breakdown_sections({}) == [] and report.breakdown_plot({}) is None


def _module_path(block: str) -> str:
    return ("edgetl.backends.torch.export.ChannelsLastInput/edgetl.backends.torch.models.MobileNetV2_model/"
            f"torch.nn.modules.container.Sequential_features/edgetl.backends.torch.models.{block}/x;")


def _hand_made_tflite(path: Path) -> Path:
    """x → stem (add c0) → features.1 (add c1, add the stem's output: a residual) → head (mul c2): four ops."""
    import flatbuffers
    import numpy as np
    from ai_edge_litert import schema_py_generated as s

    model, graph = s.ModelT(), s.SubGraphT()
    model.version, model.buffers, model.operatorCodes = 3, [s.BufferT()], []
    for code in (s.BuiltinOperator.ADD, s.BuiltinOperator.MUL):
        op_code = s.OperatorCodeT()
        op_code.builtinCode, op_code.deprecatedBuiltinCode, op_code.version = code, code, 1
        model.operatorCodes.append(op_code)
    graph.tensors = []

    def tensor(name: str, value: float | None = None) -> int:
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer = name.encode(), [1, 4], s.TensorType.FLOAT32, 0
        if value is not None:
            b = s.BufferT()
            b.data = np.full(4, value, np.float32).view(np.uint8)
            model.buffers.append(b)
            t.buffer = len(model.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    def op(code: int, inputs: list[int], output: int) -> s.OperatorT:
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = code, inputs, [output]
        return o

    x, stem = tensor("serving_default_x"), tensor(_module_path("ConvNormAct_0"))
    mid, block = tensor(_module_path("InvertedResidualV2_1") + "a"), tensor(_module_path("InvertedResidualV2_1"))
    out = tensor("serving_default_output_0")
    c0, c1, c2 = tensor("c0", 1.0), tensor("c1", 2.0), tensor("c2", 3.0)
    graph.operators = [op(0, [x, c0], stem), op(0, [stem, c1], mid), op(0, [mid, stem], block), op(1, [block, c2], out)]
    graph.inputs, graph.outputs = [x], [out]
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


def test_a_block_cut_out_of_a_tflite_runs_alone_and_the_parts_chain_to_the_whole(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    interpreter = pytest.importorskip("ai_edge_litert.interpreter")
    model = _hand_made_tflite(tmp_path / "m.tflite")
    before = model.read_bytes()
    parts = breakdown.tflite_parts(model)
    assert [(p.name, p.role, p.first_op, p.last_op) for p in parts] == [
        ("features.0", "stem", 0, 0), ("features.1", "block", 1, 2), ("head", "head", 3, 3)]

    def run(path: Path, x: np.ndarray) -> np.ndarray:
        it = interpreter.Interpreter(model_path=str(path))
        it.allocate_tensors()
        assert len(it.get_input_details()) == 1 and len(it.get_output_details()) == 1  # the residual stays inside
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"])

    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    y = x
    for part in parts:
        y = run(breakdown.write_part(model, part, tmp_path / f"{part.name}.tflite"), y)
    assert np.array_equal(y, run(model, x)) and np.array_equal(y, ((x + 1) + 2 + (x + 1)) * 3)
    assert model.read_bytes() == before  # the exported file is only read


def test_breakdown_without_an_emulated_target_is_one_line_and_exit_2(tmp_path: Path) -> None:
    export = tmp_path / "export"
    export.mkdir()
    (export / "m.tflite").write_bytes(b"not read: the options are checked first")
    result = run_cli("bench", str(export), "--target", "host", "--breakdown")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--breakdown" in lines[0] and "arm64-a76" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_sweep_asking_for_a_breakdown_without_an_emulated_target_stops_before_any_export(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli("sweep", str(tiny_checkpoint), "--target", "host", "--breakdown", "--out", str(tmp_path / "s"))
    assert result.returncode == 2 and "--breakdown needs an emulated target" in result.stderr, result.stderr
    assert not (tmp_path / "s").exists()


def test_parts_are_asked_only_of_an_export_that_makes_a_pte() -> None:
    from edgetl.config import ExportConfig, SweepConfig

    assert ExportConfig.of(parts=True).for_backend("torch").parts
    assert not ExportConfig.of(parts=True, formats="tflite").for_backend("torch").parts  # no .pte: nothing to cut
    assert not ExportConfig.of(parts=True).for_backend("keras").parts  # keras makes .tflite only
    sweep = SweepConfig.of(targets=("arm64-a76",), breakdown=True, formats=("tflite", "pte")).validate()
    assert sweep.export_config("int8-ptq").parts  # a sweep's breakdown lowers each .pte's blocks
    assert not SweepConfig.of(targets=("arm64-a76",)).validate().export_config("int8-ptq").parts
