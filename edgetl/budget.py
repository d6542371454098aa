"""`--time-budget MINUTES`: the stage-2 schedule (and a measured input size) fitted to the time a user has.

Framework-free arithmetic over what the run measured on this machine a moment before: images/s of the
backbone's eval forward and of a stage-2 training step, both timed on real batches of the folder
(`Trainer.measure_speed`), and the seconds already spent (listing, decoding, the size search). The whole
run is planned to end at `TARGET_SHARE` of the budget: stage 1 (every training and validation image once
through the backbone, then the probe), the stage-2 steps that fit, one validation pass per epoch, the
final evaluation of validation and test, and the checkpoint. The budget never adds training to the recipe:
when the recipe's own schedule fits, it is kept. A stage-2 deadline (`deadline`) guards the plan against
a machine that slows down while training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from edgetl.config import FinetuneConfig
from edgetl.errors import UserError
from edgetl.recipe import Choice, Plan

TARGET_SHARE = 0.96  # of the budget: noise in the measured speeds then stays inside the ±10% the budget allows
WRITE_SECONDS = 3.0  # weights, manifest and history written at the end


def probe_seconds(train_images: int) -> float:
    """A generous estimate of the stage-1 probe's fit (cross-validation over the penalty grid and the final
    fit): 4.2 s for 2700 images × 1280 features, measured 2026-12-06 on this project's 2-core host."""
    return 3.0 + 1.5 * train_images / 1000


@dataclass(frozen=True)
class Speed:
    """Images/s measured in this run at `image_size`, for the whole world of processes."""

    image_size: int
    forward_images_per_s: float
    train_images_per_s: float
    seconds: float = 0.0  # what measuring took

    def at(self, image_size: int) -> Speed:
        """The same machine at another input size: cost in proportion to the pixels."""
        scale = (image_size / self.image_size) ** 2
        return Speed(image_size, self.forward_images_per_s / scale, self.train_images_per_s / scale)

    def to_json(self) -> dict:
        return {"image_size": self.image_size, "forward_images_per_s": round(self.forward_images_per_s, 1),
                "train_images_per_s": round(self.train_images_per_s, 1), "seconds": round(self.seconds, 1)}


@dataclass(frozen=True)
class Estimate:
    stage1: float
    epoch_validation: float
    step: float
    final: float
    steps_per_epoch: int


def _estimate(speed: Speed, counts: dict[str, int], batch: int) -> Estimate:
    n_train, n_val, n_test = counts["train"], counts["val"], counts["test"]
    return Estimate(
        stage1=(n_train + n_val) / speed.forward_images_per_s + probe_seconds(n_train),
        epoch_validation=n_val / speed.forward_images_per_s,
        step=batch / speed.train_images_per_s,
        final=(n_val + n_test) / speed.forward_images_per_s + WRITE_SECONDS,
        steps_per_epoch=max(1, math.ceil(n_train / batch)),
    )


def _steps_that_fit(estimate: Estimate, seconds: float, most: int) -> int:
    """Stage-2 steps, with one validation pass per (possibly partial) epoch, that fit in `seconds`."""
    steps = min(most, max(0, int(seconds / estimate.step)))
    while steps > 0:
        epochs = math.ceil(steps / estimate.steps_per_epoch)
        if steps * estimate.step + epochs * estimate.epoch_validation <= seconds:
            break
        steps -= 1
    return steps


