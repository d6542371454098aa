"""The wheel carries everything a verb needs: built from this checkout, installed (not editable) into a fresh
venv, and run from an empty folder: `edgetl export --recipe`, `edgetl bench` and `edgetl bundle` on a tiny model,
then the bundle's own golden_check.py; `edgetl sweep --recipe small` too in the slow run (-m slow: it fine-tunes a
pruned variant).

Nothing heavy is reinstalled: the fresh venv holds only the wheel and reaches the dev environment's
dependencies through a path file, without its .pth hooks, so the editable edgetl of the dev venv stays out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[1]


# Built from a copy of the source without build outputs: setuptools keeps a build/ folder whose stale modules
# would otherwise go into the wheel.
NOT_SOURCE = (".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source, dist = tmp_path_factory.mktemp("source") / "edgetl", tmp_path_factory.mktemp("dist")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(dist), str(source)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = dist.glob("edgetl-*.whl")
    return built


@pytest.fixture(scope="module")
def edgetl_bin(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    (site / "dev-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv / "bin"


def test_the_wheel_holds_every_package_and_asset(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "edgetl").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names
    shipped = {"export": REPO / "export", "device_bench": REPO / "device_bench"}
    for name, folder in shipped.items():
        files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        assert files and {f"edgetl/assets/{name}/{f}" for f in files} <= names, name
    assert "edgetl/assets/export/recipes/android-litert-int8.toml" in names
    assert "edgetl/assets/export/sweeps/small.toml" in names
    assert "edgetl/assets/export/finetune/from-scratch.toml" in names


def _run(bin_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGETL_DEVICE_BENCH")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, f"{' '.join(args[:2])}: {done.stderr[-3000:]}"
    return done


def test_the_installed_wheel_runs_every_verb_from_an_empty_folder(edgetl_bin: Path, tiny_checkpoint: Path,
                                                                  tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run(edgetl_bin, empty, "python", "-c", "import edgetl, edgetl.assets as a; print(edgetl.__file__); "
                 "print(a.folder('export'))").stdout.split()
    assert all(Path(p).is_relative_to(edgetl_bin.parent) for p in where), where  # the wheel's, not the checkout's
    run = empty / "run"
    _run(edgetl_bin, empty, "edgetl", "export", str(tiny_checkpoint), "--recipe", "android-litert-int8",
         "--max-drop", "100", "--out", str(run / "export"))
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    assert manifest["config"]["recipe"] == "android-litert-int8"
    assert manifest["config"]["quantization"]["formats"] == ["tflite"]
    assert [a["file"] for a in manifest["artifacts"]] == ["mobilenet_v2-w0.35-32-int8.tflite"]
    bench = _run(edgetl_bin, empty, "edgetl", "bench", str(run / "export"), "--threads", "1", "--iters", "3")
    assert (run / "bench" / "mobilenet_v2-w0.35-32-int8.tflite@host.json").is_file(), bench.stdout
    assert "ai-edge-litert 2.3.0" in bench.stdout
    _run(edgetl_bin, empty, "edgetl", "bundle", str(run / "export"), "--artifact", "mobilenet_v2-w0.35-32-int8.tflite",
         "--no-metadata", "--golden", "3")
    bundle = run / "bundle" / "mobilenet_v2-w0.35-32-int8"
    assert (bundle / "android" / "edgetl-classifier" / "build.gradle.kts").is_file()
    assert (bundle / "ios" / "EdgeTLClassifier" / "EdgeTLClassifier.podspec").is_file()
    shipped = sorted(p.name for p in (bundle / "device_bench").iterdir())
    assert {"device_bench.py", "golden_check.py", "requirements.txt"} <= set(shipped)
    assert "__init__.py" not in shipped
    check = _run(edgetl_bin, bundle / "device_bench", "python", "golden_check.py", "mobilenet_v2-w0.35-32-int8.tflite")
    assert "3 passed, 0 failed" in check.stdout


@pytest.mark.slow  # about 100 s on two cores: the sweep fine-tunes and exports a pruned variant
def test_the_installed_wheel_runs_a_packaged_sweep_recipe(edgetl_bin: Path, tiny_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = empty / "run"
    # fp32 as well as int8, so that the sweep takes both from here and makes only its pruned variant
    _run(edgetl_bin, empty, "edgetl", "export", str(tiny_checkpoint), "--formats", "tflite", "--quant", "fp32,int8",
         "--max-drop", "100", "--out", str(run / "export"))
    _run(edgetl_bin, empty, "edgetl", "sweep", str(tiny_checkpoint), "--recipe", "small", "--target", "host",
         "--formats", "tflite", "--iters", "3", "--samples", "10", "--reuse", str(run / "export"),
         "--out", str(run / "sweep"))
    sweep = json.loads((run / "sweep" / "sweep.json").read_text())
    assert [v["name"] for v in sweep["variants"]] == ["fp32", "int8-ptq", "pruned30-int8"]
    assert sweep["config"]["recipe"] == "small" and all(v["status"] == "ok" for v in sweep["variants"])
    assert (run / "sweep" / "report.html").is_file()
    assert sum(1 for v in sweep["variants"] if v.get("reused_from")) == 2
