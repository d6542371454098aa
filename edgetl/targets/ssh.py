"""`--target ssh:[USER@]HOST[:PORT]`: device_bench on the user's own board or machine, over OpenSSH.

Why it works the way it does: the user's `ssh` client does the connecting, with their keys and their
`~/.ssh/config` (or the file EDGETL_SSH_CONFIG names), in BatchMode (never a password prompt) and with a
ConnectTimeout, so a bad target fails in one line after a bounded wait. One master connection carries every
command. Before anything is copied, the remote is probed (uname, /proc/cpuinfo, lscpu, its Python and the
runtimes installed there) and every file to bench is checked against it, so a missing runtime is one line
naming the exact `pip install` for that machine. Then a private folder made by `mktemp -d` receives
device_bench.py, the models, their inputs and (for .pte on aarch64) the native runner with its libraries;
the results come back as JSON, and the folder is removed on the way out, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl import formats
from edgetl.errors import UserError

FORM = "ssh:[USER@]HOST[:PORT]"
_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # never a leading '-': it would be read as an ssh option
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_CORES = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
CONNECT_TIMEOUT_S = 10
TEMP_PREFIX = "edgetl-bench."
DEFAULT_PYTHON = "python3"

# ARM MIDR part numbers (implementer 0x41) of the cores phones and boards carry, for the core layout.
ARM_PARTS = {0xD03: "Cortex-A53", 0xD04: "Cortex-A35", 0xD05: "Cortex-A55", 0xD07: "Cortex-A57",
             0xD08: "Cortex-A72", 0xD09: "Cortex-A73", 0xD0A: "Cortex-A75", 0xD0B: "Cortex-A76",
             0xD0C: "Neoverse-N1", 0xD0D: "Cortex-A77", 0xD41: "Cortex-A78", 0xD44: "Cortex-X1",
             0xD46: "Cortex-A510", 0xD47: "Cortex-A710", 0xD48: "Cortex-X2", 0xD4D: "Cortex-A715",
             0xD4E: "Cortex-X3", 0xD80: "Cortex-A520", 0xD81: "Cortex-A720", 0xD82: "Cortex-X4"}


@dataclass(frozen=True)
class SshTarget:
    """A machine reached with the user's ssh client; results are filed as <artifact>@ssh-<host>.json."""

    spec: str
    host: str
    user: str | None = None
    port: int | None = None

    emulated = False
    remote = True

    @property
    def name(self) -> str:
        return f"ssh-{self.host}"

    @property
    def destination(self) -> str:
        return f"{self.user + '@' if self.user else ''}{self.host}{':' + str(self.port) if self.port else ''}"

    @property
    def description(self) -> str:
        return f"{self.destination} over ssh (real time on that machine)"

    def preflight(self, remote_python: str, taskset: str | None) -> None:
        """Connect, and check its Python and numpy, copying nothing."""
        check_cores(taskset)
        with SshSession(self, python=remote_python, taskset=taskset) as session:
            session.check([], None)

    def open(self, artifacts: list[Path], options: Any, script: Path, stack: contextlib.ExitStack) -> SshRunner:
        """A connected session that checked every file (the .pte runner too); nothing is copied yet."""
        session = stack.enter_context(SshSession(self, python=options.remote_python, taskset=options.taskset))
        runner = None
        if any(formats.get(formats.format_of(path)).arm64 == "runner" for path in artifacts):
            from edgetl import arm64

            userland = arm64.userland()
            runner = userland.runner if userland.has_runner() else None
        session.check(list(artifacts), runner)
        return SshRunner(session, script)

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "emulated": False, "spec": self.spec,
                "remote": True}


def parse(text: str) -> SshTarget:
    """`ssh:pi@pi5:2222` → SshTarget; every malformed form is one UserError line, before any connection."""
    rest = text.removeprefix("ssh:") if text.startswith("ssh:") else ""
    if not rest:
        raise UserError(f"--target {text!r} names no host; valid: {FORM} (e.g. ssh:pi@raspberrypi.local)")
    user, at, hostport = rest.rpartition("@")
    host, colon, port_text = hostport.partition(":")
    if at and not _USER.match(user):
        raise UserError(f"--target {text!r}: user {user!r} is not a user name; valid: {FORM}")
    if not host or not _HOST.match(host):
        raise UserError(f"--target {text!r}: host {host!r} is not a host name or address; valid: {FORM}")
    port = None
    if colon:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise UserError(f"--target {text!r}: port {port_text!r} is not a port; valid: {FORM} with PORT 1-65535")
        port = int(port_text)
    return SshTarget(spec=text, host=host, user=user or None, port=port)


