"""`host` and the emulated `arm64-*` targets: device_bench runs on this machine, natively or under qemu-user.

The CPUs themselves (qemu model, /proc/cpuinfo, MIDR) are data in `edgetl.arm64.targets`; this module is the
target that runs on them (the `BenchTarget` interface of `edgetl.targets.base`). Under emulation the TCG plugin
counts guest instructions per invoke, and the wall time is labelled as emulated: it is not phone latency.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetl import formats
from edgetl.arm64.targets import Target
from edgetl.errors import UserError

EMULATED_LABEL = "emulated, not phone latency"


def run_device_bench(cmd: list[str], env: dict[str, str] | None) -> tuple[subprocess.CompletedProcess, float]:
    """One device_bench process, and its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    return done, time.perf_counter() - started


def failure_line(done: subprocess.CompletedProcess) -> str:
    """Why one run failed, in one line: device_bench's own error line when it gave one (exit 2: the runtime
    refused this file here, e.g. a damaged file that loads and fails at invoke), else the last line."""
    if done.returncode < 0:
        return f"crashed (signal {-done.returncode})"
    errors = [ln for ln in done.stderr.splitlines() if "error:" in ln]
    tail = (errors or done.stderr.strip().splitlines() or ["no message"])[-1]
    return f"exit {done.returncode}: {' '.join(tail.removeprefix('device_bench: error: ').split())[:300]}"


def counts(plugin_out: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Instructions per invoke from the plugin's brackets: timed invokes, then empty brackets."""
    try:
        counted = json.loads(plugin_out.read_text())
    except (OSError, ValueError):
        raise UserError(f"the instruction-count plugin wrote no result ({plugin_out})") from None
    values = counted.get("per_invoke", [])
    iters = result["conditions"]["iters"]
    empties = result["conditions"].get("empty_brackets", 0)
    if len(values) != iters + empties:
        raise UserError(f"the plugin saw {len(values)} brackets; device_bench made {iters} + {empties}")
    invokes, overhead = values[:iters], values[iters:]
    raw = statistics.median(invokes)
    bracket = statistics.median(overhead) if overhead else 0
    return {
        "instructions_per_invoke": int(raw - bracket),
        "instructions_per_invoke_raw": int(raw),
        "bracket_overhead": int(bracket),
        "spread": (max(invokes) - min(invokes)) / raw if raw else None,
        "per_invoke": invokes,
        "total_instructions": counted.get("total"),
        "threads_counted": "all guest threads",
    }


@dataclass(frozen=True)
class LocalTarget:
    """The host CPU (real time) or an emulated ARM64 CPU (guest instructions; wall time labelled emulated)."""

    cpu: Target

    remote = False

    @property
    def name(self) -> str:
        return self.cpu.name

    @property
    def description(self) -> str:
        return self.cpu.description

    @property
    def emulated(self) -> bool:
        return self.cpu.emulated

    @property
    def spec(self) -> str:
        return self.cpu.name

    def preflight(self, remote_python: str, taskset: str | None) -> None:
        """Nothing to reach: the emulated userland is set up by the stage, once for every emulated target."""

    def open(self, artifacts: list[Path], options: Any, script: Path, stack: contextlib.ExitStack) -> LocalRunner:
        return LocalRunner(self, script)

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"name": self.name, "description": self.description, "emulated": self.emulated}
        if self.emulated:
            record.update(qemu_cpu=self.cpu.qemu_cpu, cpuinfo_part=f"0x{self.cpu.part:03x}",
                          note=self.cpu.note or None)
        return record


@dataclass
class LocalRunner:
    """device_bench on this machine: the host's Python, or the guest's under qemu (the .pte runner for .pte)."""

    target: LocalTarget
    script: Path

    def stage(self) -> None:
        """Nothing to copy: the files are here."""

    def run(self, artifact: Any, threads: int, inputs: Path | None, options: Any, workdir: Path) -> dict[str, Any]:
        """One device_bench run of `artifact` (bench.Artifact); its result with the target and, under emulation,
        the instruction counts; a failure is a row of its own."""
        emulated = self.target.emulated
        iters, warmup = (options.arm_iters, options.arm_warmup) if emulated else (options.iters, options.warmup)
        samples = options.arm_samples if emulated else options.samples
        out = workdir / f"{artifact.name}@{self.target.name}-t{threads}.json"
        args = [str(artifact.path), "--threads", str(threads), "--iters", str(iters), "--warmup", str(warmup),
                "--out", str(out), "--label", f"edgetl bench {self.target.name}"]
        if inputs is not None:
            args += ["--inputs", str(inputs)]
        if samples is not None:
            args += ["--samples", str(samples)]
        plugin_out = workdir / f"{artifact.name}@{self.target.name}.count.json"
        cmd, env = self._command(artifact, args, plugin_out)
        # Every file passed `inspect` (a model, a runtime for it) and the inputs were checked before any run, so a
        # failure here, exit 2 included, belongs to this file on this target: a failed row, the others still run.
        done, seconds = run_device_bench(cmd, env)
        if done.returncode != 0 or not out.is_file():
            return {"failed": failure_line(done), "artifact": artifact.name, "target": self.target.record(),
                    "conditions": {"threads": threads}}
        result = json.loads(out.read_text())
        result["target"] = self.target.record()
        result["wall_seconds"] = round(seconds, 2)
        if artifact.macs and not result["model"].get("macs"):
            result["model"]["macs"] = artifact.macs
            result["model"]["macs_source"] = "export manifest or the .tflite of the same model"
        if emulated:
            result["emulation"] = self._emulation(plugin_out, result)
        return result

    def _command(self, artifact: Any, args: list[str], plugin_out: Path) -> tuple[list[str], dict | None]:
        if not self.target.emulated:
            return [sys.executable, str(self.script), *args], None
        from edgetl import arm64

        userland = arm64.userland()
        env = userland.env()
        qemu = userland.qemu_command(self.target.cpu, plugin_out)
        if formats.get(formats.format_of(artifact.path)).arm64 == "python":
            return [*qemu, str(userland.guest_python), str(self.script), *args, "--markers", "--no-macs"], env
        if not userland.has_runner():
            raise UserError(".pte on ARM64 needs the native runner: run `edgetl bench --setup arm64`")
        cmd = [sys.executable, str(self.script), *args, "--markers", "--runner", str(userland.runner),
               "--runner-prefix", shlex.join(qemu), "--runner-version", arm64.EXECUTORCH_VERSION]
        # device_bench itself runs on the host python here; only the runner is emulated.
        return cmd, {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}

    def _emulation(self, plugin_out: Path, result: dict[str, Any]) -> dict[str, Any]:
        from edgetl import arm64

        counted = counts(plugin_out, result)
        macs = result["model"].get("macs")
        counted["instructions_per_mac"] = counted["instructions_per_invoke"] / macs if macs else None
        counted["wall_time_label"] = EMULATED_LABEL
        record = arm64.status() or {}
        counted["qemu"] = record.get("steps", {}).get("qemu-user", {}).get("qemu_version")
        return counted
