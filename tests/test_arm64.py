"""Emulated ARM64 targets: the target table, the fake /proc/cpuinfo, and (marker `arm`) the real thing —
provisioning the userland, then a tiny .tflite twice under a76 with instruction counts within 0.1%."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from edgetl.arm64 import TARGETS
from edgetl.errors import UserError
from edgetl.targets import parse_targets
from tests.conftest import run_cli
from tests.test_device_bench import tiny_models  # noqa: F401  (session fixture: tiny .tflite/.pte + inputs)


def test_targets_parse_in_order_and_reject_unknown_names() -> None:
    assert [t.name for t in parse_targets("arm64-a76, host,arm64-a76")] == ["arm64-a76", "host"]
    with pytest.raises(UserError, match="unknown target 'a76'; valid: host, arm64-a53"):
        parse_targets("a76")
    with pytest.raises(UserError, match="names no target"):
        parse_targets(" , ")


def test_each_arm_target_has_a_counted_qemu_model_and_an_arm_cpuinfo() -> None:
    counted_in_qemu_7_2 = {"cortex-a53", "cortex-a72", "cortex-a76", "neoverse-n1", "max"}
    for target in TARGETS.values():
        if not target.emulated:
            continue
        assert target.qemu_cpu.split(",")[0] in counted_in_qemu_7_2, target.name
        text = target.cpuinfo(2)
        assert text.count("processor\t:") == 2 and f"CPU part\t: 0x{target.part:03x}" in text
        assert int(target.midr(), 16) >> 24 == 0x41  # ARM Ltd.
    assert "asimddp" in TARGETS["arm64-a55"].cpuinfo(1) and "asimddp" not in TARGETS["arm64-a53"].cpuinfo(1)
    assert "i8mm" in TARGETS["arm64-a710"].cpuinfo(1)
    assert TARGETS["arm64-a710"].qemu_cpu == "max,sve=off,sme=off"


@pytest.mark.arm
def test_arm64_userland_counts_a_tiny_tflite_repeatably(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    started = time.perf_counter()
    setup = run_cli("bench", "--setup", "arm64")
    setup_seconds = time.perf_counter() - started
    assert setup.returncode == 0, setup.stderr[-3000:]
    assert setup_seconds < 180, f"set-up took {setup_seconds:.0f} s"
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(tiny_models / "tiny.tflite", export)
    shutil.copy(tiny_models / "test_inputs.npz", export)
    counts = []
    for attempt in (1, 2):
        out = tmp_path / f"bench{attempt}"
        result = run_cli("bench", str(export), "--target", "arm64-a76", "--out", str(out), "--arm-iters", "3")
        assert result.returncode == 0, result.stderr[-3000:]
        run = json.loads((out / "tiny.tflite@arm64-a76.json").read_text())["runs"][0]
        assert run["platform"]["cpu"]["machine"] == "aarch64" and run["platform"]["cpu"]["cpu_part"] == "0xd0b"
        assert run["emulation"]["wall_time_label"] == "emulated, not phone latency"
        assert run["accuracy"]["top1"] == 0.75
        counts.append(run["emulation"]["instructions_per_invoke"])
        assert "emulated, not phone latency" in result.stdout
    assert counts[0] > 10_000
    assert abs(counts[0] - counts[1]) <= 0.001 * counts[0], counts


@pytest.mark.arm
def test_arm64_runs_a_pte_with_the_native_runner(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(tiny_models / "tiny.pte", export)
    shutil.copy(tiny_models / "test_inputs.npz", export)
    result = run_cli("bench", str(export), "--target", "arm64-a55", "--arm-iters", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "bench" / "tiny.pte@arm64-a55.json").read_text())["runs"][0]
    assert run["runtime"]["name"] == "edgetl_pte_runner" and run["runtime"]["version"] == "1.5.1"
    assert run["accuracy"]["top1"] == 0.75
    assert run["emulation"]["instructions_per_invoke"] > 10_000
    assert run["target"]["qemu_cpu"] == "cortex-a76" and run["target"]["cpuinfo_part"] == "0xd05"


@pytest.mark.arm
def test_arm64_runs_an_onnx_in_the_guest_onnx_runtime(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    """The format registry names ONNX Runtime's aarch64 wheel; the guest installs it and counts a .onnx."""
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(tiny_models / "tiny.onnx", export)
    shutil.copy(tiny_models / "test_inputs.npz", export)
    result = run_cli("bench", str(export), "--target", "arm64-a76", "--arm-iters", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((tmp_path / "bench" / "tiny.onnx@arm64-a76.json").read_text())["runs"][0]
    assert run["runtime"]["name"] == "onnxruntime" and run["platform"]["cpu"]["machine"] == "aarch64"
    assert run["accuracy"]["top1"] == 0.75
    assert run["emulation"]["instructions_per_invoke"] > 10_000


def test_set_up_names_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from edgetl.arm64 import apt, provision

    monkeypatch.setattr(apt.shutil, "which", lambda _name: None)
    with pytest.raises(UserError, match="needs apt-get, dpkg-deb, dpkg"):
        apt.require_tools()
    monkeypatch.setattr(provision.shutil, "which", lambda _name: None)
    with pytest.raises(UserError, match="needs a C compiler"):
        provision._plugin(tmp_path, lambda _m: None)


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_set_up_says_offline_when_the_mirror_cannot_be_reached(tmp_path: Path) -> None:
    result = run_cli("bench", "--setup", "arm64", env={"EDGETL_CACHE": str(tmp_path),
                                                      "EDGETL_DEBIAN_MIRROR": "http://127.0.0.1:9/debian",
                                                      "EDGETL_DEBIAN_SECURITY": "http://127.0.0.1:9/debian-security"})
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "offline?" in last and "EDGETL_DEBIAN_MIRROR" in last and "Traceback" not in result.stderr
