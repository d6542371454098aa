"""A provisioned arm64 userland: where its programs are, and the command lines and environment that run them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgetl.arm64 import apt
from edgetl.arm64.targets import Target


def host_env(root: Path) -> dict[str, str]:
    """Environment for the unpacked host programs (qemu, the cross compiler): their libraries first."""
    host = root / "host"
    multiarch = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}.get(apt.host_arch(), "x86_64-linux-gnu")
    libs = [host / "usr/lib" / multiarch, host / "lib" / multiarch, host / "usr/lib"]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(p) for p in libs] + [env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    return env


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
