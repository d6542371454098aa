"""The contract of a fine-tuning backend, as types: what `edgetl.finetune` calls on a framework's fine-tuning module
and on its Trainer. `edgetl.backends.load(framework, "finetune")` checks a module against it when it imports it,
so a backend that lacks a member fails there, by name, and not halfway through a run.

A backend module provides the names of `FinetuneBackend`; its `Trainer(config, listing, spec, initial, world,
images=...)` runs the recipe's steps (`FinetuneTrainer`). `TrainerShared` (backends/base.py) writes the steps
both frameworks share once. Imports nothing of a framework.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


class World(Protocol):
    """This process's place in a run of one or more processes."""

    is_main: bool
    size: int

    def from_main(self, make: Any) -> Any:
        """`make()` run on the main process, its value given to every process."""

    def barrier(self) -> None:
        """Wait until every process is here."""

    def sum(self, values: list[float]) -> list[float]:
        """`values` summed over the processes."""


@runtime_checkable
class FinetuneTrainer(Protocol):
    """The steps of the recipe on one framework's model (stage 1 probe, stage 2 fine-tune, the evaluations)."""

    config: Any  # the resolved FinetuneConfig; the time budget may replace it between stages
    world: World
    history: list[dict]
    failures: list[dict]  # images that could not be decoded, dropped from the listing by the stage

    def extract_features(self, split: str, bar: Any) -> tuple[Any, Any]:
        """Pooled backbone features and labels of a split (stage 1's probe trains on them)."""

    def set_head(self, weight: Any, bias: Any) -> None:
        """Install the probe's linear head."""

    def finetune(self, bar: Any, selector: Any) -> int:
        """Stage 2; offers each epoch's weights to `selector`; returns how many blocks it unfroze."""

    def evaluate_split(self, split: str) -> tuple[float, float]:
        """Cross-entropy and top-1 over a whole split, summed over processes."""

    def snapshot(self) -> Any:
        """The weights as they are now (restorable)."""

    def restore(self, state: Any) -> None:
        """Put back a snapshot's weights."""

    def batchnorm_buffers(self) -> dict:
        """BatchNorm statistics, for the record of what stage 2 changed."""

    def log(self, stage: int, epoch: int, loss: float, top1: float, val_loss: float, val_top1: float, lr: float,
            seconds: float, images: int, train_seconds: float | None = None) -> None:
        """One history row."""

    def result(self) -> Any:
        """The kept model and what the run measured (`.model`)."""


@runtime_checkable
class TimedTrainer(FinetuneTrainer, Protocol):
    """A trainer that can time a few real steps: what --time-budget needs (torch)."""

    def measure_speed(self, timed_steps: int = 3) -> dict:
        """Forward and training images per second, measured on real batches."""


@runtime_checkable
class FinetuneBackend(Protocol):
    """A framework's fine-tuning module."""

    WEIGHTS_FILE: str  # the weights file's name in the checkpoint folder
    LIBRARIES: tuple[str, ...]  # distributions whose versions the manifest records
    FEATURES_AT_ANY_SIZE: bool  # whether the backbone's pooled features work at any input size (size search)
    Trainer: type

    def preprocess_spec(self, config: Any) -> dict:
        """Resize, crop and normalisation the model expects: fine-tuning, export and apps all follow it."""

    def launch_if_needed(self, config: Any, run_dir: Path) -> Path | None:
        """Start the processes of a multi-process run and return its checkpoint, or None to train here."""

    def session(self, config: Any) -> AbstractContextManager[World]:
        """This process's world, open for the whole run."""

    def build_initial_model(self, config: Any) -> tuple[Any, dict]:
        """The backbone with its initial weights, and where they came from."""

    def evaluate(self, model: Any, config: Any, listing: Any, spec: dict, split: str, world: Any = None,
                 images: Any = None) -> Any:
        """The confusion matrix of `model` on a split."""

    def save_weights(self, model: Any, path: Path) -> None:
        """Write the weights file."""

    def describe(self, model: Any) -> dict:
        """Parameters and other facts of the model, for the manifest."""


def members(protocol: type, attributes: bool = True) -> list[str]:
    """The names a protocol asks for: its methods, and its attributes unless `attributes` is False (a class holds
    its instances' attributes only once they exist), for a check that names what is missing."""
    names = set()
    for klass in protocol.__mro__:
        if klass in (object, Protocol) or not getattr(klass, "_is_protocol", False):
            continue
        if attributes:
            names |= set(getattr(klass, "__annotations__", {}))
        names |= {name for name, value in vars(klass).items() if callable(value) and not name.startswith("_")}
    return sorted(names)


def missing(module: object) -> list[str]:
    """What a fine-tuning module lacks of `FinetuneBackend`, and its Trainer class of `FinetuneTrainer`'s
    methods."""
    lacks = [name for name in members(FinetuneBackend) if not hasattr(module, name)]
    trainer = getattr(module, "Trainer", None)
    if trainer is not None:
        lacks += [f"Trainer.{name}" for name in members(FinetuneTrainer, attributes=False)
                  if not hasattr(trainer, name)]
    return lacks
