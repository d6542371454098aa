"""Set-up of the emulated ARM64 userland, in the user's cache folder, in one command.

What it builds (each step is skipped when its stamp says it is done with the same inputs):
  host/      Debian's dynamic qemu-user 7.2 (the static build refuses plugins) and the aarch64 cross g++,
             with whatever libraries the host lacks, unpacked with dpkg-deb
  plugin/    the instruction-count TCG plugin, compiled with the system cc against qemu-plugin.h taken
             from Debian's qemu source package (the header ships in no binary package)
  rootfs/    Debian's arm64 python3.11 and its libraries, unpacked; aarch64 wheels (numpy,
             ai-edge-litert) put in rootfs/opt/edgetl/site by the host's pip --target --platform
  targets/   one folder per ARM target for qemu -L: links into rootfs plus that CPU's /proc/cpuinfo
  pte/       edgetl_pte_runner cross-compiled against the executorch aarch64 wheel's own C++ libraries
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgetl.arm64 import apt
from edgetl.arm64.targets import TARGETS
from edgetl.arm64.userland import Userland, host_env
from edgetl.errors import UserError
from edgetl.formats import FORMATS
from edgetl.paths import cache_dir

QEMU_PACKAGE = "qemu-user"
CROSS_PACKAGE = "g++-12-aarch64-linux-gnu"
GUEST_PACKAGES = ["python3.11", "libstdc++6"]
GUEST_SKIP = {"dpkg", "tar"}  # pre-dependencies of the python packages' maintainer scripts, never run here
# numpy, and the runtime wheel of every format that runs in the guest's Python (the format registry says which)
GUEST_WHEELS = ["numpy==2.4.6", *(f.guest[0] for f in FORMATS.values() if f.guest)]
GUEST_IMPORTS = ["numpy", *(f.guest[1] for f in FORMATS.values() if f.guest)]
GUEST_PLATFORMS = ["manylinux_2_36_aarch64", "manylinux_2_28_aarch64", "manylinux_2_27_aarch64",
                   "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
EXECUTORCH_VERSION = "1.5.1"
RUNNER_LIBS = ["executorch_backend_xnnpack", "executorch_kernels_optimized", "executorch_kernels_quantized",
               "executorch_threadpool", "executorch"]
SETUP_VERSION = 1  # bump to redo every step after a change of layout

SOURCE_DIR = Path(__file__).resolve().parent

Log = Callable[[str], None]


def arm64_root() -> Path:
    """Where the userland lives: <edgetl cache>/arm64 ($EDGETL_CACHE, $XDG_CACHE_HOME/edgetl, ~/.cache/edgetl)."""
    return cache_dir() / "arm64"


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One set-up at a time per cache folder (two benches may start together)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Steps:
    """Stamped, timed steps: a stamp records the inputs a step ran with, so changed inputs redo it."""

    def __init__(self, root: Path, log: Log):
        self.root = root
        self.log = log
        self.record_path = root / "setup.json"
        try:
            self.record: dict[str, Any] = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            self.record = {}
        if self.record.get("setup_version") != SETUP_VERSION:
            self.record = {"setup_version": SETUP_VERSION, "steps": {}}
        self.ran: set[str] = set()

    def done(self, name: str, inputs: dict[str, Any]) -> bool:
        return self.record["steps"].get(name, {}).get("inputs") == inputs

    def run(self, name: str, inputs: dict[str, Any], action: Callable[[], dict[str, Any] | None],
            after: tuple[str, ...] = ()) -> None:
        """Run the step unless done with these inputs and none of the steps it builds on was just redone."""
        if self.done(name, inputs) and not self.ran.intersection(after):
            return
        self.ran.add(name)
        self.log(f"arm64 set-up: {name} ...")
        started = time.perf_counter()
        details = action() or {}
        seconds = round(time.perf_counter() - started, 1)
        self.record["steps"][name] = {"inputs": inputs, "seconds": seconds, **details}
        self.save()
        self.log(f"arm64 set-up: {name} done in {seconds:.1f} s")

    def save(self) -> None:
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record, indent=2) + "\n")
        os.replace(tmp, self.record_path)


def _fresh(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    path.mkdir(parents=True)
    return path


def _host_packages(root: Path, packages: list[str], log: Log) -> dict[str, Any]:
    """Download packages (and the dependencies the host lacks) for the host's architecture; unpack into host/."""
    host_apt = apt.PrivateApt(root / "apt" / "host", apt.host_arch())
    if not (root / "apt" / "host" / "lists").is_dir() or not any((root / "apt" / "host" / "lists").iterdir()):
        host_apt.update()
    wanted = sorted(set(packages) | set(host_apt.closure(packages)))
    dest = _fresh(root / "debs" / f"host-{packages[0]}")
    debs = host_apt.download(wanted, dest)
    log(f"arm64 set-up: unpacking {len(debs)} host packages ({sum(d.stat().st_size for d in debs) >> 20} MB)")
    apt.unpack(debs, root / "host")
    shutil.rmtree(dest)
    return {"packages": apt.package_versions(debs)}


