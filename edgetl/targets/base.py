"""The one interface every bench target implements, so that `bench` and `sweep` never ask what kind a target is.

A target (`host`, an emulated `arm64-*` CPU, `ssh:`, `adb`) says its name and whether it is emulated, checks
what it can before anything is exported or copied (`preflight`), opens a runner for one bench run (`open`: a
connection, checks of every file, nothing copied yet), and describes itself for the results (`record`). The
runner copies what it needs (`stage`, once every target's checks passed) and runs one file (`run`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Runner(Protocol):
    """One target, opened for one bench run."""

    def stage(self) -> None:
        """Copy what the runs need (device_bench, a runner); called after every target's checks passed."""

    def run(self, artifact: Any, threads: int, inputs: Path | None, options: Any, workdir: Path) -> dict[str, Any]:
        """One device_bench run of one file; its result, or a row with `failed` saying why."""


@runtime_checkable
class BenchTarget(Protocol):
    """Where a benchmark runs."""

    name: str  # results are filed as <artifact>@<name>.json
    description: str
    spec: str  # what to write after --target (or in a recipe) to get this target again
    emulated: bool  # guest instruction counts, wall time labelled as emulated
    remote: bool  # another machine: its own threads, its own clock

    def preflight(self, remote_python: str, taskset: str | None) -> None:
        """Check what can be checked without copying anything (a sweep does this before any export)."""

    def open(self, artifacts: list[Path], options: Any, script: Path, stack: contextlib.ExitStack) -> Runner:
        """A runner for these files (`options`: BenchOptions), closed with `stack`; nothing is copied yet."""

    def record(self) -> dict[str, Any]:
        """What the results say about the target."""
