"""Where a benchmark runs: the host, an emulated ARM64 CPU, or the user's own machine over ssh or adb.

One parser for `--target` so that `bench` and `sweep` accept the same list: `host`, the `arm64-*` names
(edgetl.arm64.targets), `ssh:[USER@]HOST[:PORT]` (edgetl.targets.ssh) and `adb[:SERIAL]`
(edgetl.targets.adb). Remote targets are parsed here, before anything connects or copies.
"""

from __future__ import annotations

from typing import Any

from edgetl.arm64.targets import TARGETS, Target
from edgetl.arm64.targets import parse_targets as parse_local
from edgetl.errors import UserError

REMOTE_FORMS = "ssh:[USER@]HOST[:PORT], adb[:SERIAL]"


def parse_targets(text: str) -> list[Any]:
    """`host,arm64-a76,ssh:pi@pi5` → targets in the order given, each once; bad syntax is one UserError."""
    from edgetl.targets import adb, ssh

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"--target {text!r} names no target; valid: {', '.join(TARGETS)}, {REMOTE_FORMS}")
    chosen: list[Any] = []
    for name in names:
        if name.startswith("ssh:") or name == "ssh":
            found: Any = ssh.parse(name)
        elif name == "adb" or name.startswith("adb:"):
            found = adb.parse(name)
        elif name in TARGETS:
            found = parse_local(name)[0]
        else:
            raise UserError(f"unknown target {name!r}; valid: {', '.join(TARGETS)}, {REMOTE_FORMS}")
        if any(other.name == found.name and other != found for other in chosen):
            raise UserError(f"--target names {found.name} twice with different settings ({name!r}); results are "
                            f"filed as <artifact>@{found.name}.json, so give each machine once")
        if found not in chosen:
            chosen.append(found)
    return chosen


def spec(target: Any) -> str:
    """What to write in a recipe or on the command line to get this target again."""
    return getattr(target, "spec", None) or target.name


__all__ = ["REMOTE_FORMS", "Target", "parse_targets", "spec"]