def check_cores(cores: str | None) -> str | None:
    """--taskset CORES: a CPU list as taskset -c reads it (0-3, or 4,5,6,7)."""
    if cores is None:
        return None
    if not _CORES.match(cores.replace(" ", "")):
        raise UserError(f"--taskset {cores!r} is not a CPU list; valid: e.g. 4-7 or 0,2,4 (as taskset -c takes)")
    return cores.replace(" ", "")


def _cpu_ids(cores: str) -> set[int]:
    ids: set[int] = set()
    for part in cores.split(","):
        low, _, high = part.partition("-")
        ids.update(range(int(low), int(high or low) + 1))
    return ids


def _version(dist: str, default: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return default


# ------------------------------------------------------------------------------------------- probing

# the distributions whose versions the probe reads there: numpy, then from the format registry every format's
# runtime wheel, the distributions that run it as well, and the Python runtime of those with a native runner
PROBED = tuple(dict.fromkeys(("numpy", *(dist for f in formats.FORMATS.values() for dist in (
    *((f.guest[0].split("==")[0],) if f.guest else ()), *f.alternatives, *f.python_runtime)))))
_PY_PROBE = ("import json, platform, sys\n"
             "try:\n from importlib import metadata\nexcept ImportError:\n metadata = None\n"
             "def v(d):\n try:\n  return metadata.version(d)\n except Exception:\n  return None\n"
             "print(json.dumps({'executable': sys.executable, 'version': platform.python_version(),"
             " 'packages': {d: v(d) for d in " + repr(PROBED) + "}}))")


def _probe_script(python: str) -> str:
    py = shlex.quote(python)
    return "\n".join([
        "echo @@uname_m; uname -m", "echo @@uname; uname -srvm", "echo @@nproc; nproc 2>/dev/null || "
        "getconf _NPROCESSORS_ONLN", "echo @@loadavg; cat /proc/loadavg 2>/dev/null",
        "echo @@lscpu; lscpu 2>/dev/null", "echo @@cpuinfo; cat /proc/cpuinfo 2>/dev/null",
        "echo @@taskset; command -v taskset", "echo @@tar; command -v tar",
        f"echo @@python; if command -v {py} >/dev/null 2>&1; then {py} -c {shlex.quote(_PY_PROBE)}; fi",
        "echo @@end",
    ])


def _sections(text: str) -> dict[str, str]:
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("@@"):
            current = line[2:].strip()
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return {key: "\n".join(lines).strip() for key, lines in found.items()}


def _load(text: str) -> list[float] | None:
    try:
        return [float(v) for v in text.split()[:3]] or None
    except ValueError:
        return None


def cpu_layout(cpuinfo: str, lscpu: str) -> dict[str, Any]:
    """The CPU as the remote describes it: model name(s), cores of each kind, lscpu's summary lines."""
    kinds: dict[str, int] = {}
    for block in cpuinfo.split("\n\n"):
        fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in block.splitlines())}
        if "processor" not in fields:
            continue
        if "CPU part" in fields and fields.get("CPU implementer", "").lower() == "0x41":
            part = int(fields["CPU part"], 16)
            kind = ARM_PARTS.get(part, f"Arm part 0x{part:03x}")
        else:
            kind = fields.get("model name") or fields.get("CPU part") or "unknown"
        kinds[kind] = kinds.get(kind, 0) + 1
    summary = {}
    for line in lscpu.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("Architecture", "CPU(s)", "Model name", "Thread(s) per core", "Core(s) per socket",
                           "Core(s) per cluster", "Socket(s)", "Cluster(s)", "CPU max MHz", "CPU min MHz", "Flags"):
            summary.setdefault(key.strip(), []).append(value.strip())
    models = summary.get("Model name", [])
    return {"cores": kinds, "layout": " + ".join(f"{n}× {k}" for k, n in kinds.items()) or None,
            "model": " / ".join(models) if models else (next(iter(kinds)) if len(kinds) == 1 else None),
            "lscpu": {k: v[0] if len(v) == 1 else v for k, v in summary.items() if k != "Flags"}}


