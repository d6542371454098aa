"""report.py on constructed result rows: Pareto fronts, the recommendation rule, the four alarms, and the
Markdown / self-contained HTML it writes. No framework, no measurement: the rules alone."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from edgetl.report import alarms, analyse, pareto_front, recommend, render_html, render_markdown, sections, write_report

REFERENCE = 0.900  # float checkpoint top-1


def row(variant: str, fmt: str, target: str, cost: float, top1: float = 0.900, size: int = 4_000_000,
        quant: str | None = None, prune: str | None = None, threads: int = 1, ops_outside: list[str] | None = None,
        qat: bool = False) -> dict:
    emulated = target != "host"
    return {"id": f"{variant}/m.{fmt}", "variant": variant, "artifact": f"m.{fmt}", "format": fmt,
            "quant": quant or ("fp32" if variant == "fp32" else "int8"), "prune": prune, "qat": qat,
            "size_bytes": size, "top1": top1, "top1_images": 1000, "ops_outside": ops_outside or [],
            "fully_delegated": not ops_outside, "target": target, "emulated": emulated, "threads": threads,
            "runtime": "test", "p50_ms": None if emulated else cost, "p90_ms": None,
            "instructions_per_invoke": cost if emulated else None}


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [{"id": "a", "c": 10, "top1": 0.90}, {"id": "b", "c": 5, "top1": 0.85},
              {"id": "c", "c": 12, "top1": 0.88},  # dominated by a (costlier, less accurate)
              {"id": "d", "c": 5, "top1": 0.80},  # dominated by b (same cost, less accurate)
              {"id": "e", "c": 20, "top1": 0.91}, {"id": "f", "c": 5, "top1": 0.85}]  # f ties b exactly: both stay
    assert pareto_front(points, "c") == ["b", "f", "a", "e"]


def test_recommendation_is_the_cheapest_within_budget() -> None:
    rows = [row("fp32", "tflite", "arm64-a76", 100e6, top1=0.900, size=13_000_000),
            row("int8-ptq", "tflite", "arm64-a76", 40e6, top1=0.895, size=4_000_000),
            row("pruned50-int8", "tflite", "arm64-a76", 20e6, top1=0.870, size=2_000_000, prune="channels:0.5")]
    rec = recommend(rows, "arm64-a76", budget=1.0, reference=REFERENCE, threads=1)
    assert rec["id"] == "int8-ptq/m.tflite" and rec["within_budget"]  # the pruned one lost 3 points
    assert "2 of 3 files within the 1.0-point budget" in rec["reason"] and "0.40× the fp32" in rec["reason"]
    loose = recommend(rows, "arm64-a76", budget=5.0, reference=REFERENCE, threads=1)
    assert loose["id"] == "pruned50-int8/m.tflite"


def test_ties_go_to_the_smaller_file_and_host_ties_are_wider() -> None:
    arm = [row("int8-ptq", "tflite", "arm64-a76", 40.0e6, size=4_000_000),
           row("int8-ptq", "pte", "arm64-a76", 40.3e6, size=3_700_000)]  # 0.75% more instructions: a tie
    rec = recommend(arm, "arm64-a76", 1.0, REFERENCE, 1)
    assert rec["id"] == "int8-ptq/m.pte" and "tied within 1%" in rec["reason"]
    arm[1]["instructions_per_invoke"] = 41e6  # 2.5% more: no longer a tie
    assert recommend(arm, "arm64-a76", 1.0, REFERENCE, 1)["id"] == "int8-ptq/m.tflite"
    host = [row("int8-ptq", "tflite", "host", 2.00, size=4_000_000),
            row("int8-ptq", "pte", "host", 2.08, size=3_700_000),  # 4%: inside the host's 5% noise band
            row("int8-ptq", "pte", "host", 1.00, size=3_700_000, threads=2)]  # 2 threads: not the ranked count
    assert recommend(host, "host", 1.0, REFERENCE, 1)["id"] == "int8-ptq/m.pte"
    assert recommend(host, "host", 1.0, REFERENCE, 1)["cost"] == 2.08


def test_no_file_within_budget_names_the_most_accurate_and_says_so() -> None:
    rows = [row("int8-ptq", "tflite", "host", 1.0, top1=0.85), row("fp32", "tflite", "host", 3.0, top1=0.88)]
    rec = recommend(rows, "host", 1.0, REFERENCE, 1)
    assert rec["id"] == "fp32/m.tflite" and not rec["within_budget"] and "no file is within" in rec["reason"]


def test_the_four_alarms() -> None:
    rows = [
        row("fp32", "tflite", "arm64-a53", 100e6), row("int8-ptq", "tflite", "arm64-a53", 101e6),  # int8 slower
        row("fp32", "tflite", "host", 10.0), row("int8-ptq", "tflite", "host", 10.3),  # 3%: host noise, no alarm
        row("fp32", "pte", "host", 10.0), row("int8-ptq", "pte", "host", 12.0, ops_outside=["aten.mean.dim"]),
        row("pruned30-int8", "tflite", "arm64-a53", 101e6, prune="channels:0.3"),  # not faster than int8-ptq
        row("pruned30-int8", "tflite", "host", 8.0, prune="channels:0.3"),  # 22% faster than int8-ptq: fine
        row("magnitude-int8", "tflite", "host", 10.3, prune="magnitude:0.5"),  # meant to be smaller, not faster
        row("int8-qat", "tflite", "host", 9.0, top1=0.880, qat=True),  # 2 points lost
    ]
    found = alarms(rows, budget=1.0, reference=REFERENCE, threads=1)
    kinds = sorted((a["kind"], a["id"], a["target"]) for a in found)
    assert kinds == [
        ("accuracy", "int8-qat/m.tflite", None),
        ("int8-slower", "int8-ptq/m.pte", "host"),
        ("int8-slower", "int8-ptq/m.tflite", "arm64-a53"),
        ("outside-delegate", "int8-ptq/m.pte", None),
        ("pruned-not-faster", "pruned30-int8/m.tflite", "arm64-a53"),
    ]
    slower = next(a for a in found if a["kind"] == "int8-slower" and a["target"] == "arm64-a53")
    assert "1.01×" in slower["message"] and "fp32/m.tflite" in slower["message"]
    assert "aten.mean.dim" in next(a["message"] for a in found if a["kind"] == "outside-delegate")


def _document(rows: list[dict]) -> dict:
    return {
        "created": "2026-11-25T00:00:00+00:00", "seconds": 60.0,
        "checkpoint": {"path": "/runs/x/checkpoint", "model": {"backbone": "mobilenet_v2", "width": 0.35,
                                                               "image_size": 32, "num_classes": 3}},
        "config": {"max_drop": 1.0, "targets": ["host", "arm64-a76"]},
        "reference": {"top1": REFERENCE, "images": 1000, "source": "test"},
        "conditions": {"host_threads": [1], "host_iters": 30, "host_warmup": 5, "arm_iters": 3, "arm_samples": 20,
                       "load_average_before": [1.0, 1.0, 1.0], "load_average_after": [2.0, 1.0, 1.0],
                       "runtimes": ["ai-edge-litert 2.3.0"], "host_cpu": {"model": "Test CPU", "cores": 2,
                                                                             "machine": "x86_64"},
                       "qemu": "qemu 7.2", "targets": {}},
        "variants": [{"name": "fp32", "description": "float", "overrides": {"quant": ["fp32"]}, "status": "ok",
                      "seconds": 10.0},
                     {"name": "int8-ptq", "description": "int8", "overrides": {"quant": ["int8"]}, "status": "ok",
                      "seconds": 12.0}],
        "rows": rows, "failures": [{"variant": "int8-qat", "artifact": None, "stage": "export", "error": "boom"}],
    }


def test_report_files_state_the_rule_and_the_html_is_self_contained(tmp_path: Path) -> None:
    rows = [row("fp32", "tflite", "host", 3.0, size=13_000_000), row("int8-ptq", "tflite", "host", 4.0),
            row("fp32", "tflite", "arm64-a76", 100e6, size=13_000_000),
            row("int8-ptq", "tflite", "arm64-a76", 40e6)]
    document = write_report(tmp_path, _document(rows))
    md = (tmp_path / "report.md").read_text()
    page = (tmp_path / "report.html").read_text()
    for text in (md, page):
        assert "the cheapest among those within the accuracy budget" in text
        assert "int8-slower" in text and "int8-ptq/m.tflite is slower than its fp32 twin" in text
        assert "boom" in text and "Test CPU" in text and "not phone latency" in text
    recs = {r["target"]: r["id"] for r in document["analysis"]["recommendations"]}
    assert recs == {"host": "fp32/m.tflite", "arm64-a76": "int8-ptq/m.tflite"}
    assert "| arm64-a76 | int8-ptq/m.tflite | 40.00 M instr/invoke |" in md
    assert set(document["plots"]) == {"top1_vs_arm_instructions", "top1_vs_host_latency", "top1_vs_file_size"}
    for name in document["plots"]:
        assert f"](plots/{name}.png)" in md and (tmp_path / "plots" / f"{name}.png").stat().st_size > 5000
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,iVBOR") for s in sources)
    assert "<link" not in page and "<script" not in page and "url(" not in page
    assert (tmp_path / "sweep.json").is_file()


def test_markdown_and_html_escape_what_they_are_given() -> None:
    blocks = [("h1", "t"), ("p", "a <b> & **bold** | pipe"), ("table", ["x"], [["a|b"]]), ("img", "nope", "alt")]
    page = render_html(blocks, {})
    assert "a &lt;b&gt; &amp; <strong>bold</strong> | pipe" in page and "<img" not in page
    assert "| a\\|b |" in render_markdown(blocks)


def test_analysis_of_an_empty_sweep_is_empty_not_an_error() -> None:
    analysis = analyse([], budget=1.0, reference=REFERENCE)
    assert analysis["recommendations"] == [] and analysis["alarms"] == [] and analysis["pareto"] == {"file size": []}
    document = _document([])
    document["analysis"] = analysis
    assert "no target had a measured file" in render_markdown(sections(document))


def test_importing_report_and_sweep_imports_no_framework_or_matplotlib() -> None:
    probe = subprocess.run([sys.executable, "-c", "import sys, edgetl.report, edgetl.sweep, edgetl.cli; print(sorted("
                            "m for m in ('torch', 'tensorflow', 'executorch', 'matplotlib', 'numpy') "
                            "if m in sys.modules))"], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"
