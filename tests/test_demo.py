"""`edgetl demo`'s control flow around its stages (the stages themselves are tested in their own files; the
whole demo is measured, not unit-tested: docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgetl import demo
from edgetl.verify import QualityError


@pytest.fixture
def stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Fake fine-tune / export / sweep that record their calls; export's int8 drops are scripted per folder."""
    calls: dict = {"export": [], "drops": {"export": 1.1, "export-qat": 0.5}}

    def finetune(config, run_dir):
        checkpoint = Path(run_dir) / "checkpoint"
        checkpoint.mkdir(parents=True)
        (checkpoint / "manifest.json").write_text(json.dumps({"metrics": {"test": {"top1": 0.877, "images": 1000}}}))
        return checkpoint

    def export(checkpoint, config, out):
        calls["export"].append((out.name, config))
        out.mkdir(parents=True)
        (out / "manifest.json").write_text("{}")
        if calls["drops"][out.name] > config.max_drop:
            raise QualityError(f"int8 top-1 fell {calls['drops'][out.name]} points")
        return out

    def sweep(checkpoint, config, out, reuse=None):
        calls["sweep"] = (config, reuse)
        out.mkdir(parents=True)
        (out / "sweep.json").write_text(json.dumps({"analysis": {"alarms": []}}))
        return out

    monkeypatch.setattr(demo, "run_finetune", finetune)
    monkeypatch.setattr(demo, "run_export", export)
    monkeypatch.setattr(demo, "run_sweep", sweep)
    return calls


def test_int8_over_budget_is_remade_by_qat_and_the_demo_passes(stages: dict, tmp_path: Path) -> None:
    demo.run_demo(tmp_path / "run")
    (first, ptq), (second, qat) = stages["export"]
    assert (first, second) == ("export", "export-qat")
    assert not ptq.qat and qat.qat and qat.quant == ("int8",) and qat.qat_epochs == demo.DEMO_QAT_EPOCHS
    assert stages["sweep"][1] == tmp_path / "run" / "export"  # the sweep still reuses the PTQ export


def test_qat_over_budget_too_fails_the_demo_after_the_sweep(stages: dict, tmp_path: Path) -> None:
    stages["drops"]["export-qat"] = 1.3
    with pytest.raises(QualityError, match="1.3 points"):
        demo.run_demo(tmp_path / "run")
    assert "sweep" in stages  # the report is made before the demo fails


def test_int8_within_budget_needs_no_qat(stages: dict, tmp_path: Path) -> None:
    stages["drops"]["export"] = 0.4
    demo.run_demo(tmp_path / "run")
    assert [name for name, _ in stages["export"]] == ["export"]
