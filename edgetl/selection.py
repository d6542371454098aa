"""Which weights the checkpoint keeps: a model-selection rule that a small validation split cannot fool.

Framework-free. The candidates are the stage-1 probe and the stage-2 model at each evaluation. On a
large validation split the best validation top-1 wins (ties go to the lower validation loss, then to
the later candidate). On a small one top-1 moves in steps of several points and ties all the time, so
picking its maximum picks noise: there the rule keeps the end of the stage-2 schedule (the model that
was fitted for the whole budget) unless the probe beats it on validation loss and top-1 both; on a tiny
one (a few dozen images) not even that: the end of the schedule is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# Below this many validation images one image is worth more than a third of a point of top-1 and the
# 95% interval is wider than ±5.7 points at 50% accuracy: too coarse to rank epochs by their maximum.
LARGE_VALIDATION = 300
# Below this many, a loss and a top-1 both "better" are a coin toss (two images of a two-class folder
# decided it on the benchmark): the probe is kept only when there is no stage 2.
SMALL_VALIDATION = 30


@dataclass
class Candidate:
    stage: int
    epoch: int
    val_loss: float
    val_top1: float
    state: object = None  # the weights, as the backend snapshots them


@dataclass
class Selector:
    """Collects candidates as training offers them and says which one the checkpoint keeps."""

    val_images: int
    candidates: list[dict] = field(default_factory=list)
    best: Candidate | None = None
    probe: Candidate | None = None
    last: Candidate | None = None

    @property
    def rule(self) -> str:
        if self.val_images >= LARGE_VALIDATION:
            return "val_top1"
        return "end_of_schedule" if self.val_images >= SMALL_VALIDATION else "end_of_schedule_only"

    def offer(self, stage: int, epoch: int, val_loss: float, val_top1: float, snapshot: Callable[[], object]) -> None:
        """Consider the model as it is now; `snapshot()` is called only when it may be kept."""
        candidate = Candidate(stage, epoch, val_loss, val_top1)
        self.candidates.append({"stage": stage, "epoch": epoch, "val_loss": round(val_loss, 5),
                                "val_top1": round(val_top1, 5)})
        if self.rule == "val_top1":
            if self.best is None or _better(candidate, self.best):
                candidate.state = snapshot()
                self.best = candidate
            return
        candidate.state = snapshot()
        if stage == 1:
            self.probe = candidate
        else:
            if self.last is not None and self.last is not self.probe:
                self.last.state = None  # only the probe and the latest stage-2 model are kept in memory
            self.last = candidate

    def chosen(self) -> Candidate:
        if self.rule == "val_top1":
            assert self.best is not None
            return self.best
        if self.last is None or self.last.stage == 1:
            assert self.probe is not None
            return self.probe
        if self.rule == "end_of_schedule" and self.probe is not None and self.probe.val_loss < self.last.val_loss \
                and self.probe.val_top1 > self.last.val_top1:
            return self.probe
        return self.last

    def record(self) -> dict:
        """What the manifest says about the choice: the rule, why it applies, and the candidate kept."""
        chosen = self.chosen()
        if self.rule == "val_top1":
            why = (f"validation split of {self.val_images} images (>= {LARGE_VALIDATION}): the highest validation "
                   f"top-1 over the probe and every stage-2 evaluation, ties to the lower validation loss, then the "
                   f"later model")
        elif self.rule == "end_of_schedule":
            why = (f"validation split of only {self.val_images} images (< {LARGE_VALIDATION}): one image moves "
                   f"top-1 by {100 / max(1, self.val_images):.1f} points, so the maximum is noise; kept the model "
                   f"at the end of the stage-2 schedule unless the probe beat it on validation loss and top-1 both")
        else:
            why = (f"validation split of only {self.val_images} images (< {SMALL_VALIDATION}): too few to rank "
                   f"even the probe against stage 2; kept the model at the end of the stage-2 schedule")
        return {"rule": self.rule, "why": why, "stage": chosen.stage, "epoch": chosen.epoch,
                "val_loss": round(chosen.val_loss, 5), "val_top1": round(chosen.val_top1, 5),
                "candidates": self.candidates}


def _better(new: Candidate, old: Candidate) -> bool:
    """Higher top-1; on a tie the lower loss; on a full tie the later (better-fitted) model."""
    if new.val_top1 != old.val_top1:
        return new.val_top1 > old.val_top1
    return new.val_loss <= old.val_loss
