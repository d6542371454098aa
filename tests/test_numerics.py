"""The numerics debugger (`edgetl export --debug-numerics`): its figures, the rule that says where a runtime departs
from the Q/DQ graph, its bad input, and one real export at 32 px whose blocks run in LiteRT and ExecuTorch."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgetl import numerics
from edgetl.config import ExportConfig
from edgetl.errors import UserError
from tests.conftest import run_cli
from tests.test_cli import _assert_one_line_error
from tests.test_export import make_checkpoint


def test_error_figures_are_sqnr_cosine_and_max_abs() -> None:
    reference = np.array([[3.0, -4.0, 0.0, 0.0]])
    exact = numerics.error(reference.copy(), reference)
    assert exact == {"sqnr_db": None, "sqnr_db_median_image": None, "cosine": 1.0, "max_abs": 0.0}  # no infinity
    noisy = numerics.error(reference + np.array([0.0, 0.0, 0.5, 0.0]), reference)
    assert noisy["sqnr_db"] == pytest.approx(10 * np.log10(25 / 0.25), abs=0.01)  # 20 dB
    assert noisy["max_abs"] == 0.5 and 0.99 < noisy["cosine"] < 1.0
    assert numerics.error(-reference, reference)["cosine"] == -1.0
    # three images: one loud image with a clipped value dominates the batch SQNR, not the median image's
    images = np.array([[1.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    noise = np.array([[0.01, 0.0], [0.01, 0.0], [50.0, 0.0]])
    figures = numerics.error(images + noise, images)
    assert figures["sqnr_db"] < 10 < 40 < figures["sqnr_db_median_image"]


def test_a_block_departs_only_when_many_values_move_more_than_one_int8_step() -> None:
    step = 0.1
    graph = np.arange(1000, dtype=np.float32) * step
    rounding = graph.copy()
    rounding[::2] += step  # every other value one step off: what rounding differently does
    assert numerics.departure(rounding, graph, step) == {"steps_max": 1.0, "share_over_1_step": 0.0,
                                                          "departs": False}
    far = graph.copy()
    far[:20] += 3 * step  # 2% of the values three steps off: no rounding does that
    result = numerics.departure(far, graph, step)
    assert result["departs"] and result["share_over_1_step"] == 0.02 and result["steps_max"] == 3.0
    assert not numerics.departure(far, graph, None)["departs"]  # a float output has no grid to count steps on


class _Runner:
    """A runtime stand-in: returns the graph's value, with an offset for chosen blocks; knows only `files`."""

    def __init__(self, files: dict[str, np.ndarray], offsets: dict[str, float]) -> None:
        self.files, self.offsets = files, offsets

    @staticmethod
    def expected(signal: SimpleNamespace) -> np.ndarray:
        return signal.graph_output

    def run(self, name: str, inputs: list[np.ndarray]) -> np.ndarray:
        return inputs[0] * 2 + self.offsets.get(name, 0.0)


def _signals(count: int) -> list[SimpleNamespace]:
    """A chain of blocks that each double their input, as the graph and the float model compute it."""
    value = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    made = []
    for index in range(count):
        out = value * 2
        role = "stem" if index == 0 else "head" if index == count - 1 else "block"
        made.append(SimpleNamespace(name=f"features.{index}", role=role, float_output=out, graph_output=out,
                                    graph_inputs=[value], input_keys=[f"t{index}"], output_key=f"t{index + 1}",
                                    step=0.01, notes=[], macs=0))
        value = out
    return made


def test_the_first_departing_block_is_named_and_a_missing_block_is_said_while_the_rest_are_compared() -> None:
    signals = _signals(4)
    files = {"stem": None, "features.1": None, "features.2": None, "head": None}
    record = numerics._compare_runtime(signals, _Runner(files, {"features.2": 0.05}), None)
    rows = {row["block"]: row for row in record["blocks"]}
    assert not rows["features.1"]["alone"]["departs"] and rows["features.2"]["alone"]["departs"]
    assert rows["features.2"]["alone"]["steps_max"] == pytest.approx(5.0)
    assert rows["features.0"]["chained_vs_float"]["sqnr_db"] is None  # exact until the departing block
    assert rows["features.3"]["chained_vs_float"]["sqnr_db"] is not None  # the offset carried on through the chain
    del files["features.1"]  # a block the runtime's file cannot be cut into
    record = numerics._compare_runtime(signals, _Runner(files, {}), None)
    rows = {row["block"]: row for row in record["blocks"]}
    assert "no block of this name" in rows["features.1"]["skipped"]
    assert "alone" in rows["features.2"] and "alone" in rows["features.3"]  # the rest still compared, each alone