def _qemu(root: Path, log: Log) -> dict[str, Any]:
    details = _host_packages(root, [QEMU_PACKAGE], log)
    qemu = root / "host/usr/bin/qemu-aarch64"
    done = subprocess.run([str(qemu), "--version"], capture_output=True, text=True, env=host_env(root), check=False)
    if done.returncode != 0:
        raise UserError(f"arm64 set-up: the unpacked qemu-aarch64 does not start: {done.stderr.strip()[-300:]}")
    return {**details, "qemu_version": done.stdout.splitlines()[0]}


def _plugin(root: Path, log: Log) -> dict[str, Any]:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise UserError("arm64 set-up needs a C compiler to build the instruction-count plugin: "
                        "apt-get install gcc (or set CC)")
    src_apt = apt.PrivateApt(root / "apt" / "src", apt.host_arch(), source_packages=True)
    src_apt.update()
    download = _fresh(root / "debs" / "qemu-source")
    src_apt.source("qemu", download)
    orig = next(download.glob("qemu_*.orig.tar.*"), None)
    if orig is None:
        raise UserError("arm64 set-up: the qemu source package has no orig tarball")
    include = _fresh(root / "plugin" / "include")
    with tarfile.open(orig) as archive:
        member = next((m for m in archive if m.name.endswith("include/qemu/qemu-plugin.h")), None)
        if member is None:
            raise UserError(f"arm64 set-up: {orig.name} holds no include/qemu/qemu-plugin.h")
        (include / "qemu-plugin.h").write_bytes(archive.extractfile(member).read())
    shutil.rmtree(download)
    out = root / "plugin" / "insn_count.so"
    cmd = [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-I", str(include), "-o", str(out),
           str(SOURCE_DIR / "insn_count.c")]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UserError(f"arm64 set-up: compiling the plugin failed: {done.stderr.strip()[-500:]}")
    return {"compiler": compiler, "header_from": orig.name}


def _rootfs(root: Path, log: Log) -> dict[str, Any]:
    guest_apt = apt.PrivateApt(root / "apt" / "arm64", "arm64", empty_status=True)
    guest_apt.update()
    wanted = [p for p in guest_apt.closure(GUEST_PACKAGES) if p not in GUEST_SKIP]
    dest = _fresh(root / "debs" / "arm64")
    debs = guest_apt.download(wanted, dest)
    rootfs = _fresh(root / "rootfs")
    log(f"arm64 set-up: unpacking {len(debs)} arm64 packages ({sum(d.stat().st_size for d in debs) >> 20} MB)")
    apt.unpack(debs, rootfs)
    shutil.rmtree(dest)
    return {"packages": apt.package_versions(debs)}


