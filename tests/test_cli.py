"""The command line: verbs, framework-free start-up, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import run_cli


def test_help_lists_the_verbs_and_imports_no_framework() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for verb in ("finetune", "export", "bench", "sweep", "bundle", "demo"):
        assert verb in result.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, edgetl, edgetl.cli; "
         "print(sorted(m for m in ('torch', 'tensorflow', 'tf_keras', 'executorch') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "[]"


def test_the_configuration_imports_no_backend_package() -> None:
    """Imports run one way (cli → stages → backends): options are checked against the leaf capability table,
    never against a backend package."""
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, edgetl.config; "
         "print(sorted(m for m in sys.modules if m.startswith('edgetl.backends')))"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "[]"


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _folder(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (20, 20), (i * 10 % 255, 50, 90)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--data", "/nonexistent/images"], ["/nonexistent/images", "does not exist"]),
        (["--data", "builtin:nope"], ["builtin:nope", "builtin:fashion-mnist-mini"]),
        (["--data", "builtin:shapes", "--backbone", "resnet50"], ["resnet50", "mobilenet_v2", "efficientnet_lite0"]),
        (["--data", "builtin:shapes", "--image-size", "17"], ["17", "multiple of 8"]),
        (["--data", "builtin:shapes", "--image-size", "0"], ["0", "valid"]),
        (["--data", "builtin:shapes", "--backbone", "mobilenet_v2", "--width", "0.6"], ["0.6", "0.35"]),
        (["--data", "builtin:shapes", "--backbone", "mobilenet_v2", "--width", "0.5"], ["width 0.5", "--weights"]),
        (["--data", "builtin:shapes", "--weights", "/no/such.pth"], ["/no/such.pth", "imagenet"]),
        (["--data", "builtin:shapes", "--device", "tpu"], ["tpu", "cuda"]),
    ],
)
def test_bad_flags_exit_2_with_one_line(args: list[str], needles: list[str]) -> None:
    _assert_one_line_error(run_cli("finetune", *args), *needles)


def test_bad_folders_exit_2_with_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(run_cli("finetune", "--data", str(empty)), "no class sub-folders")
    single = _folder(tmp_path / "single", {"cats": 5})
    _assert_one_line_error(run_cli("finetune", "--data", str(single)), "single class", "cats")
    few = _folder(tmp_path / "few", {"cats": 5, "dogs": 2})
    _assert_one_line_error(run_cli("finetune", "--data", str(few)), "'dogs'", "2", "at least 3")
    no_images = tmp_path / "noimg"
    for name in ("a", "b"):
        (no_images / name).mkdir(parents=True)
        (no_images / name / "notes.txt").write_text("hi")
    _assert_one_line_error(run_cli("finetune", "--data", str(no_images)), "no readable images")


def test_wrong_shape_weights_file_is_one_line(tmp_path: Path) -> None:
    import torch

    from edgetl.backends.torch.models import build_model

    path = tmp_path / "v3small.pth"
    torch.save(build_model("mobilenet_v3_small").state_dict(), path)
    result = run_cli("finetune", "--data", "builtin:shapes", "--backbone", "mobilenet_v2", "--weights", str(path),
                     "--image-size", "32", "--out", str(tmp_path / "run"))
    _assert_one_line_error(result, str(path), "do not fit mobilenet_v2")
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_unwritable_output_folder_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli("finetune", "--data", "builtin:shapes", "--out", str(blocker / "run"))
    _assert_one_line_error(result, str(blocker / "run"), "not writable")


def test_debug_env_shows_the_traceback_and_keeps_the_exit_status() -> None:
    """EDGETL_DEBUG=1 adds the traceback; a user error still exits 2 with its one line last."""
    for args in (["finetune", "--data", "builtin:nope"], ["finetune", "--data", "builtin:shapes", "--seed", "x"]):
        result = run_cli(*args, env={"EDGETL_DEBUG": "1"})
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("edgetl: error:")


# ---------------------------------------------------------------- usage errors and exit statuses


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["finetune", "--data", "builtin:shapes", "--image-size", "abc"], ["--image-size", "abc", "integer"]),
        (["finetune", "--data", "builtin:shapes", "--width", "abc"], ["--width", "abc"]),
        (["finetune", "--data", "builtin:shapes", "--no-such-option"], ["--no-such-option"]),
        (["no-such-verb"], ["no-such-verb"]),
        (["finetune"], ["--data"]),
        (["export"], ["CHECKPOINT"]),
        (["bench", "x", "--iters", "many"], ["--iters", "many"]),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args: list[str], needles: list[str]) -> None:
    """click's own usage errors, whichever click raised them (typer >= 0.29 bundles its own copy)."""
    result = run_cli(*args)
    _assert_one_line_error(result, "--help")
    line = result.stderr.strip().splitlines()[0]
    assert line.startswith("edgetl: error:"), line
    for needle in needles:
        assert needle.lower() in line.lower(), line