def test_selected_blocks_are_compared_alone_and_the_rest_are_marked_not_selected() -> None:
    signals = _signals(4)
    files = {"stem": None, "features.1": None, "features.2": None, "head": None}
    record = numerics._compare_runtime(signals, _Runner(files, {"features.2": 0.05}), None, selected=("features.2",))
    rows = {row["block"]: row for row in record["blocks"]}
    assert rows["features.2"]["alone"]["departs"]  # the selected block is still judged against the graph
    assert "chained_vs_float" not in rows["features.2"]  # no chain runs through unselected blocks
    assert all(rows[name] == {"block": name, "not_selected": True} for name in ("features.0", "features.1",
                                                                                 "features.3"))
    assert "chain_vs_whole_file" not in record


def test_debug_blocks_must_name_blocks_before_any_work(tmp_path: Path) -> None:
    """--debug-blocks without the debugger, or naming a block the model does not have: one line, exit 2, and the
    valid names (the model's own blocks, from its architecture alone) listed."""
    with pytest.raises(UserError, match="--debug-blocks features.3 selects blocks of the numerics debugger"):
        ExportConfig.of(debug_blocks="features.3").validate()
    checkpoint = make_checkpoint(tmp_path)
    done = run_cli("export", str(checkpoint), "--quant", "int8", "--debug-numerics", "--debug-blocks",
                   "features.3,features.99", "--out", str(tmp_path / "e"))
    _assert_one_line_error(done, "--debug-blocks: 'features.99' is not a block of this mobilenet_v3_small")
    valid = done.stderr.split("valid: ", 1)[1].strip().split(", ")
    assert "features.3" in valid and "features.11" in valid and len(valid) == 13  # stem, 11 blocks, head
    assert not (tmp_path / "e").exists()


def test_debug_numerics_needs_int8_and_a_torch_checkpoint_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--debug-numerics compares int8 files.*valid: --quant int8"):
        ExportConfig.of(quant=("fp32",), debug_numerics=True).validate()
    checkpoint = make_checkpoint(tmp_path)
    done = run_cli("export", str(checkpoint), "--quant", "fp32", "--debug-numerics", "--out", str(tmp_path / "e"))
    _assert_one_line_error(done, "--debug-numerics")
    assert not (tmp_path / "e").exists()
    with pytest.raises(UserError, match="--debug-numerics: torch-only"):
        ExportConfig.of(debug_numerics=True).for_backend("keras")


def test_a_real_export_compares_every_block_in_both_runtimes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """MobileNetV2 at 32 px: both runtimes follow the Q/DQ graph in every block, and the chained blocks give the
    whole file's logits; the figures are in the manifest, the table on stdout, the plot beside the files."""
    out = tmp_path / "export"
    done = run_cli("export", str(tiny_checkpoint), "--quant", "int8", "--int8", "ptq", "--debug-numerics",
                   "--max-drop", "100", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "manifest.json").read_text())["numerics"]
    names = [block["block"] for block in record["blocks"]]
    assert names[0].startswith("features.0") and len(names) == 19 and record["images"] == 8
    for fmt in ("tflite", "pte"):
        result = record["runtimes"][fmt]
        assert result["departs_at"] == [] and result["could_not_compare"] == []
        assert result["chain_vs_whole_file"]["max_abs"] < 1e-4  # the blocks chained are the whole file
        for row in result["blocks"]:
            assert row["alone"]["share_over_1_step"] <= numerics.DEPARTS_SHARE
            assert row["chained_vs_float"]["cosine"] > 0.5
    graph = [block["graph_vs_float"]["sqnr_db"] for block in record["blocks"]]
    assert graph[0] > 25  # the stem's only error is its own rounding
    assert (out / record["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "numerics:" in done.stdout and "follows the Q/DQ graph in every block" in done.stdout
    # the output went through a pipe: the tables still print every file's top-1 and drop whole, not cut to "8…"
    for row in json.loads((out / "manifest.json").read_text())["verification"]["rows"]:
        assert f"{100 * row['top1']:.1f}%" in done.stdout and row["file"] in done.stdout


def test_a_sweep_asks_int8_variants_only_and_its_report_plots_the_first_record(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from edgetl.config import SweepConfig
    from edgetl.report import int8_numerics, plots

    config = SweepConfig.of(debug_numerics=True).validate()
    assert config.export_config("int8-ptq").validate().debug_numerics
    assert not config.export_config("fp32").validate().debug_numerics  # would be refused: no int8 file
    assert not SweepConfig.of().validate().export_config("int8-ptq").debug_numerics

    record = json.loads((Path(__file__).parents[1] / "benchmarks/results/int8/"
                         "numerics-mobilenet_v3_large-128-ranges.json").read_text())
    for name, numerics_record in (("fp32", None), ("int8", record)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"numerics": numerics_record}))
    variants = [{"name": "fp32", "export": str(tmp_path / "fp32")}, {"name": "int8", "export": str(tmp_path / "int8")}]
    assert int8_numerics({"variants": variants}) == record
    assert int8_numerics({"variants": variants[:1]}) is None
    document = {"variants": variants, "rows": [], "analysis": {"host_threads_ranked": 1}}
    assert plots(document) == {}  # no ranked row: no figure at all, as for the other plots
    assert numerics.plot(record).startswith(b"\x89PNG")