def _pip(*args: str, what: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")]
        raise UserError(f"arm64 set-up: {what} failed (offline? it needs PyPI): "
                        f"{'; '.join(errors[-2:]) or done.stderr.strip()[-300:]}")


def _platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    for tag in GUEST_PLATFORMS:
        args += ["--platform", tag]
    return args


def _wheels(root: Path, log: Log) -> dict[str, Any]:
    site = _fresh(root / "rootfs/opt/edgetl/site")
    _pip("install", "--no-compile", "--target", str(site), *_platform_args(), *GUEST_WHEELS,
         what="installing aarch64 wheels")
    return {"wheels": GUEST_WHEELS}


def _bytecode(root: Path, log: Log) -> dict[str, Any]:
    """Compile the guest's stdlib and wheels to .pyc with the host python (same 3.11 bytecode).

    Debian compiles them in maintainer scripts, which unpacking skips; without this every emulated run
    would compile what it imports, under qemu, at about three times the start-up cost.
    """
    if sys.version_info[:2] != (3, 11):
        return {"skipped": f"host python {sys.version_info[0]}.{sys.version_info[1]} is not 3.11; "
                           "the guest compiles on first use"}
    folders = [root / "rootfs/usr/lib/python3.11", root / "rootfs/opt/edgetl/site"]
    cmd = [sys.executable, "-m", "compileall", "-q", "-j0", "-x", r"/(test|tests|idlelib|tkinter|lib2to3)/",
           *map(str, folders)]
    subprocess.run(cmd, capture_output=True, text=True, check=False)  # a file that fails stays source-only
    return {"compiled": [str(f.relative_to(root)) for f in folders]}


def _targets(root: Path, log: Log) -> dict[str, Any]:
    rootfs = root / "rootfs"
    processors = os.cpu_count() or 1
    for target in TARGETS.values():
        if not target.emulated:
            continue
        folder = _fresh(root / "targets" / target.name)
        for entry in rootfs.iterdir():
            (folder / entry.name).symlink_to(os.path.relpath(entry, folder))
        (folder / "proc").mkdir()
        (folder / "proc" / "cpuinfo").write_text(target.cpuinfo(processors))
        for cpu in range(processors):
            regs = folder / f"sys/devices/system/cpu/cpu{cpu}/regs/identification"
            regs.mkdir(parents=True)
            (regs / "midr_el1").write_text(target.midr())
    return {"targets": [t.name for t in TARGETS.values() if t.emulated]}


def _cross(root: Path, log: Log) -> dict[str, Any]:
    return _host_packages(root, [CROSS_PACKAGE], log)


def _runner(root: Path, log: Log) -> dict[str, Any]:
    download = _fresh(root / "debs" / "executorch")
    _pip("download", "--no-deps", "-d", str(download), *_platform_args(), f"executorch=={EXECUTORCH_VERSION}",
         what=f"downloading the executorch {EXECUTORCH_VERSION} aarch64 wheel")
    wheel = next(download.glob("*.whl"))
    sdk = _fresh(root / "pte" / "sdk")
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith(("executorch/include/", "executorch/lib/")) and not name.endswith("/"):
                archive.extract(name, sdk)
    shutil.rmtree(download)
    lib = _fresh(root / "pte" / "lib")
    for name in RUNNER_LIBS:
        shutil.copy2(sdk / "executorch/lib" / f"lib{name}.so", lib)
    gxx = root / "host/usr/bin/aarch64-linux-gnu-g++-12"
    include = sdk / "executorch/include"
    out = root / "pte" / "edgetl_pte_runner"
    cmd = [str(gxx), f"--sysroot={root / 'host'}", "-O2", "-std=c++17", "-Wall", "-Wno-deprecated-declarations",
           "-DC10_USING_CUSTOM_GENERATED_MACROS", f'-DEDGETL_EXECUTORCH_VERSION="{EXECUTORCH_VERSION}"',
           "-I", str(include), "-I", str(include / "executorch/runtime/core/portable_type/c10"),
           str(SOURCE_DIR / "pte_runner.cpp"), "-o", str(out), "-L", str(lib), "-Wl,--no-as-needed",
           *[f"-l{name}" for name in RUNNER_LIBS], "-Wl,--as-needed", "-Wl,-rpath,$ORIGIN/lib"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=host_env(root), check=False)
    if done.returncode != 0:
        raise UserError(f"arm64 set-up: cross-compiling the .pte runner failed: {done.stderr.strip()[-600:]}")
    shutil.rmtree(sdk)
    return {"executorch": EXECUTORCH_VERSION, "runner": str(out)}


def _smoke(root: Path, log: Log) -> dict[str, Any]:
    """Start the guest python with the plugin loaded and import the runtime: proof the chain works."""
    userland = Userland(root)
    out = root / "plugin" / "smoke.json"
    cmd = [*userland.qemu_command(TARGETS["arm64-a76"], out), str(userland.guest_python), "-c",
           f"import {', '.join(GUEST_IMPORTS)}; print(numpy.__version__)"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=userland.env(), check=False)
    if done.returncode != 0 or not out.is_file():
        raise UserError(f"arm64 set-up: the emulated python does not run: {done.stderr.strip()[-500:]}")
    out.unlink()
    return {"guest_numpy": done.stdout.strip()}


def setup(log: Log = lambda _m: None, *, pte: bool = True, force: bool = False) -> dict[str, Any]:
    """Provision (or check) the arm64 userland; returns the set-up record (versions, seconds per step)."""
    apt.require_tools()
    root = arm64_root()
    with _locked(root):
        if force and (root / "setup.json").exists():
            (root / "setup.json").unlink()
        steps = _Steps(root, log)
        started = time.perf_counter()
        digest = {name: hashlib.sha256((SOURCE_DIR / name).read_bytes()).hexdigest()[:16]
                  for name in ("insn_count.c", "pte_runner.cpp")}
        steps.run("qemu-user", {"package": QEMU_PACKAGE, "suite": apt.DEBIAN_SUITE}, lambda: _qemu(root, log))
        steps.run("plugin", {"source": digest["insn_count.c"]}, lambda: _plugin(root, log))
        steps.run("rootfs", {"packages": GUEST_PACKAGES, "suite": apt.DEBIAN_SUITE}, lambda: _rootfs(root, log))
        steps.run("wheels", {"wheels": GUEST_WHEELS}, lambda: _wheels(root, log), after=("rootfs",))
        steps.run("bytecode", {"python": list(sys.version_info[:2])}, lambda: _bytecode(root, log),
                  after=("rootfs", "wheels"))
        steps.run("targets", {"cpuinfo": {t.name: t.cpuinfo(1) for t in TARGETS.values() if t.emulated}},
                  lambda: _targets(root, log), after=("rootfs",))
        if pte:
            steps.run("cross-g++", {"package": CROSS_PACKAGE}, lambda: _cross(root, log))
            steps.run("pte-runner", {"executorch": EXECUTORCH_VERSION, "source": digest["pte_runner.cpp"]},
                      lambda: _runner(root, log), after=("cross-g++",))
        steps.run("smoke", {"setup_version": SETUP_VERSION}, lambda: _smoke(root, log),
                  after=("qemu-user", "plugin", "rootfs", "wheels", "bytecode", "targets"))
        steps.record["last_check_seconds"] = round(time.perf_counter() - started, 1)
        steps.record["total_seconds"] = round(sum(v["seconds"] for v in steps.record["steps"].values()), 1)
        steps.save()
        return steps.record


def status() -> dict[str, Any] | None:
    """The set-up record, or None when the userland was never set up."""
    try:
        return json.loads((arm64_root() / "setup.json").read_text())
    except (OSError, ValueError):
        return None