@dataclass
class Probe:
    """What the remote said about itself before anything was copied."""

    machine: str
    uname: str
    cpu_count: int | None
    load_average: list[float] | None
    cpu: dict[str, Any]
    python: dict[str, Any] | None
    has_taskset: bool
    has_tar: bool

    @classmethod
    def parse(cls, text: str) -> Probe:
        found = _sections(text)
        python = None
        for line in reversed(found.get("python", "").splitlines()):
            with contextlib.suppress(ValueError):
                python = json.loads(line)
                break
        nproc = found.get("nproc", "").split()
        return cls(machine=found.get("uname_m", "").strip() or "unknown", uname=found.get("uname", ""),
                   cpu_count=int(nproc[0]) if nproc and nproc[0].isdigit() else None,
                   load_average=_load(found.get("loadavg", "")),
                   cpu=cpu_layout(found.get("cpuinfo", ""), found.get("lscpu", "")), python=python,
                   has_taskset=bool(found.get("taskset")), has_tar=bool(found.get("tar")))

    def package(self, dist: str) -> str | None:
        return (self.python or {}).get("packages", {}).get(dist)


# ------------------------------------------------------------------------------------------ sessions


@dataclass
class Plan:
    """How one file runs on the remote: which runtime, and whether the native runner goes along."""

    fmt: str
    runtime: str
    runner: Path | None = None


