"""The emulated ARM64 userland: provisioning (`provision.setup`) and the commands that run in it.

Nothing here imports torch, TensorFlow or a runtime: the userland is driven through subprocesses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgetl.arm64.provision import EXECUTORCH_VERSION, arm64_root, host_env, setup, status
from edgetl.arm64.targets import DEFAULT_TARGETS, TARGETS, Target, parse_targets

__all__ = ["DEFAULT_TARGETS", "EXECUTORCH_VERSION", "TARGETS", "Target", "Userland", "arm64_root", "parse_targets",
           "setup", "status"]

GUEST_SITE = "/opt/edgetl/site"  # as the guest sees it (qemu -L maps it into rootfs/)


@dataclass(frozen=True)
class Userland:
    """Paths of a provisioned userland and the command lines that run things in it."""

    root: Path

    @property
    def qemu(self) -> Path:
        return self.root / "host/usr/bin/qemu-aarch64"

    @property
    def plugin(self) -> Path:
        return self.root / "plugin/insn_count.so"

    @property
    def guest_python(self) -> Path:
        return self.root / "rootfs/usr/bin/python3.11"

    @property
    def runner(self) -> Path:
        return self.root / "pte/edgetl_pte_runner"

    def has_runner(self) -> bool:
        return self.runner.is_file()

    def qemu_command(self, target: Target, count_to: Path | None) -> list[str]:
        """qemu-aarch64 for this target; with count_to, the instruction-count plugin writes there."""
        if not target.emulated:
            raise ValueError(f"{target.name} is not an emulated target")
        cmd = [str(self.qemu), "-U", "LD_LIBRARY_PATH", "-L", str(self.root / "targets" / target.name),
               "-cpu", target.qemu_cpu]
        if count_to is not None:
            cmd += ["-plugin", f"{self.plugin},out={count_to}"]
        return cmd

    def env(self) -> dict[str, str]:
        """Environment for qemu (its host libraries) and for the guest python (its wheels, fixed hashing).

        PYTHONHASHSEED is fixed because hash randomisation changes the guest's instruction counts.
        """
        env = {key: value for key, value in host_env(self.root).items()
               if not key.startswith(("PYTHON", "VIRTUAL_ENV", "CONDA"))}
        env.update(PYTHONPATH=GUEST_SITE, PYTHONNOUSERSITE="1", PYTHONHASHSEED="0", LC_ALL="C.UTF-8")
        return env


def userland() -> Userland:
    """The userland in the user's cache folder (provisioned or not; see `setup`)."""
    return Userland(arm64_root())


def ready(pte: bool = False) -> bool:
    """Whether set-up completed (with the .pte runner when asked)."""
    record = status()
    if not record:
        return False
    steps = record.get("steps", {})
    needed = {"qemu-user", "plugin", "rootfs", "wheels", "targets", "smoke"} | ({"pte-runner"} if pte else set())
    return needed <= set(steps) and os.path.exists(userland().qemu)
