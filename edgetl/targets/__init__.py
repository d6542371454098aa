"""Where a benchmark runs: the host, an emulated ARM64 CPU, or the user's own machine over ssh or adb.

One parser for `--target` so that `bench` and `sweep` accept the same list: `host`, the `arm64-*` names
(edgetl.arm64.targets), `ssh:[USER@]HOST[:PORT]` (edgetl.targets.ssh) and `adb[:SERIAL]`
(edgetl.targets.adb). Remote targets are parsed here, before anything connects or copies.
"""

from __future__ import annotations

from edgetl.arm64.targets import TARGETS
from edgetl.errors import UserError
from edgetl.targets.base import BenchTarget, Runner
from edgetl.targets.local import LocalTarget

REMOTE_FORMS = "ssh:[USER@]HOST[:PORT], adb[:SERIAL]"


def _parse_ssh(text: str) -> BenchTarget:
    from edgetl.targets import ssh

    return ssh.parse(text)


def _parse_adb(text: str) -> BenchTarget:
    from edgetl.targets import adb

    return adb.parse(text)


# the scheme before ":" (or the whole name) → the parser of that kind of remote target
PARSERS = {"ssh": _parse_ssh, "adb": _parse_adb}


def parse_targets(text: str) -> list[BenchTarget]:
    """`host,arm64-a76,ssh:pi@pi5` → targets in the order given, each once; bad syntax is one UserError."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError(f"--target {text!r} names no target; valid: {', '.join(TARGETS)}, {REMOTE_FORMS}")
    chosen: list[BenchTarget] = []
    for name in names:
        scheme = name.partition(":")[0]
        if scheme in PARSERS:
            found = PARSERS[scheme](name)
        elif name in TARGETS:
            found = LocalTarget(TARGETS[name])
        else:
            raise UserError(f"unknown target {name!r}; valid: {', '.join(TARGETS)}, {REMOTE_FORMS}")
        if any(other.name == found.name and other != found for other in chosen):
            raise UserError(f"--target names {found.name} twice with different settings ({name!r}); results are "
                            f"filed as <artifact>@{found.name}.json, so give each machine once")
        if found not in chosen:
            chosen.append(found)
    return chosen


def preflight(targets: list[BenchTarget], remote_python: str, taskset: str | None) -> None:
    """Every target checks what it can without copying anything: a sweep does this before any export."""
    from edgetl.targets.ssh import check_cores

    check_cores(taskset)
    for target in targets:
        target.preflight(remote_python, taskset)


__all__ = ["REMOTE_FORMS", "BenchTarget", "LocalTarget", "Runner", "parse_targets", "preflight"]