@dataclass
class SshSession:
    """One master connection to one target, its probe, its remote folder; a context manager that cleans up."""

    target: SshTarget
    python: str = DEFAULT_PYTHON
    taskset: str | None = None
    connect_timeout: int = CONNECT_TIMEOUT_S
    probe: Probe | None = None
    remote_dir: str | None = None
    plans: dict[str, Plan] = field(default_factory=dict)
    _control: Path | None = None
    _master: subprocess.Popen | None = None
    _uploaded: dict[str, str] = field(default_factory=dict)

    # ---- the ssh command line

    def _base(self) -> list[str]:
        ssh = shutil.which("ssh")
        if ssh is None:
            raise UserError(f"--target {self.target.spec}: no ssh client here; install OpenSSH "
                            "(Debian/Ubuntu: apt install openssh-client)")
        cmd = [ssh]
        config = os.environ.get("EDGETL_SSH_CONFIG")
        if config:
            if not Path(config).is_file():
                raise UserError(f"EDGETL_SSH_CONFIG {config!r} is not a file; valid: an ssh_config(5) file")
            cmd += ["-F", config]
        cmd += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]
        if self._control is not None:
            cmd += ["-o", f"ControlPath={self._control / 'master'}"]
        if self.target.port:
            cmd += ["-p", str(self.target.port)]
        if self.target.user:
            cmd += ["-l", self.target.user]
        return [*cmd, self.target.host]

    def _fail(self, what: str, stderr: str) -> UserError:
        lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Warning:")]
        why = (lines or ["no message"])[-1].removeprefix("ssh: ")
        return UserError(f"--target {self.target.spec}: {what} ({why})")

    def run(self, command: str, timeout: float | None = 60, check: bool = True,
            what: str = "remote command failed") -> subprocess.CompletedProcess:
        done = subprocess.run([*self._base(), command], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
        if check and done.returncode != 0:
            raise self._fail(what, done.stderr)
        return done

    # ---- connect, probe, check

    def __enter__(self) -> SshSession:
        try:
            self.connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Start the master connection (bounded by ConnectTimeout) and probe the remote."""
        self._base()  # raises before anything starts when ssh is missing
        self._control = Path(tempfile.mkdtemp(prefix="edgetl-ssh-"))
        errors = self._control / "master.err"
        base = self._base()
        with errors.open("w") as err:
            # Its own session: Ctrl-C reaches edgetl, which still needs the connection to clean up.
            self._master = subprocess.Popen([*base[:-1], "-M", "-N", "-o", "ControlPersist=no", base[-1]],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                            start_new_session=True)
        deadline = time.monotonic() + self.connect_timeout + 15
        while True:
            if self._master.poll() is not None:
                raise self._fail("cannot connect", errors.read_text(errors="replace"))
            check = subprocess.run([*base[:-1], "-O", "check", base[-1]], capture_output=True, text=True,
                                   check=False)
            if check.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise UserError(f"--target {self.target.spec}: no connection after {self.connect_timeout + 15} s")
            time.sleep(0.1)
        done = self.run(f"sh -c {shlex.quote(_probe_script(self.python))}", what="cannot probe the remote")
        self.probe = Probe.parse(done.stdout)

    def check(self, models: list[Path], runner: Path | None) -> None:
        """Every file can run there, or one line says what to install; nothing is copied before this passes."""
        probe = self.probe
        assert probe is not None
        where = f"{self.target.destination} ({probe.machine})"
        if probe.python is None:
            raise UserError(f"--target {self.target.spec}: no usable Python {self.python!r} on {where}; install "
                            "Python 3.9 or newer there (Debian/Raspberry Pi OS: sudo apt install python3-venv) or "
                            "name it with --remote-python")
        py = probe.python.get("executable") or self.python
        if not probe.has_tar:
            raise UserError(f"--target {self.target.spec}: no tar on {where}; install tar there")
        if self.taskset is not None:
            if not probe.has_taskset:
                raise UserError(f"--target {self.target.spec}: --taskset needs taskset on {where}; install "
                                "util-linux there (sudo apt install util-linux)")
            missing = sorted(c for c in _cpu_ids(self.taskset) if probe.cpu_count and c >= probe.cpu_count)
            if missing:
                raise UserError(f"--taskset {self.taskset}: {where} has CPUs 0-{probe.cpu_count - 1}; "
                                f"no CPU {', '.join(map(str, missing))}")
        if probe.package("numpy") is None:
            raise UserError(f"--target {self.target.spec}: {py} on {where} has no numpy; run there: "
                            f"{py} -m pip install numpy")
        for model in models:
            self.plans[model.name] = self._plan(model, runner, py, where)

    def _plan(self, model: Path, runner: Path | None, py: str, where: str) -> Plan:
        """How `model` runs there, from its format's record: a runtime wheel in that Python, or edgetl's native
        runner (or, on another machine, the format's Python runtime); one line naming what to install if neither."""
        record = formats.get(formats.format_of(model))
        if record.arm64 == "runner":
            return self._runner_plan(record, model, runner, py, where)
        return self._wheel_plan(record, model, py, where)

    def _wheel_plan(self, record: formats.Format, model: Path, py: str, where: str) -> Plan:
        probe = self.probe
        assert probe is not None and record.guest is not None
        wanted, _, pinned = record.guest[0].partition("==")
        for dist in (wanted, *record.alternatives):
            if probe.package(dist):
                return Plan(record.name, f"{dist} {probe.package(dist)}")
        if record.wheel_machines and probe.machine not in record.wheel_machines:
            raise UserError(f"--target {self.target.spec}: {model.name} needs {record.runtime}, which publishes no "
                            f"wheel for {probe.machine}; use a 64-bit OS (aarch64) on {self.target.host}")
        raise UserError(f"--target {self.target.spec}: {py} on {where} has no {record.runtime} for {model.name}; "
                        f"run there: {py} -m pip install {wanted}=={_version(wanted, pinned)}")

    def _runner_plan(self, record: formats.Format, model: Path, runner: Path | None, py: str, where: str) -> Plan:
        probe = self.probe
        assert probe is not None
        if probe.machine == record.runner_machine:
            if runner is None:
                raise UserError(f"--target {self.target.spec}: {model.name} on {where} runs with edgetl's "
                                f"{record.runner_machine} {record.suffix} runner, which is not built yet: run "
                                f"`edgetl bench --setup arm64`")
            return Plan(record.name, f"edgetl_{record.name}_runner", runner)
        first = record.python_runtime[0] if record.python_runtime else None
        if first and all(probe.package(dist) for dist in record.python_runtime):
            return Plan(record.name, f"{first} {probe.package(first)} (Python runtime)")
        install = ""
        if first:
            version = _version(first, "")
            pinned = [f"{first}=={version}" if version else first, *record.python_runtime[1:]]
            index = [f"--extra-index-url {record.python_runtime_index}"] if record.python_runtime_index else []
            install = f"; run there: {py} -m pip install {' '.join(pinned + index)}"
        raise UserError(f"--target {self.target.spec}: {model.name}: edgetl's {record.suffix} runner is built for "
                        f"{record.runner_machine} and {where} is {probe.machine}, and {py} there has no "
                        f"{record.runtime} Python runtime{install}")

    # ---- copy, run, fetch

    def _upload(self, files: list[tuple[Path, str]]) -> None:
        """Local files into the remote folder, as one tar stream (no scp/sftp needed there)."""
        assert self.remote_dir is not None and self._control is not None
        errors = self._control / "upload.err"
        with errors.open("w") as err:
            proc = subprocess.Popen([*self._base(), f"tar -xf - -C {shlex.quote(self.remote_dir)}"],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
            try:
                with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                    for local, name in files:
                        tar.add(str(local), arcname=name)
            except BrokenPipeError:
                pass
            finally:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()  # type: ignore[union-attr]
                proc.wait()
        if proc.returncode != 0:
            raise self._fail("copying to the remote failed", errors.read_text(errors="replace"))

    def stage(self, script: Path) -> None:
        """The private folder (mktemp -d) with device_bench.py and, when a plan needs it, the runner."""
        done = self.run(f"mktemp -d \"${{TMPDIR:-/tmp}}/{TEMP_PREFIX}XXXXXX\"",
                        what="cannot make a temporary folder on the remote")
        path = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        if not path.startswith("/") or not Path(path).name.startswith(TEMP_PREFIX):
            raise UserError(f"--target {self.target.spec}: mktemp -d printed {path!r}, not a temporary folder")
        self.remote_dir = path
        files = [(script, "device_bench.py")]
        runners = {plan.runner for plan in self.plans.values() if plan.runner is not None}
        files += [(runner.parent, "runner") for runner in runners]
        self._upload(files)

    def bench(self, model: Path, inputs: Path | None, args: list[str], tag: str) -> dict[str, Any]:
        """Run device_bench there on one file; returns its JSON plus where and how it ran (or a failure)."""
        assert self.remote_dir is not None and self.probe is not None
        key = str(model)
        if key not in self._uploaded:
            folder = f"a{len(self._uploaded)}"
            files = [(model, f"{folder}/{model.name}")] + ([(inputs, f"{folder}/inputs.npz")] if inputs else [])
            self._upload(files)
            self._uploaded[key] = folder
        folder = self._uploaded[key]
        plan = self.plans[model.name]
        out = f"{folder}/result-{tag}.json"
        py = (self.probe.python or {}).get("executable") or self.python
        cmd = [py, "device_bench.py", f"{folder}/{model.name}", *args, "--out", out]
        if inputs:
            cmd += ["--inputs", f"{folder}/inputs.npz"]
        if plan.runner is not None:
            from edgetl.arm64 import EXECUTORCH_VERSION

            cmd += ["--runner", f"runner/{plan.runner.name}", "--runner-version", EXECUTORCH_VERSION]
        pinned = ["taskset", "-c", self.taskset] if self.taskset else []
        # TMPDIR inside the folder: what device_bench or its runtime writes to temp (torch's caches) goes too.
        line = (f"cd {shlex.quote(self.remote_dir)} && cat /proc/loadavg 2>/dev/null; echo $$ > pid && "
                f"mkdir -p tmp && export TMPDIR=\"$PWD/tmp\" && exec {shlex.join([*pinned, *cmd])}")
        started = time.perf_counter()
        done = self.run(line, timeout=None, check=False)
        seconds = time.perf_counter() - started
        if done.returncode == 255:
            raise self._fail("the connection failed during the run", done.stderr)
        if done.returncode == 2:  # the model cannot run there (the inputs were checked on the host): this row fails
            lines = [ln for ln in done.stderr.splitlines() if "error:" in ln]
            why = (lines or done.stderr.strip().splitlines() or ["device_bench failed"])[-1]
            return {"failed": f"{model.name} @ {self.target.name}: {why[:200]}"}
        load_before = _load(done.stdout.strip().splitlines()[0] if done.stdout.strip() else "")
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
            return {"failed": f"exit {done.returncode} on {self.target.destination}: {tail[:200]}"}
        fetched = self.run(f"cd {shlex.quote(self.remote_dir)} && cat {shlex.quote(out)} && echo @@loadavg && "
                           "(cat /proc/loadavg 2>/dev/null || true)", what="cannot read the result back")
        text, _, load_after = fetched.stdout.partition("@@loadavg")
        result = json.loads(text)
        result["wall_seconds"] = round(seconds, 2)
        result["remote"] = self.record(plan, load_before, _load(load_after))
        return result

    def record(self, plan: Plan, load_before: list[float] | None, load_after: list[float] | None) -> dict[str, Any]:
        """Where and how the run happened, beside device_bench's own platform block."""
        probe = self.probe
        assert probe is not None
        python = probe.python or {}
        return {"transport": "ssh", "destination": self.target.destination, "uname_m": probe.machine,
                "uname": probe.uname, "cpu_count": probe.cpu_count, "cpu": probe.cpu,
                "python": {"executable": python.get("executable"), "version": python.get("version")},
                "runtime": plan.runtime,
                "runtime_versions": {k: v for k, v in python.get("packages", {}).items() if v},
                "load_average_at_connect": probe.load_average, "load_average_before": load_before,
                "load_average_after": load_after, "taskset": self.taskset,
                "latency_label": "wall time on that machine"}

    # ---- cleanup

    def _shielded(self, cmd: list[str], timeout: float) -> None:
        """Run to the end even through Ctrl-C (its own session; a press while waiting is noted, not obeyed)."""
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                return
            except KeyboardInterrupt:
                continue
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return

    def close(self) -> None:
        """Remove the remote folder (stopping a device_bench still running in it), then the connection."""
        try:
            if self.remote_dir is not None:
                folder = shlex.quote(self.remote_dir)
                script = (f"d={folder}; if [ -f \"$d/pid\" ]; then kill \"$(cat \"$d/pid\")\" 2>/dev/null; fi; "
                          "rm -rf \"$d\"")
                self._shielded([*self._base(), script], timeout=self.connect_timeout + 20)
                self.remote_dir = None
        finally:
            if self._master is not None:
                if self._master.poll() is None:
                    self._master.send_signal(signal.SIGTERM)
                    try:
                        self._master.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        self._master.kill()
                        self._master.wait()
                self._master = None
            if self._control is not None:
                shutil.rmtree(self._control, ignore_errors=True)
                self._control = None



@dataclass
class SshRunner:
    """device_bench on an ssh: target, through its open session: the same result as a host run, plus where and
    how it ran."""

    session: SshSession
    script: Path

    def stage(self) -> None:
        from edgetl.ui import console

        self.session.stage(self.script)
        probe = self.session.probe
        assert probe is not None
        runtimes = ", ".join(sorted({plan.runtime for plan in self.session.plans.values()}))
        console.print(f"bench: {self.session.target.destination} ready ({probe.machine}, "
                      f"{probe.cpu.get('layout') or 'CPU unknown'}; {runtimes})")

    def run(self, artifact: Any, threads: int, inputs: Path | None, options: Any, workdir: Path) -> dict[str, Any]:
        target = self.session.target
        args = ["--threads", str(threads), "--iters", str(options.iters), "--warmup", str(options.warmup),
                "--label", f"edgetl bench {target.name}"]
        if options.samples is not None:
            args += ["--samples", str(options.samples)]
        result = self.session.bench(artifact.path, inputs, args, f"t{threads}")
        if "failed" in result:
            return {"failed": result["failed"], "artifact": artifact.name, "target": target.record(),
                    "conditions": {"threads": threads}}
        result["target"] = target.record()
        if artifact.macs and not result["model"].get("macs"):
            result["model"]["macs"] = artifact.macs
            result["model"]["macs_source"] = "export manifest or the .tflite of the same model"
        return result

__all__ = ["FORM", "Probe", "SshSession", "SshTarget", "check_cores", "cpu_layout", "parse"]