def fit_to_budget(plan: Plan, counts: dict[str, int], speed: Speed, elapsed: float,
                  size_candidates: tuple[int, ...] = ()) -> tuple[Plan, dict]:
    """The plan with its stage-2 schedule fitted to `config.train.time_budget`, and the record of why.

    `counts`: images per split; `elapsed`: seconds the run has spent; `size_candidates`: the input sizes the
    run measured (a smaller one is taken when the measured size leaves less than one epoch of stage 2).
    Raises UserError, before any training, when stage 1 and the final evaluation alone do not fit.
    """
    config = plan.config
    budget = 60.0 * float(config.train.time_budget)
    target = TARGET_SHARE * budget - elapsed
    batch = int(config.train.batch_size)
    train = config.train
    recipe_steps = int(train.epochs_finetune or 0) * math.ceil(counts["train"] / batch) if train.unfreeze else 0
    size = int(config.model.image_size)
    estimate = _estimate(speed.at(size), counts, batch)
    fixed = estimate.stage1 + estimate.final
    if fixed > target:
        smallest = min((s for s in size_candidates if s < size), default=None)
        hint = f"; or --image-size {smallest}" if smallest else ""
        raise UserError(
            f"--time-budget {config.train.time_budget:g} min does not fit stage 1 here: {elapsed:.0f} s spent, and "
            f"stage "
            f"1 with the final evaluation needs about {fixed:.0f} s more ({counts['train'] + counts['val']} images "
            f"through the backbone at {speed.at(size).forward_images_per_s:.1f} images/s); give at least "
            f"{math.ceil((elapsed + fixed) / TARGET_SHARE / 60 * 10) / 10:g} minutes{hint}")
    steps = _steps_that_fit(estimate, target - fixed, recipe_steps)
    size_why = ""
    if size_candidates and plan.choices["image_size"].source == "auto" and recipe_steps and \
            steps < min(recipe_steps, estimate.steps_per_epoch):
        for smaller in sorted((s for s in size_candidates if s < size), reverse=True):
            trial = _estimate(speed.at(smaller), counts, batch)
            trial_steps = _steps_that_fit(trial, target - trial.stage1 - trial.final, recipe_steps)
            if trial_steps >= min(recipe_steps, trial.steps_per_epoch) or smaller == min(size_candidates):
                size_why = (f"{size} px left {steps} stage-2 steps in the budget (under one epoch); {smaller} px, "
                            f"the next measured size, leaves {trial_steps}")
                size, estimate, steps = smaller, trial, trial_steps
                break
    epochs = math.ceil(steps / estimate.steps_per_epoch) if steps else 0
    planned = elapsed + estimate.stage1 + steps * estimate.step + epochs * estimate.epoch_validation + estimate.final
    record = {
        "minutes": config.train.time_budget,
        "speed": speed.to_json(),
        "seconds_spent_before_plan": round(elapsed, 1),
        "estimate_seconds": {"stage1": round(estimate.stage1, 1), "stage2_step": round(estimate.step, 2),
                             "validation_per_epoch": round(estimate.epoch_validation, 1),
                             "final_evaluation_and_write": round(estimate.final, 1)},
        "recipe_steps": recipe_steps,
        "planned_steps": steps,
        "planned_epochs": epochs,
        "planned_end_seconds": round(planned, 1),
        "stage2_deadline_seconds": round(budget - estimate.final, 1),
    }
    why = (f"{config.train.time_budget:g} min: training {speed.at(size).train_images_per_s:.1f} and forward "
           f"{speed.at(size).forward_images_per_s:.1f} images/s measured at {size} px; stage 1 ≈ "
           f"{estimate.stage1:.0f} s, stage 2 {steps} of the recipe's {recipe_steps} steps; "
           f"ends ≈ {planned / 60:.1f} min")
    choices = dict(plan.choices)
    choices["time_budget"] = Choice(config.train.time_budget, "flag", why)
    updates: dict = {"max_steps": steps}
    if steps < recipe_steps:
        updates["epochs_finetune"] = epochs
        choices["epochs_finetune"] = Choice(epochs, "auto", f"the time budget: {steps} steps "
                                                            f"({estimate.steps_per_epoch} an epoch)")
    if size_why:
        updates["image_size"] = size
        choices["image_size"] = Choice(size, "auto", f"the time budget: {size_why}")
        record["image_size_from"] = plan.config.model.image_size
    return replace(plan, config=config.with_(**updates), choices=choices), record


def refit_after_stage1(config: FinetuneConfig, record: dict, counts: dict[str, int], elapsed: float,
                       forward_images_per_s: float) -> FinetuneConfig:
    """The stage-2 steps again, now that stage 1 has run: its real seconds and forward speed replace the
    estimates (a timing of a few steps on a shared machine is off by 10-40%). Never more steps than the
    recipe's; the record gets the new plan."""
    budget = 60.0 * float(config.train.time_budget)
    train_rate = record["speed"]["train_images_per_s"] * (config.model.image_size / record["speed"]["image_size"]) ** -2
    speed = Speed(int(config.model.image_size), forward_images_per_s, train_rate)
    estimate = _estimate(speed, counts, int(config.train.batch_size))
    steps = _steps_that_fit(estimate, TARGET_SHARE * budget - elapsed - estimate.final, record["recipe_steps"])
    epochs = math.ceil(steps / estimate.steps_per_epoch) if steps else 0
    record["after_stage1"] = {
        "seconds_spent": round(elapsed, 1), "forward_images_per_s": round(forward_images_per_s, 1),
        "steps": steps, "epochs": epochs,
        "planned_end_seconds": round(elapsed + steps * estimate.step + epochs * estimate.epoch_validation
                                     + estimate.final, 1)}
    record["stage2_deadline_seconds"] = round(budget - estimate.final, 1)
    record["final_estimate_seconds"] = round(estimate.final, 1)
    return config.with_(max_steps=steps, epochs_finetune=epochs)


def refit_during_stage2(config: FinetuneConfig, record: dict, elapsed: float, steps_done: int, step_seconds: float,
                        epoch_overhead: float, steps_per_epoch: int) -> int:
    """Stage 2's total steps again after an epoch, from the seconds its steps and its validation really took:
    the schedule then ends at the budget's target on a machine that runs faster or slower than it was timed.
    Never more than the recipe's steps, never fewer than those done."""
    budget = 60.0 * float(config.train.time_budget)
    final = record.get("final_estimate_seconds", record["estimate_seconds"]["final_evaluation_and_write"])
    estimate = Estimate(stage1=0.0, epoch_validation=epoch_overhead, step=max(1e-6, step_seconds), final=final,
                        steps_per_epoch=max(1, steps_per_epoch))
    left = TARGET_SHARE * budget - elapsed - final
    total = steps_done + _steps_that_fit(estimate, left, max(0, record["recipe_steps"] - steps_done))
    record.setdefault("refits", []).append({"after_steps": steps_done, "seconds_spent": round(elapsed, 1),
                                            "step_seconds": round(step_seconds, 3), "total_steps": total})
    return total
