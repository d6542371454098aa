"""`edgetl bench` on the host: result files per artifact and target, the manifest, the plot, the report rows,
input layout handling, and one-line errors for bad arguments."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetl.bench import Artifact, prepare_inputs, ratios
from edgetl.errors import UserError
from edgetl.targets.local import counts as _counts
from tests.conftest import run_cli
from tests.test_device_bench import tiny_models  # noqa: F401  (session fixture: tiny .tflite/.pte + inputs)


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bench_on_the_host_writes_results_manifest_plot_and_report(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_models, run / "export")
    result = run_cli("bench", str(run / "export"), "--threads", "1,2", "--iters", "5")
    assert result.returncode == 0, result.stderr
    bench = run / "bench"
    assert {p.name for p in bench.glob("*@*.json")} == {"tiny.tflite@host.json", "tiny.pte@host.json",
                                                        "tiny.onnx@host.json"}
    tflite = json.loads((bench / "tiny.tflite@host.json").read_text())
    assert tflite["kind"] == "edgetl.bench.result" and tflite["target"]["name"] == "host"
    assert [r["conditions"]["threads"] for r in tflite["runs"]] == [1, 2]
    assert all(r["accuracy"]["top1"] == 0.75 for r in tflite["runs"])
    pte = json.loads((bench / "tiny.pte@host.json").read_text())
    onnx = json.loads((bench / "tiny.onnx@host.json").read_text())
    assert pte["runs"][0]["model"]["macs"] == tflite["runs"][0]["model"]["macs"]  # taken from the .tflite
    assert onnx["runs"][0]["model"]["macs"] == tflite["runs"][0]["model"]["macs"]  # the same model, each format
    assert all(r["accuracy"]["top1"] == 0.75 for r in onnx["runs"])
    manifest = json.loads((bench / "manifest.json").read_text())
    assert manifest["kind"] == "edgetl.bench" and len(manifest["rows"]) == 6
    assert set(manifest["source"]["artifacts"]) == {"tiny.tflite", "tiny.pte", "tiny.onnx"}
    assert {"ai-edge-litert", "executorch", "onnxruntime"} <= set(manifest["versions"])
    assert (bench / "bench.png").stat().st_size > 10_000
    report = json.loads((run / "report.json").read_text())
    assert len(report["bench"]["rows"]) == 6
    for needle in ("tiny.tflite", "tiny.pte", "tiny.onnx", "ai-edge-litert 2.3.0", "executorch 1.5.1",
                   "onnxruntime 1.32.0", "0.750 (12)"):
        assert needle in result.stdout, needle


def test_bench_arguments_are_checked(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    _one_line_error(run_cli("bench", str(tiny_models), "--target", "host,arm64-a99"),
                    "unknown target 'arm64-a99'", "arm64-a76")
    _one_line_error(run_cli("bench", str(tiny_models), "--threads", "0"), "--threads")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(run_cli("bench", str(empty)), "no .tflite or .pte")
    _one_line_error(run_cli("bench", str(tmp_path / "nowhere")), "does not exist")
    _one_line_error(run_cli("bench", str(tiny_models), "--inputs", str(tmp_path / "none.npz")), "none.npz")
    _one_line_error(run_cli("bench", "--setup", "arm32"), "unknown set-up 'arm32'", "arm64")


def test_a_bad_model_in_the_folder_is_one_line(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "broken.tflite").write_bytes((tiny_models / "tiny.tflite").read_bytes()[:1000])
    _one_line_error(run_cli("bench", str(folder), "--iters", "2"), "broken.tflite")


def test_inputs_are_turned_to_the_layout_the_model_wants(tmp_path: Path) -> None:
    nhwc = tmp_path / "nhwc.npz"
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
    np.savez(nhwc, x=x, y=np.array([0, 1]))
    nchw_model = Artifact(tmp_path / "m.pte", spec={"input": {"shape": [1, 3, 4, 4]}})
    turned = prepare_inputs(nhwc, nchw_model, tmp_path)
    assert turned != nhwc
    with np.load(turned) as data:
        assert data["x"].shape == (2, 3, 4, 4) and np.array_equal(data["x"], x.transpose(0, 3, 1, 2))
        assert data["y"].tolist() == [0, 1]
    nhwc_model = Artifact(tmp_path / "m.tflite", spec={"input": {"shape": [1, 4, 4, 3]}})
    assert prepare_inputs(nhwc, nhwc_model, tmp_path) == nhwc
    other = Artifact(tmp_path / "m.tflite", spec={"input": {"shape": [1, 8, 8, 3]}})
    with pytest.raises(UserError, match="wants"):
        prepare_inputs(nhwc, other, tmp_path)


def test_counts_take_the_median_bracket_less_the_empty_bracket(tmp_path: Path) -> None:
    plugin_out = tmp_path / "count.json"
    plugin_out.write_text(json.dumps({"per_invoke": [1010, 1000, 1000, 1002, 100, 100, 101], "total": 9}))
    counts = _counts(plugin_out, {"conditions": {"iters": 4, "empty_brackets": 3}})
    assert counts["instructions_per_invoke"] == 1001 - 100
    assert counts["instructions_per_invoke_raw"] == 1001 and counts["bracket_overhead"] == 100
    with pytest.raises(UserError, match="brackets"):
        _counts(plugin_out, {"conditions": {"iters": 5, "empty_brackets": 3}})


def test_int8_fp32_ratio_pairs_files_by_name() -> None:
    rows = [{"artifact": "m-128-int8.tflite", "target": "arm64-a76", "instructions_per_invoke": 40},
            {"artifact": "m-128-fp32.tflite", "target": "arm64-a76", "instructions_per_invoke": 100},
            {"artifact": "m-128-int8.tflite", "target": "host", "instructions_per_invoke": None}]
    assert ratios(rows) == [{"int8": "m-128-int8.tflite", "fp32": "m-128-fp32.tflite", "target": "arm64-a76",
                             "ratio": 0.4}]


def test_importing_the_stage_imports_no_framework() -> None:
    probe = subprocess.run([sys.executable, "-c", "import sys, edgetl.bench, edgetl.arm64; print(sorted(m for m in "
                            "('torch', 'tensorflow', 'executorch', 'ai_edge_litert') if m in sys.modules))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"


def _export_copy(tiny_models: Path, tmp_path: Path) -> Path:  # noqa: F811
    export = tmp_path / "run" / "export"
    shutil.copytree(tiny_models, export, ignore=shutil.ignore_patterns("bench"))
    return export


def test_a_model_changed_after_export_is_refused_unless_allowed(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    export = _export_copy(tiny_models, tmp_path)
    from tests.test_contracts import sidecar_json  # a sidecar that reads as one, but names another sha256

    (export / "tiny.tflite.json").write_text(json.dumps({**sidecar_json(), "file": "tiny.tflite", "sha256": "0" * 64}))
    _one_line_error(run_cli("bench", str(export), "--iters", "2", "--threads", "1"),
                    "tiny.tflite", "sha256", "--allow-modified")
    assert not (tmp_path / "run" / "bench").exists()
    allowed = run_cli("bench", str(export), "--iters", "2", "--threads", "1", "--allow-modified")
    assert allowed.returncode == 0, allowed.stderr
    assert "changed after export" in allowed.stdout + allowed.stderr
    manifest = json.loads((tmp_path / "run" / "bench" / "manifest.json").read_text())
    assert manifest["source"]["modified_since_export"] == ["tiny.tflite"]
    flags = {r["artifact"]: r.get("modified_since_export", False) for r in manifest["rows"]}
    assert flags == {"tiny.tflite": True, "tiny.pte": False, "tiny.onnx": False}


def test_bench_replaces_only_its_own_results(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    export = _export_copy(tiny_models, tmp_path)
    _one_line_error(run_cli("bench", str(export), "--out", str(export)), "is this stage's input")
    _one_line_error(run_cli("bench", str(export / "tiny.tflite"), "--out", str(tmp_path)), "holds this stage's input")
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "results.txt").write_text("my own figures")
    _one_line_error(run_cli("bench", str(export), "--out", str(mine)), str(mine), "did not make")
    assert (mine / "results.txt").read_text() == "my own figures"
    for _ in range(2):  # the second run replaces the first one's folder, in one step
        done = run_cli("bench", str(export / "tiny.tflite"), "--iters", "2", "--threads", "1")
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["bench", "export", "report.json"]


def _error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The one error line, last on stderr, after the progress lines the stage printed there."""
    lines = [line for line in done.stderr.splitlines() if line.startswith("edgetl: error:")]
    assert len(lines) == 1 and done.stderr.strip().splitlines()[-1] == lines[0], done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return lines


