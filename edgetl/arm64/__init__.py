"""The emulated ARM64 userland: provisioning (`provision.setup`) and the commands that run in it.

Nothing here imports torch, TensorFlow or a runtime: the userland is driven through subprocesses.
"""

from __future__ import annotations

import os

from edgetl.arm64.provision import EXECUTORCH_VERSION, arm64_root, setup, status
from edgetl.arm64.targets import TARGETS, Target
from edgetl.arm64.userland import Userland

__all__ = ["EXECUTORCH_VERSION", "TARGETS", "Target", "Userland", "arm64_root", "setup", "status"]

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