def test_no_arguments_prints_the_help_and_exits_0() -> None:
    result = run_cli()
    assert result.returncode == 0, result.stderr
    assert "finetune" in result.stdout and "Traceback" not in result.stderr


def test_one_mapping_from_errors_to_exit_statuses() -> None:
    import errno

    import click

    from edgetl import errors
    from edgetl.export import ExportFailed
    from edgetl.verify import QualityError

    assert errors.exit_status(errors.UserError("bad"))[0] == 2
    assert errors.exit_status(ExportFailed("all failed"))[0] == 1
    assert errors.exit_status(QualityError("dropped"))[0] == 3
    assert errors.exit_status(KeyboardInterrupt())[0] == 130
    try:  # older typer: click turns Ctrl-C into Abort, raised while handling the KeyboardInterrupt
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise click.Abort() from None
    except click.Abort as abort:
        abort.__context__ = KeyboardInterrupt()
        assert errors.exit_status(abort)[0] == 130
    full = OSError(errno.ENOSPC, "No space left on device", "/x/model.pte")
    status, line = errors.exit_status(full)
    assert status == 1 and "no space left" in line and "/x/model.pte" in line
    assert errors.exit_status(ValueError("a bug")) is None
    # a launcher's workers: the status a user acts on first
    assert errors.combined_status([1, 2, 3]) == 2 and errors.combined_status([3, 1]) == 3
    assert errors.combined_status([-2, 2]) == 130 and errors.combined_status([-9]) == 1
    assert errors.combined_status([0, 0]) == 0


def test_worker_ends_with_the_cli_status_and_one_line(tmp_path: Path) -> None:
    """The multi-process fine-tune's worker maps errors through the same function as the CLI."""
    import json

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data": str(tmp_path / "missing")}))
    done = subprocess.run([sys.executable, "-m", "edgetl.finetune_worker", str(config), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "edgetl: error (rank 0):" in lines[0] and "does not exist" in lines[0], done.stderr


def test_finetune_never_writes_into_its_data_or_over_a_folder_it_did_not_make(tmp_path: Path) -> None:
    from tests.conftest import tree_digest

    data = _folder(tmp_path / "photos", {"cats": 5, "dogs": 5})
    before = tree_digest(data)
    _assert_one_line_error(run_cli("finetune", "--data", str(data), "--out", str(data)),
                           "inside the data folder", str(data))
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "thesis.pdf").write_bytes(b"the user's")
    _assert_one_line_error(run_cli("finetune", "--data", str(data), "--out", str(run)),
                           str(run / "checkpoint"), "did not make")
    assert (run / "checkpoint" / "thesis.pdf").read_bytes() == b"the user's"
    assert tree_digest(data) == before


_RUN_STRING_INTERRUPT = """
import ctypes, sys
from edgetl.errors import forget_interrupt
run = ctypes.pythonapi.PyRun_String
run.restype, run.argtypes = ctypes.py_object, [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]
try:  # Ctrl-C arriving in Python code that a C extension runs (pybind11's py::exec does this)
    run(b"raise KeyboardInterrupt", 257, {}, {})
except KeyboardInterrupt:
    if sys.argv[1:] == ["forget"]:
        forget_interrupt()
sys.exit(130)
"""


def test_a_handled_interrupt_exits_130_under_python_m(tmp_path: Path) -> None:
    """CPython 3.11 would end such a `python -m` process by SIGINT (-2) despite sys.exit(130)."""
    import os

    (tmp_path / "interrupted_module.py").write_text(_RUN_STRING_INTERRUPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).resolve().parents[1])])}
    forgotten = subprocess.run([sys.executable, "-m", "interrupted_module", "forget"], env=env, timeout=60)
    assert forgotten.returncode == 130
    plain = subprocess.run([sys.executable, "-m", "interrupted_module"], env=env, timeout=60)
    assert plain.returncode in (130, -2)  # -2 where the interpreter has the flaw (3.11 here)


def test_a_data_error_leaves_no_empty_output_folder_behind(tmp_path: Path) -> None:
    """The run folder is made before the data is listed; bad data must not leave it (nor its parents) behind."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "loose.png").write_bytes(b"not a class folder")
    result = run_cli("finetune", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "new" / "deeper" / "run"))
    _assert_one_line_error(result, str(tmp_path / "data"), "no class sub-folders")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    (tmp_path / "kept").mkdir()
    result = run_cli("finetune", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "kept" / "run"))
    assert result.returncode == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["data", "kept"]