def _lacking(tiny_models: Path, folder: Path) -> Path:  # noqa: F811
    """A copy of tiny.tflite that `--inspect` reads and the runtime refuses at invoke ("lacks data")."""
    from tests.test_device_bench import _damaged_tflite

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "broken.tflite"
    path.write_bytes(_damaged_tflite((tiny_models / "tiny.tflite").read_bytes(), "weights-lack-data"))
    return path


def test_a_failed_run_exits_1_after_publishing_the_rows_that_worked(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    """Scripts and CI read the exit status: a failed row is exit 1 with one line naming it, and the rows that
    worked are published all the same."""
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    shutil.copy(tiny_models / "tiny.tflite", export)
    shutil.copy(tiny_models / "test_inputs.npz", export)
    _lacking(tiny_models, export)
    done = run_cli("bench", str(export), "--iters", "2", "--threads", "1,2")
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = _error_lines(done)
    assert "2 of 4 runs failed" in lines[0] and "broken.tflite @ host t1, broken.tflite @ host t2" in lines[0]
    assert "lacks data" in lines[0] and "tiny.tflite" not in lines[0], lines[0]
    bench = tmp_path / "run" / "bench"
    manifest = json.loads((bench / "manifest.json").read_text())
    worked = [r for r in manifest["rows"] if "failed" not in r]
    assert [(r["artifact"], r["threads"]) for r in worked] == [("tiny.tflite", 1), ("tiny.tflite", 2)]
    assert all(r["top1"] == 0.75 for r in worked)
    assert json.loads((bench / "tiny.tflite@host.json").read_text())["runs"][0]["accuracy"]["top1"] == 0.75
    assert len(json.loads((tmp_path / "run" / "report.json").read_text())["bench"]["rows"]) == 4


def test_when_every_run_fails_nothing_is_published_and_the_previous_results_stay(
        tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    from tests.conftest import tree_digest

    good, bad, out = tmp_path / "good", tmp_path / "bad", tmp_path / "results"
    good.mkdir()
    shutil.copy(tiny_models / "tiny.tflite", good)
    assert run_cli("bench", str(good), "--iters", "2", "--threads", "1", "--out", str(out)).returncode == 0
    before = tree_digest(out)
    _lacking(tiny_models, bad)
    done = run_cli("bench", str(bad), "--iters", "2", "--threads", "1", "--out", str(out))
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = _error_lines(done)
    assert "every run failed" in lines[0] and "nothing published" in lines[0], done.stderr
    assert tree_digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results")]  # no temporary folder left


def test_inputs_that_no_run_could_take_are_refused_before_any_run(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    """Bad inputs stay bad input (exit 2, before any run), not a failed row on every run."""
    export = _export_copy(tiny_models, tmp_path)
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((2, 3, 32, 32), np.float32), y=np.zeros(3, np.int64))
    _one_line_error(run_cli("bench", str(export), "--inputs", str(labels)), "y has shape (3,)", "(2,)")
    ints = tmp_path / "ints.npz"
    np.savez(ints, x=np.zeros((2, 3, 32, 32), np.int32))
    _one_line_error(run_cli("bench", str(export), "--inputs", str(ints), "--threads", "1"), "x is int32", "float32")
    text = tmp_path / "text.npz"
    text.write_text("not an npz")
    _one_line_error(run_cli("bench", str(export), "--inputs", str(text)), "not a readable .npz")
    assert not (tmp_path / "run" / "bench").exists()
