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
    calls: dict = {"export": [], "drops": {"export": 1.1}}

    def finetune(config, run_dir):
        checkpoint = Path(run_dir) / "checkpoint"
        checkpoint.mkdir(parents=True)
        (checkpoint / "manifest.json").write_text(json.dumps({"metrics": {"test": {"top1": 0.877, "images": 1000}}}))
        return checkpoint

    def export(checkpoint, config, out):
        calls["export"].append((out.name, config))
        out.mkdir(parents=True)
        (out / "manifest.json").write_text("{}")
        if calls["drops"][out.name] > config.policy.max_drop:
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


def test_the_demo_exports_once_with_the_default_int8_policy_and_sweeps_those_files(stages: dict,
                                                                                     tmp_path: Path) -> None:
    stages["drops"]["export"] = 0.4
    demo.run_demo(tmp_path / "run")
    assert [name for name, _ in stages["export"]] == ["export"]  # no second export of its own (QAT or other)
    config = stages["export"][0][1]
    assert config.policy.int8 == "auto" and not config.policy.no_qat and not config.policy.qat
    sweep_config, reuse = stages["sweep"]
    assert reuse == tmp_path / "run" / "export" and "int8-auto" in sweep_config.variants
    assert "int8-ptq" not in sweep_config.variants  # the sweep benchmarks the int8 files the demo ended with


def test_int8_still_over_budget_fails_the_demo_after_the_sweep(stages: dict, tmp_path: Path) -> None:
    stages["drops"]["export"] = 1.3
    with pytest.raises(QualityError, match="1.3 points"):
        demo.run_demo(tmp_path / "run")
    assert "sweep" in stages  # the report is made before the demo fails
    assert [name for name, _ in stages["export"]] == ["export"]
