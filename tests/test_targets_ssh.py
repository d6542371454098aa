"""`edgetl bench --target ssh:...` against a real sshd on 127.0.0.1: throwaway host and user keys made here,
a free port, a client config with its own known_hosts (EDGETL_SSH_CONFIG), never a password. The results
must equal a host run of the same files in schema and top-1, and the remote's temporary area must be empty
afterwards, also after every refused target."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgetl.targets import parse_targets
from edgetl.targets.ssh import check_cores, cpu_layout, parse
from tests.conftest import run_cli
from tests.test_device_bench import tiny_models  # noqa: F401  (session fixture: tiny .tflite/.pte + inputs)

SSHD = shutil.which("sshd") or next((p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.path.exists(p)),
                                    None)
needs_sshd = pytest.mark.skipif(SSHD is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None,
                                reason="no OpenSSH server here (Debian: apt install openssh-server; .ci/run does)")


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------- without a server


def test_target_forms_are_parsed_before_anything_connects() -> None:
    target = parse("ssh:pi@pi5.local:2222")
    assert (target.user, target.host, target.port, target.name) == ("pi", "pi5.local", 2222, "ssh-pi5.local")
    assert parse("ssh:10.0.0.7").destination == "10.0.0.7" and parse("ssh:10.0.0.7").port is None
    names = [t.name for t in parse_targets("host,ssh:pi@pi5,arm64-a76,adb:R58M")]
    assert names == ["host", "ssh-pi5", "arm64-a76", "adb-R58M"]
    with pytest.raises(Exception, match="twice"):
        parse_targets("ssh:pi5:22,ssh:pi5:2222")
    for bad, needle in (("ssh:", "names no host"), ("ssh:host:notaport", "port 'notaport'"),
                        ("ssh:host:70000", "port '70000'"), ("ssh:-oProxyCommand=sh", "not a host"),
                        ("ssh:bad user@host", "not a user")):
        with pytest.raises(Exception, match=needle):
            parse(bad)
    assert check_cores("4-7") == "4-7" and check_cores(None) is None
    with pytest.raises(Exception, match="not a CPU list"):
        check_cores("big")


def test_core_layout_names_arm_cores_by_part_number() -> None:
    block = "processor\t: {i}\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU part\t: {part}\n\n"
    cpuinfo = "".join(block.format(i=i, part="0xd05" if i < 4 else "0xd0b") for i in range(8))
    lscpu = "Architecture:  aarch64\nModel name:    Cortex-A55\nModel name:    Cortex-A76\nCPU(s):  8\n"
    found = cpu_layout(cpuinfo, lscpu)
    assert found["cores"] == {"Cortex-A55": 4, "Cortex-A76": 4}
    assert found["layout"] == "4× Cortex-A55 + 4× Cortex-A76"
    assert found["model"] == "Cortex-A55 / Cortex-A76" and found["lscpu"]["CPU(s)"] == "8"


def test_bad_target_syntax_is_one_line_before_any_copy(tiny_models: Path) -> None:  # noqa: F811
    model = str(tiny_models / "tiny.tflite")
    _one_line_error(run_cli("bench", model, "--target", "ssh:"), "names no host")
    _one_line_error(run_cli("bench", model, "--target", "ssh:host:notaport"), "notaport")
    _one_line_error(run_cli("bench", model, "--target", "adb:"), "not an adb serial")
    _one_line_error(run_cli("bench", model, "--target", "ssh:h", "--taskset", "big"), "--taskset 'big'")


def test_adb_says_what_to_install_or_attach(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    model = str(tiny_models / "tiny.tflite")
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "ssh").symlink_to(shutil.which("ssh") or "/usr/bin/ssh")
    no_adb = {"PATH": f"{bare}:{Path(sys.executable).parent}"}
    _one_line_error(run_cli("bench", model, "--target", "adb", env=no_adb), "no adb here", "apt install adb")
    # A stand-in for `adb devices` tests how its answer is read (not that a phone works).
    fake = bare / "adb"
    fake.write_text("#!/bin/sh\nprintf 'List of devices attached\\n%s' \"$FAKE_ADB_DEVICES\"\n")
    fake.chmod(0o755)
    _one_line_error(run_cli("bench", model, "--target", "adb", env={**no_adb, "FAKE_ADB_DEVICES": ""}),
                    "no device attached")
    _one_line_error(run_cli("bench", model, "--target", "adb:R58M", env={**no_adb, "FAKE_ADB_DEVICES": ""}),
                    "no device 'R58M'")
    _one_line_error(run_cli("bench", model, "--target", "adb:R58M",
                            env={**no_adb, "FAKE_ADB_DEVICES": "R58M\tunauthorized\n"}), "is unauthorized")
    said = _one_line_error(run_cli("bench", model, "--target", "adb",
                                   env={**no_adb, "FAKE_ADB_DEVICES": "R58M\tdevice\n"}), "does not run benchmarks")
    assert "adb forward tcp:8022 tcp:8022" in said and "--target ssh:" in said


# ------------------------------------------------------------------------------------ a real sshd


class Server:
    def __init__(self, root: Path, port: int, config: Path, remote_tmp: Path) -> None:
        self.root, self.port, self.config, self.remote_tmp = root, port, config, remote_tmp

    @property
    def env(self) -> dict[str, str]:
        return {"EDGETL_SSH_CONFIG": str(self.config), "OMP_NUM_THREADS": "1"}

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.remote_tmp.iterdir())


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    if SSHD is None or shutil.which("ssh-keygen") is None:
        pytest.skip("no OpenSSH server here (Debian: apt install openssh-server; .ci/run does)")
    root = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    shutil.copy(root / "user_key.pub", root / "authorized_keys")
    remote_tmp = root / "remote-tmp"
    remote_tmp.mkdir()
    port = _free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n"
        f"SetEnv TMPDIR={remote_tmp}\nLogLevel ERROR\n")
    host_key = (root / "host_key.pub").read_text().split()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
    (root / "ssh_config").write_text(
        f"Host 127.0.0.1\n  IdentityFile {root / 'user_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {root / 'known_hosts'}\n  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation folder, made by its service
    log = (root / "sshd.log").open("w")
    server = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"sshd did not start: {(root / 'sshd.log').read_text()}")
        time.sleep(0.1)
    yield Server(root, port, root / "ssh_config", remote_tmp)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=10)
    log.close()


def _shape(value: object, prefix: str = "") -> set[str]:
    """Every key path of a JSON document (list items merged): equal shapes mean the same schema."""
    if isinstance(value, dict):
        return {p for k, v in value.items() for p in {f"{prefix}{k}", *_shape(v, f"{prefix}{k}.")}}
    if isinstance(value, list):
        return {p for item in value for p in _shape(item, prefix)}
    return set()


@needs_sshd
def test_ssh_run_equals_a_host_run_and_leaves_nothing(sshd: Server, tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    import json

    export = tmp_path / "runs" / "tiny" / "export"
    shutil.copytree(tiny_models, export)
    target = f"ssh:127.0.0.1:{sshd.port}"
    result = run_cli("bench", str(export), "--target", f"host,{target}", "--threads", "1", "--iters", "5",
                     "--remote-python", sys.executable, "--taskset", "0", env=sshd.env)
    assert result.returncode == 0, result.stderr[-3000:]
    bench = export.parent / "bench"
    for name in ("tiny.tflite", "tiny.pte", "tiny.onnx"):
        host = json.loads((bench / f"{name}@host.json").read_text())
        remote = json.loads((bench / f"{name}@ssh-127.0.0.1.json").read_text())
        assert remote["kind"] == host["kind"] and remote["schema_version"] == host["schema_version"]
        assert remote["target"]["name"] == "ssh-127.0.0.1" and remote["target"]["emulated"] is False
        run, local = remote["runs"][0], host["runs"][0]
        facts = run.pop("remote")
        assert _shape(run) - _shape(run["target"], "target.") == _shape(local) - _shape(local["target"], "target.")
        assert _shape(local["target"]) < _shape(run["target"])  # the target adds its spec and remote: true
        assert run["accuracy"] == local["accuracy"] == {"top1": 0.75, "correct": 9, "samples": 12}
        assert run["model"]["sha256"] == local["model"]["sha256"] and run["runtime"] == local["runtime"]
        assert facts["uname_m"] == os.uname().machine and facts["cpu_count"] == os.cpu_count()
        assert facts["taskset"] == "0" and facts["python"]["executable"] == sys.executable
        assert facts["cpu"]["layout"] and len(facts["load_average_before"]) == 3
        assert facts["runtime_versions"]["numpy"] and facts["runtime"].split()[0] in ("ai-edge-litert", "executorch",
                                                                                    "onnxruntime")
    manifest = json.loads((bench / "manifest.json").read_text())
    latency = {(r["artifact"], r["target"]): r["latency_label"] for r in manifest["rows"]}
    assert latency[("tiny.tflite", "ssh-127.0.0.1")] == "wall time on ssh-127.0.0.1"
    assert "ssh-127.0.0.1" in result.stdout
    assert sshd.leftovers() == []


def _numpy_only_python(root: Path) -> Path:
    """A Python with numpy and no runtime: a venv whose .pth adds a folder holding only numpy."""
    import numpy

    venv = root / "numpy-only"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(numpy.__file__).parent.parent
    only = root / "numpy-site"
    only.mkdir()
    for entry in site.glob("numpy*"):
        (only / entry.name).symlink_to(entry)
    (next(venv.glob("lib/python*/site-packages")) / "numpy_only.pth").write_text(f"{only}\n")
    return venv / "bin" / "python"


@needs_sshd
def test_bad_remotes_are_one_line_after_a_bounded_wait(sshd: Server, tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    tflite, pte = str(tiny_models / "tiny.tflite"), str(tiny_models / "tiny.pte")
    here = f"ssh:127.0.0.1:{sshd.port}"
    numpy_only = str(_numpy_only_python(tmp_path))
    cases = [
        ((tflite, "--target", "ssh:nosuch-host.invalid"), ("ssh:nosuch-host.invalid", "cannot connect")),
        ((tflite, "--target", f"ssh:127.0.0.1:{_free_port()}"), ("cannot connect", "refused")),
        ((tflite, "--target", here, "--remote-python", "/nonexistent/python3"), ("no usable Python",)),
        ((tflite, "--target", here, "--remote-python", numpy_only),
         ("has no LiteRT", "(x86_64)" if os.uname().machine == "x86_64" else "",
          f"{numpy_only} -m pip install ai-edge-litert==")),
        ((pte, "--target", here, "--remote-python", numpy_only),
         ("built for aarch64", f"is {os.uname().machine}", "pip install executorch==")),
        ((tflite, "--target", here, "--remote-python", sys.executable, "--taskset", "0-63"), ("no CPU",)),
    ]
    strange = tmp_path / "ssh_config_unknown_host_key"  # the same server, its host key not in known_hosts
    (tmp_path / "empty_known_hosts").write_text("")
    strange.write_text(sshd.config.read_text().replace(str(sshd.root / "known_hosts"),
                                                       str(tmp_path / "empty_known_hosts")))
    cases.append(((tflite, "--target", here, "--remote-python", sys.executable, "--env-config", str(strange)),
                  ("Host key verification failed",)))
    for args, needles in cases:
        env = sshd.env
        if "--env-config" in args:
            env = {**env, "EDGETL_SSH_CONFIG": args[-1]}
            args = args[:-2]
        started = time.monotonic()
        _one_line_error(run_cli("bench", *args, "--out", str(tmp_path / "bench"), env=env), *needles)
        assert time.monotonic() - started < 60, args
        assert sshd.leftovers() == [], args
    assert not (tmp_path / "bench").exists()


@needs_sshd
def test_an_interrupted_remote_run_removes_its_folder(sshd: Server, tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    cmd = [sys.executable, "-m", "edgetl.cli", "bench", str(tiny_models / "tiny.tflite"), "--target",
           f"ssh:127.0.0.1:{sshd.port}", "--remote-python", sys.executable, "--threads", "1", "--iters", "2000000",
           "--out", str(tmp_path / "bench")]
    proc = subprocess.Popen(cmd, env={**os.environ, **sshd.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not any((p / "pid").exists() for p in sshd.remote_tmp.glob("edgetl-bench.*")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group, as in a terminal
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert sshd.leftovers() == []
    assert not (tmp_path / "bench").exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "--iters 2000000" not in ps


@needs_sshd
def test_a_sweep_checks_its_ssh_targets_before_any_export(sshd: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgetl.errors import UserError
    from edgetl.sweep import resolve_config
    from edgetl.targets import preflight

    config = resolve_config(None, targets=f"host,ssh:127.0.0.1:{sshd.port}", remote_python=sys.executable).validate()
    assert config.bench.targets == ("host", f"ssh:127.0.0.1:{sshd.port}")  # the spec, not the file name, is kept
    monkeypatch.setenv("EDGETL_SSH_CONFIG", str(sshd.config))
    preflight(config.bench.parsed_targets(), config.bench.remote_python, "0")
    with pytest.raises(UserError, match="no usable Python"):
        preflight(parse_targets(f"ssh:127.0.0.1:{sshd.port}"), "/nonexistent/python3", None)
    assert sshd.leftovers() == []


def test_every_kind_of_target_implements_the_one_interface() -> None:
    """host, emulated, ssh: and adb parse to targets of one protocol; the stages never ask which kind a target is."""
    import ast

    from edgetl.targets import BenchTarget, LocalTarget

    targets = parse_targets("host,arm64-a76,ssh:pi@pi5:2222,adb:R58M")
    assert [t.name for t in targets] == ["host", "arm64-a76", "ssh-pi5", "adb-R58M"]
    assert [t.spec for t in targets] == ["host", "arm64-a76", "ssh:pi@pi5:2222", "adb:R58M"]
    assert [(t.emulated, t.remote) for t in targets] == [(False, False), (True, False), (False, True), (False, True)]
    for target in targets:
        assert isinstance(target, BenchTarget), target
        record = target.record()
        assert {"name", "description", "emulated"} <= set(record) and record["name"] == target.name
    assert targets[1].record()["qemu_cpu"] == "cortex-a76" and isinstance(targets[0], LocalTarget)
    stages = Path(__file__).resolve().parents[1] / "edgetl"
    for stage in ("bench.py", "sweep.py"):
        tree = ast.parse((stages / stage).read_text())
        asked = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and getattr(node.func, "id", None) in ("getattr", "isinstance", "hasattr")
                 and node.args and getattr(node.args[0], "id", "") in ("target", "t", "targets")]
        assert asked == [], f"{stage} asks a target what kind it is at lines {asked}"
