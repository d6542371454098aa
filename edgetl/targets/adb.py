"""`--target adb[:SERIAL]`: Android phones over adb, as far as it can honestly go today.

What holds: the runtimes' Python wheels are manylinux (glibc) builds, so they cannot run in Android's own
userland (bionic) that `adb shell` gives, and Termux's files are private to the Termux app, out of reach
of the adb shell user. A native route needs an aarch64 runner linked for Android (the NDK), which edgetl
does not build. So this target checks what can be checked — adb is installed, the phone is attached and
authorised — and then says in one line how to bench that phone today: over ssh, into a glibc userland in
Termux (proot-distro Debian running sshd), through `adb forward`. Nothing is copied to the phone.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetl.errors import UserError

FORM = "adb[:SERIAL]"
_SERIAL = re.compile(r"^[A-Za-z0-9._:-]+$")
ADB_TIMEOUT_S = 15
SSH_ROUTE = ("bench it over ssh instead: in Termux run `pkg install proot-distro && proot-distro install debian`, "
             "inside Debian `apt install openssh-server python3-venv` and start sshd on port 8022, then "
             "`adb forward tcp:8022 tcp:8022` and `edgetl bench EXPORT --target ssh:root@127.0.0.1:8022` "
             "(see the README, 'Benchmark on your own board or phone')")


@dataclass(frozen=True)
class AdbTarget:
    """An Android phone named by its adb serial (or the only one attached)."""

    spec: str
    serial: str | None = None

    emulated = False
    remote = True

    @property
    def name(self) -> str:
        return f"adb-{self.serial}" if self.serial else "adb"

    @property
    def description(self) -> str:
        return f"Android phone {self.serial or '(the one attached)'} over adb"

    def preflight(self, remote_python: str, taskset: str | None) -> None:
        check(self)

    def open(self, artifacts: list[Path], options: Any, script: Path, stack: contextlib.ExitStack) -> Any:
        check(self)  # always one line: no phone, or how to bench it over ssh today

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "emulated": False, "spec": self.spec,
                "remote": True}


def parse(text: str) -> AdbTarget:
    """`adb` or `adb:SERIAL`; a malformed serial is one UserError line."""
    if text == "adb":
        return AdbTarget(spec=text)
    serial = text.removeprefix("adb:")
    if not serial or not _SERIAL.match(serial) or serial.startswith("-"):
        raise UserError(f"--target {text!r}: {serial!r} is not an adb serial; valid: {FORM} "
                        "(serials as `adb devices` lists them)")
    return AdbTarget(spec=text, serial=serial)


def attached() -> dict[str, str]:
    """Serial → state from `adb devices` (device, unauthorized, offline, ...)."""
    adb = shutil.which("adb")
    if adb is None:
        raise UserError("--target adb: no adb here; install Android platform-tools (Debian/Ubuntu: "
                        "sudo apt install adb) and attach the phone with USB debugging on")
    try:
        done = subprocess.run([adb, "devices"], capture_output=True, text=True, timeout=ADB_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"--target adb: `adb devices` gave no answer within {ADB_TIMEOUT_S} s") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(f"--target adb: `adb devices` failed ({why})")
    found = {}
    for line in done.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2:
            found[parts[0]] = parts[1]
    return found


def check(target: AdbTarget) -> None:
    """One line, exit 2, for every case: no adb, no phone, a phone not authorised, and an attached phone."""
    devices = attached()
    if target.serial is not None and target.serial not in devices:
        listed = ", ".join(f"{s} ({state})" for s, state in devices.items()) or "none"
        raise UserError(f"--target {target.spec}: no device {target.serial!r} attached; attached: {listed}")
    ready = {s: state for s, state in devices.items() if state == "device"}
    if target.serial is None and not devices:
        raise UserError("--target adb: no device attached; connect the phone by USB with USB debugging on "
                        "(check with `adb devices`)")
    serial = target.serial or (next(iter(ready)) if len(ready) == 1 else None)
    if serial is None:
        raise UserError(f"--target adb: {len(ready)} devices ready ({', '.join(ready) or 'none authorised'}); "
                        "name one: --target adb:SERIAL")
    if devices.get(serial) != "device":
        raise UserError(f"--target {target.spec}: device {serial} is {devices.get(serial)}; accept the USB "
                        "debugging prompt on the phone, then run again")
    raise UserError(f"--target {target.spec}: edgetl does not run benchmarks through adb itself (the runtimes' "
                    f"wheels need glibc; an Android-native runner needs the NDK); {SSH_ROUTE}")


__all__ = ["FORM", "AdbTarget", "attached", "check", "parse"]
