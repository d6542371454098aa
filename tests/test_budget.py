"""--time-budget: the stage-2 schedule fitted to measured speeds, stage 1 that does not fit refused before training,
and a real run that plans, records and keeps to its budget."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgetl.budget import Speed, fit_to_budget
from edgetl.config import FinetuneConfig
from edgetl.errors import UserError
from edgetl.recipe import Choice, Plan
from tests.conftest import run_cli

COUNTS = {"train": 2700, "val": 300, "test": 1000}


def demo_plan(minutes: float, image_size: int = 128, source: str = "flag") -> Plan:
    config = FinetuneConfig.of(data="x", image_size=image_size, batch_size=64, epochs_finetune=5, unfreeze=-1,
                            time_budget=minutes)
    return Plan(config, {"image_size": Choice(image_size, source, "test"),
                         "epochs_finetune": Choice(5, "auto", "test")})


def test_the_schedule_ends_inside_the_budget() -> None:
    speed = Speed(128, forward_images_per_s=100.0, train_images_per_s=20.0)
    fitted, record = fit_to_budget(demo_plan(5), COUNTS, speed, elapsed=10.0)
    # stage 1: 3000 images at 100/s + the probe's 7.05 s; a step: 64 images at 20/s; final: 1300 at 100/s + 3 s
    assert record["recipe_steps"] == 215
    assert record["planned_steps"] == 68 and record["planned_epochs"] == 2
    assert fitted.config.train.max_steps == 68 and fitted.config.train.epochs_finetune == 2
    assert 0.9 * 300 <= record["planned_end_seconds"] <= 300
    assert fitted.choices["epochs_finetune"].why.startswith("the time budget: 68 steps")
    assert "ends ≈ 4.8 min" in fitted.choices["time_budget"].why
    assert record["stage2_deadline_seconds"] == pytest.approx(300 - 16.0)


def test_a_budget_larger_than_the_recipe_keeps_the_recipe() -> None:
    speed = Speed(128, forward_images_per_s=400.0, train_images_per_s=200.0)
    fitted, record = fit_to_budget(demo_plan(60), COUNTS, speed, elapsed=5.0)
    assert record["planned_steps"] == 215 and fitted.config.train.epochs_finetune == 5
    assert "epochs_finetune" in fitted.choices and fitted.choices["epochs_finetune"].why == "test"


def test_stage_1_that_does_not_fit_is_refused_with_what_would() -> None:
    speed = Speed(128, forward_images_per_s=20.0, train_images_per_s=5.0)
    with pytest.raises(UserError, match=r"--time-budget 1 min does not fit stage 1 here: 30 s spent, and stage 1 "
                                        r"with the final evaluation needs about 225 s more .* give at least 4.5 "
                                        r"minutes"):
        fit_to_budget(demo_plan(1), COUNTS, speed, elapsed=30.0)


def test_stage_2_is_planned_again_from_what_stage_1_really_took() -> None:
    from edgetl.budget import refit_after_stage1

    speed = Speed(128, forward_images_per_s=100.0, train_images_per_s=20.0)
    fitted, record = fit_to_budget(demo_plan(5), COUNTS, speed, elapsed=10.0)
    # stage 1 ran faster than estimated (ended at 35 s, forward at 200 images/s): more steps fit
    again = refit_after_stage1(fitted.config, record, COUNTS, elapsed=35.0, forward_images_per_s=200.0)
    assert again.train.max_steps > fitted.config.train.max_steps
    assert record["after_stage1"]["steps"] == again.train.max_steps and again.train.epochs_finetune == 2
    assert 0.9 * 300 <= record["after_stage1"]["planned_end_seconds"] <= 0.96 * 300
    # ... and slower: fewer, never below zero, never more than the recipe's
    late = refit_after_stage1(fitted.config, record, COUNTS, elapsed=290.0, forward_images_per_s=50.0)
    assert late.train.max_steps == 0 and late.train.epochs_finetune == 0
    quick = refit_after_stage1(fitted.config, record, COUNTS, elapsed=1.0, forward_images_per_s=1e6)
    assert quick.train.max_steps <= 215


def test_stage_2_is_refitted_after_each_epoch_from_its_real_step_time() -> None:
    from edgetl.budget import refit_after_stage1, refit_during_stage2

    speed = Speed(128, forward_images_per_s=100.0, train_images_per_s=20.0)  # 3.2 s a step, as timed
    fitted, record = fit_to_budget(demo_plan(5), COUNTS, speed, elapsed=10.0)
    config = refit_after_stage1(fitted.config, record, COUNTS, elapsed=40.0, forward_images_per_s=100.0)
    # one epoch (43 steps) took 2.4 s a step and 3 s of validation: the rest of the budget holds more steps
    done_at = 40.0 + 43 * 2.4 + 3.0
    total = refit_during_stage2(config, record, done_at, 43, 2.4, 3.0, 43)
    assert total > config.train.max_steps
    left = 0.96 * 300 - done_at - record["final_estimate_seconds"]
    steps_left = total - 43
    def cost(steps: int) -> float:
        return steps * 2.4 + -(-steps // 43) * 3.0

    assert cost(steps_left) <= left < cost(steps_left + 1)
    # a machine that slowed down gets fewer; never fewer than done, never more than the recipe's
    assert refit_during_stage2(config, record, 270.0, 43, 5.0, 3.0, 43) == 43
    assert refit_during_stage2(config, record, 41.0, 43, 0.01, 0.0, 43) == 215
    assert [r["total_steps"] for r in record["refits"]] == [total, 43, 215]


def test_a_measured_size_steps_down_when_it_leaves_under_one_epoch() -> None:
    speed = Speed(224, forward_images_per_s=60.0, train_images_per_s=7.0)
    fitted, record = fit_to_budget(demo_plan(5, 224, "auto"), COUNTS, speed, elapsed=10.0,
                                   size_candidates=(128, 160, 224))
    assert fitted.config.model.image_size == 160 and record["image_size_from"] == 224
    assert record["planned_steps"] >= 43  # one epoch at least
    assert "224 px left" in fitted.choices["image_size"].why
    # a size the user gave is kept: fewer steps instead
    given, _ = fit_to_budget(demo_plan(5, 224, "flag"), COUNTS, speed, elapsed=10.0, size_candidates=(128, 160, 224))
    assert given.config.model.image_size == 224 and given.config.train.max_steps < 43


def test_a_real_run_plans_records_and_keeps_its_budget(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    minutes = 1.0
    started = time.perf_counter()
    done = run_cli("finetune", "--data", "builtin:shapes", "--backbone", "mobilenet_v2", "--width", "0.35",
                   "--image-size", "32", "--weights", "none", "--device", "cpu", "--time-budget", str(minutes),
                   "--epochs-finetune", "400", "--out", str(tmp_path / "run"))
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-2000:]
    assert "time budget 1 min: training" in (done.stdout + done.stderr).replace("\n", " ")
    manifest = json.loads((tmp_path / "run" / "checkpoint" / "manifest.json").read_text())
    record = manifest["training"]["time_budget"]
    assert record["speed"]["train_images_per_s"] > 0 and record["speed"]["forward_images_per_s"] > 0
    assert record["planned_steps"] < record["recipe_steps"] == 2800  # the budget binds: 400 epochs would not fit
    assert manifest["recipe"]["choices"]["time_budget"]["value"] == minutes
    # planned again once stage 1 had run, from its real seconds and forward speed, then after every epoch
    assert record["after_stage1"]["steps"] <= record["recipe_steps"]
    final = record["refits"][-1]["total_steps"] if record.get("refits") else record["after_stage1"]["steps"]
    assert manifest["config"]["train"]["max_steps"] == final <= record["recipe_steps"]
    stage2 = [h for h in json.loads((tmp_path / "run" / "checkpoint" / "history.json").read_text())
              if h["stage"] == 2]
    assert len(stage2) == manifest["config"]["train"]["epochs_finetune"] or record["stopped_at_deadline"]
    # the process (interpreter and imports included) ends near the budget; a shared host gets some slack
    assert seconds < 60 * minutes * 1.25, seconds
    assert record["run_seconds_before_write"] <= 60 * minutes * 1.1


def test_stage_1_that_cannot_fit_exits_2_before_training(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    done = run_cli("finetune", "--data", "builtin:shapes", "--backbone", "mobilenet_v2", "--width", "0.35",
                   "--image-size", "32", "--weights", "none", "--device", "cpu", "--time-budget", "0.01",
                   "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("edgetl: error: --time-budget 0.01 min does not fit stage 1 here")
    assert not (tmp_path / "run").exists()  # the image cache went with the run, then the empty run folder
