"""`edgetl sweep`: recipes and flags, one-line errors for bad input, and real sweeps of a tiny checkpoint
(real export, real runtimes, real bench) whose report.md / report.html / sweep.json are checked.

A variant costs 30-90 s of export on a 2-core machine, so every real sweep is `slow`: two .tflite variants
on the host (plus a second sweep that reuses an export), the whole grid (QAT, channel pruning, both
formats), and the emulated ARM64 target (`arm`). The default run checks recipes and bad input.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from edgetl.errors import UserError
from edgetl.sweep import VARIANTS, resolve_config
from tests.conftest import run_cli


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_default_recipe_is_the_whole_grid_and_flags_override_it() -> None:
    config = resolve_config()
    assert config.recipe == "default" and config.variants == tuple(VARIANTS)
    targets = config.bench.targets
    assert targets[0] == "host" and "arm64-a76" in targets and len(targets) == 7
    small = resolve_config("small", targets="host", threads="2,1", variants="int8-ptq, fp32")
    assert small.variants == ("int8-ptq", "fp32") and small.bench.targets == ("host",) and small.bench.threads == (2, 1)
    assert resolve_config("small").variants == ("fp32", "int8-ptq", "pruned30-int8")
    exported = resolve_config().export_config("pruned50-int8").validate()
    assert exported.compression.prune == "channels:0.5"
    assert exported.quantization.quant == ("int8",) and exported.quantization.formats == ("tflite", "pte")


def test_a_recipe_may_define_its_own_variants(tmp_path: Path) -> None:
    recipe = tmp_path / "mine.toml"
    recipe.write_text('variants = ["fp32", "ch40"]\ntargets = ["host"]\n'
                      '[variant.ch40]\ndescription = "40%"\nquant = ["int8"]\nprune = "channels:0.4"\n'
                      "recovery_epochs = 1\n")
    config = resolve_config(str(recipe))
    assert config.variants == ("fp32", "ch40") and config.custom["ch40"].description == "40%"
    assert config.export_config("ch40").validate().compression.recovery_epochs == 1
    recipe.write_text('[variant.x]\nquant = ["int8"]\nformats = ["pte"]\n')
    with pytest.raises(UserError, match="variant 'x' sets unknown key"):
        resolve_config(str(recipe))
    recipe.write_text('variant_list = ["fp32"]\n')
    with pytest.raises(UserError, match="unknown key.*variant_list"):
        resolve_config(str(recipe))
    recipe.write_text("variants = [\n")
    with pytest.raises(UserError, match="not valid TOML"):
        resolve_config(str(recipe))


def test_bad_sweep_arguments_are_one_line(tmp_path: Path) -> None:
    _one_line_error(run_cli("sweep", str(tmp_path / "nowhere")), "does not exist")
    _one_line_error(run_cli("sweep", str(tmp_path), "--variants", "fp32,int4"), "unknown variant 'int4'", "int8-ptq")
    _one_line_error(run_cli("sweep", str(tmp_path), "--target", "host,arm64-a99"), "unknown target 'arm64-a99'")
    _one_line_error(run_cli("sweep", str(tmp_path), "--recipe", "huge"), "unknown sweep recipe 'huge'", "small")
    _one_line_error(run_cli("sweep", str(tmp_path), "--threads", "0"), "--threads")
    _one_line_error(run_cli("sweep", str(tmp_path), "--max-drop", "-1"), "--max-drop")


# ------------------------------------------------------------------------------ real sweeps (torch)


@pytest.mark.torch
def test_bad_output_folder_and_variant_settings_are_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_error(run_cli("sweep", str(tiny_checkpoint), "--target", "host", "--out", str(blocker / "sweep")),
                    "not writable", "a-file")
    _one_line_error(run_cli("sweep", str(tiny_checkpoint), "--target", "host", "--out", str(tmp_path / "s"),
                            "--reuse", str(tmp_path)), "--reuse", "not an export folder")
    recipe = tmp_path / "bad.toml"
    recipe.write_text('variants = ["ch"]\n[variant.ch]\nquant = ["int8"]\nprune = "channels:2"\n')
    _one_line_error(run_cli("sweep", str(tiny_checkpoint), "--recipe", str(recipe), "--out", str(tmp_path / "s")),
                    "sweep variant 'ch'", "channels:2")


def _check_report(sweep: Path, variants: list[str], targets: list[str]) -> dict:
    document = json.loads((sweep / "sweep.json").read_text())
    assert document["kind"] == "edgetl.sweep" and [v["name"] for v in document["variants"]] == variants
    assert all(v["status"] == "ok" for v in document["variants"]), document["variants"]
    assert document["failures"] == []
    assert {r["target"] for r in document["rows"]} == set(targets)
    for row in document["rows"]:
        assert 0 <= row["top1"] <= 1 and row["top1_images"] == document["reference"]["images"]
        assert row["size_bytes"] == (sweep / "variants" / row["variant"] / "export" / row["artifact"]).stat().st_size
        assert (row["instructions_per_invoke"] or 0) > 0 if row["emulated"] else row["p50_ms"] > 0
    assert "measured by the fp32 export of this sweep" in document["reference"]["source"]
    recs = {r["target"]: r for r in document["analysis"]["recommendations"]}
    assert set(recs) == set(targets)
    md, page = (sweep / "report.md").read_text(), (sweep / "report.html").read_text()
    for text in (md, page):
        assert "Rule: On each target the recommended file is the cheapest" in text
        for target, rec in recs.items():
            assert rec["id"] in text and target in text
        assert "ai-edge-litert 2.3.0" in text and "Load average" in text
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == len(document["plots"]) and "<link" not in page and "<script" not in page
    for name in document["plots"]:
        assert (sweep / "plots" / f"{name}.png").stat().st_size > 5000
    return document


@pytest.mark.torch
@pytest.mark.slow  # ~60 s on an idle 2-core machine, 150 s when it is shared
def test_sweep_exports_verifies_benches_and_reports(tiny_checkpoint: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("sweep", str(tiny_checkpoint), "--variants", "fp32,int8-ptq", "--formats", "tflite",
                     "--target", "host", "--calib", "32", "--iters", "5", "--out", str(sweep))
    assert result.returncode == 0, result.stderr[-3000:]
    document = _check_report(sweep, ["fp32", "int8-ptq"], ["host"])
    assert {r["id"] for r in document["rows"]} == {"fp32/mobilenet_v2-w0.35-32-fp32.tflite",
                                                   "int8-ptq/mobilenet_v2-w0.35-32-int8.tflite"}
    assert "recommended for host:" in result.stdout and "report.html" in result.stdout
    assert document["conditions"]["host_threads"] == [1] and document["conditions"]["host_cpu"]["cores"] >= 1
    # A second sweep takes the verified int8 file from the first instead of exporting it again.
    again = tmp_path / "again"
    result = run_cli("sweep", str(tiny_checkpoint), "--variants", "int8-ptq", "--formats", "tflite", "--target",
                     "host", "--calib", "32", "--iters", "5", "--out", str(again),
                     "--reuse", str(sweep / "variants" / "int8-ptq" / "export"))
    assert result.returncode == 0, result.stderr[-3000:]
    reused = json.loads((again / "sweep.json").read_text())
    assert reused["variants"][0]["reused_from"].endswith("int8-ptq/export")
    assert "lowering" not in result.stderr and "converting" not in result.stderr
    assert [r["top1"] for r in reused["rows"]] == [r["top1"] for r in document["rows"] if r["variant"] == "int8-ptq"]


@pytest.mark.torch
@pytest.mark.slow
def test_the_whole_grid_on_the_host(tiny_checkpoint: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "grid.toml"
    recipe.write_text('variants = ["fp32", "int8-ptq", "qat", "ch50"]\ntargets = ["host"]\nformats = ["tflite"]\n'
                      'calib = 32\niters = 5\n'
                      '[variant.qat]\nquant = ["int8"]\nqat = true\nqat_epochs = 1\ntune_images = 64\n'
                      '[variant.ch50]\nquant = ["int8"]\nprune = "channels:0.5"\nrecovery_epochs = 1\n'
                      'tune_images = 64\n')
    sweep = tmp_path / "sweep"
    result = run_cli("sweep", str(tiny_checkpoint), "--recipe", str(recipe), "--out", str(sweep))
    assert result.returncode == 0, result.stderr[-3000:]
    document = _check_report(sweep, ["fp32", "int8-ptq", "qat", "ch50"], ["host"])
    assert len(document["rows"]) == 4
    macs = {r["variant"]: r["macs"] for r in document["rows"]}
    assert macs["ch50"] < 0.6 * macs["int8-ptq"] and macs["int8-ptq"] == macs["fp32"]
    pruned = [r for r in document["rows"] if r["variant"] == "ch50"]
    assert all(r["prune"] == "channels:0.5" and r["artifact"].endswith("-ch50.tflite") for r in pruned)
    assert all(r["qat"] for r in document["rows"] if r["variant"] == "qat")


@pytest.mark.torch
@pytest.mark.arm
@pytest.mark.slow
def test_sweep_on_an_emulated_arm64_target(tiny_checkpoint: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli("sweep", str(tiny_checkpoint), "--variants", "fp32,int8-ptq", "--target", "host,arm64-a76",
                     "--calib", "32", "--iters", "5", "--out", str(sweep))
    assert result.returncode == 0, result.stderr[-3000:]
    document = _check_report(sweep, ["fp32", "int8-ptq"], ["host", "arm64-a76"])
    arm = [r for r in document["rows"] if r["target"] == "arm64-a76"]
    assert len(arm) == 4 and all(r["instructions_per_invoke"] > 10_000 for r in arm)
    assert "top1_vs_arm_instructions" in document["plots"]
    assert "qemu-aarch64 version 7.2" in (sweep / "report.md").read_text()
    rec = next(r for r in document["analysis"]["recommendations"] if r["target"] == "arm64-a76")
    assert "fewest guest instructions per invoke" in rec["reason"]


def test_sweep_out_never_replaces_its_checkpoint_or_a_folder_it_did_not_make(tmp_path: Path) -> None:
    from tests.conftest import tree_digest
    from tests.test_export import make_checkpoint

    checkpoint = make_checkpoint(tmp_path)
    before = tree_digest(tmp_path)
    _one_line_error(run_cli("sweep", str(checkpoint), "--out", str(tmp_path)), "holds this stage's input")
    _one_line_error(run_cli("sweep", str(checkpoint), "--out", str(tmp_path / "data")), "did not make")
    _one_line_error(run_cli("sweep", str(checkpoint), "--reuse", str(tmp_path / "old"), "--out",
                            str(tmp_path / "old")), "is this stage's input")
    assert tree_digest(tmp_path) == before


def test_a_stopped_sweep_leaves_the_previous_sweep_exactly_as_it_was(tmp_path: Path, monkeypatch) -> None:
    from edgetl import sweep
    from tests.conftest import tree_digest
    from tests.test_export import make_checkpoint

    checkpoint = make_checkpoint(tmp_path)
    previous = tmp_path / "sweep"
    (previous / "variants" / "fp32").mkdir(parents=True)
    (previous / "sweep.json").write_text(json.dumps({"kind": "edgetl.sweep"}))
    (previous / "report.md").write_text("the previous report")
    before = tree_digest(tmp_path)
    calls = []

    def variant(checkpoint, config, name, folder, reuse=None):
        calls.append(folder)
        folder.mkdir(parents=True)
        (folder / "half-done.txt").write_text("partial")
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"name": name, "status": "ok", "seconds": 0.0, "export": str(folder / "export"),
                "bench": str(folder / "bench")}

    monkeypatch.setattr(sweep, "run_variant", variant)
    config = resolve_config(None, variants="fp32,int8-ptq", targets="host")
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(checkpoint, config, previous)
    assert len(calls) == 2 and calls[0].parents[1] != previous  # the variants ran in a temporary folder
    assert tree_digest(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "data", "sweep"]


def test_paths_recorded_in_the_temporary_folder_name_the_final_one(tmp_path: Path) -> None:
    import os

    from edgetl.sweep import _repoint

    work, out = tmp_path / ".sweep.tmp-1", tmp_path / "sweep"
    bench = work / "variants" / "fp32" / "bench"
    bench.mkdir(parents=True)
    (bench / "manifest.json").write_text(json.dumps({"source": {"path": str(work / "variants/fp32/export")}}))
    shared = tmp_path / "reused.json"  # a --reuse export's file, hard-linked into the variant
    shared.write_text(json.dumps({"note": str(work)}))
    os.link(shared, bench / "linked@host.json")
    variants = [{"export": str(work / "variants/fp32/export"), "bench": str(bench)}]
    _repoint(work, out, variants)
    assert variants == [{"export": str(out / "variants/fp32/export"), "bench": str(out / "variants/fp32/bench")}]
    assert json.loads((bench / "manifest.json").read_text())["source"]["path"] == str(out / "variants/fp32/export")
    assert json.loads(shared.read_text())["note"] == str(work)  # the linked original is untouched
