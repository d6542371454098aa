"""Fault injection as a test: each stage fails at its write points with ENOSPC, EIO and SIGKILL, and must keep
the rules of tests/faults/harness.py (previous output byte-identical, one line, a documented exit status, no
temporary folder outliving the next run).

The default run tries a small grid: the key points of each stage's run (its first operation, its temporary
folder, a write half-way, the publication, the first clean-up after it), the three faults turned among them.
The full grid (every point × every fault, about an hour on two cores) runs with `-m faults`;
benchmarks/fault_grid.py runs it too and records its counts. The first tests check the shim and the harness
themselves on small programs.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.faults.harness import (
    STAGES,
    Pipeline,
    Stage,
    compile_shim,
    failure_lines,
    fresh_run,
    plan_for,
    read_log,
    run_grid,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shim needs Linux (LD_PRELOAD)")


@pytest.fixture(scope="session")
def fault_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LD_PRELOAD shim, compiled once per session."""
    shim = compile_shim(tmp_path_factory.mktemp("faultshim"))
    if shim is None:
        pytest.skip("no C compiler (gcc or cc) to build the LD_PRELOAD fault shim")
    return shim


# ------------------------------------------------------------------------------------------- the shim itself

OPERATIONS = textwrap.dedent("""
    import ctypes, os, shutil, subprocess, sys
    inside, outside = sys.argv[1], sys.argv[2]
    def attempt(what, call):
        try:
            call()
            print(what, "ok")
        except OSError as error:
            print(what, error.errno)
        except subprocess.CalledProcessError as error:
            print(what, "exit", error.returncode)
    attempt("mkdir", lambda: os.mkdir(os.path.join(inside, "d")))
    attempt("outside", lambda: open(os.path.join(outside, "x"), "w").write("x"))
    def write_big():
        with open(os.path.join(inside, "d", "a.bin"), "wb") as handle:
            handle.write(b"a" * 100000)
            handle.flush()
            handle.write(b"b" * 100000)
    attempt("write", write_big)
    os.chdir(inside)
    attempt("relative", lambda: open("d/b.txt", "w").write("b"))
    def at_dir():
        fd = os.open("d", os.O_RDONLY)
        try:
            os.close(os.open("c.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
        finally:
            os.close(fd)
    attempt("openat", at_dir)
    attempt("rename", lambda: os.replace("d/b.txt", "d/e.txt"))
    attempt("copy", lambda: shutil.copyfile("d/a.bin", "d/f.bin"))
    attempt("child", lambda: subprocess.run([sys.executable, "-c", "open('d/g.txt', 'w').write('g')"], check=True))
    attempt("unlink", lambda: os.unlink("d/e.txt"))
    attempt("rmtree", lambda: shutil.rmtree("d"))
""")


def _shim_run(shim: Path, tmp_path: Path, point: int = 0, fault: str = "count") -> tuple[subprocess.CompletedProcess,
                                                                                          list, tuple]:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir(exist_ok=True)
    outside.mkdir(exist_ok=True)
    script = tmp_path / "operations.py"
    script.write_text(OPERATIONS)
    counter, log = tmp_path / "counter", tmp_path / "ops.log"
    counter.write_bytes(bytes(4096))
    log.unlink(missing_ok=True)
    env = {**os.environ, "LD_PRELOAD": str(shim), "EDGETL_FAULT_DIR": str(inside), "EDGETL_FAULT_COUNTER": str(counter),
           "EDGETL_FAULT_LOG": str(log), "EDGETL_FAULT_AT": str(point), "EDGETL_FAULT_MODE": fault}
    done = subprocess.run([sys.executable, str(script), str(inside), str(outside)], capture_output=True, text=True,
                          env=env, timeout=60)
    return done, read_log(log, inside), struct.unpack_from("<qiiq", counter.read_bytes())


def test_the_shim_counts_write_operations_inside_the_folder_across_processes(fault_shim: Path,
                                                                           tmp_path: Path) -> None:
    done, ops, (count, fired, _, _) = _shim_run(fault_shim, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "outside ok" in done.stdout and not fired
    described = [op.describe() for op in ops]
    assert described[:12] == [
        "mkdir d", "open d/a.bin", "write d/a.bin", "open d/b.txt", "write d/b.txt", "openat d/c.txt",
        "rename d/b.txt -> d/e.txt", "open d/f.bin", "sendfile d/f.bin", "open d/g.txt", "write d/g.txt",
        "unlink d/e.txt"]  # a file's later writes are not new points
    assert sorted(described[12:-1]) == ["unlinkat d/a.bin", "unlinkat d/c.txt", "unlinkat d/f.bin",
                                        "unlinkat d/g.txt"] and described[-1] == "rmdir d"
    assert count == len(ops) == 17
    assert len({op.pid for op in ops}) == 2  # the child counted in the same sequence


def test_enospc_fills_the_disk_for_good_and_eio_fails_once(fault_shim: Path, tmp_path: Path) -> None:
    done, ops, (_, fired, _, failed) = _shim_run(fault_shim, tmp_path, point=3, fault="enospc")
    assert fired and "write 28" in done.stdout
    assert "relative 28" in done.stdout and "child exit 1" in done.stdout  # later writes fail, in children too
    assert "rmtree ok" in done.stdout  # removing files still works on a full disk
    assert failed >= 3 and [op.outcome for op in ops][2] == "FAULT-ENOSPC"
    done, ops, (_, fired, _, failed) = _shim_run(fault_shim, tmp_path, point=3, fault="eio")
    assert fired and failed == 1 and "write 5" in done.stdout and "relative ok" in done.stdout


def test_kill_ends_the_process_that_reaches_the_point(fault_shim: Path, tmp_path: Path) -> None:
    done, ops, (_, fired, _, _) = _shim_run(fault_shim, tmp_path, point=10, fault="kill")
    assert done.returncode == 0 and "child exit -9" in done.stdout  # the child died; the script went on
    done, ops, (_, fired, pid, _) = _shim_run(fault_shim, tmp_path, point=2, fault="kill")
    assert done.returncode == -9 and fired and ops[-1].outcome == "KILL" and ops[-1].pid == pid


# ------------------------------------------------------------------------------------------- the harness itself

TOY_STAGE = textwrap.dedent("""
    '''A stage in miniature: `good` builds its folder under a temporary name and swaps it in; `in-place` rewrites
    the output where it is; `swallow` also ignores its write errors.'''
    import ctypes, json, os, shutil, sys, tempfile
    how, out = sys.argv[1], sys.argv[2]
    parent, name = os.path.dirname(out), os.path.basename(out)

    def write_all(folder):
        for index in range(3):
            try:
                with open(os.path.join(folder, f"part{index}.txt"), "w") as handle:
                    handle.write(str(index) * 1000)
            except OSError:
                if how != "swallow":
                    raise
        with open(os.path.join(folder, "manifest.json"), "w") as handle:
            json.dump({"kind": "toy"}, handle)

    try:
        if how == "good":
            for entry in os.listdir(parent):  # what a killed run left: its owner is gone
                if entry.startswith(f".{name}.tmp-"):
                    pid = int(entry.split("-")[1])
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
            tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-{os.getpid()}-")
            try:
                write_all(tmp)
                if os.path.exists(out):
                    libc = ctypes.CDLL(None, use_errno=True)
                    if libc.renameat2(-100, tmp.encode(), -100, out.encode(), 2) != 0:
                        error = ctypes.get_errno()
                        raise OSError(error, os.strerror(error))
                else:
                    os.rename(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(out, ignore_errors=True)
            os.mkdir(out)
            write_all(out)
    except OSError as error:
        print(f"edgetl: {error.strerror}", file=sys.stderr)
        sys.exit(1)
""")


def _toy(tmp_path: Path, how: str) -> Stage:
    script = tmp_path / "toy_stage.py"
    script.write_text(TOY_STAGE)
    out = tmp_path / how / "out" / "result"
    return Stage(f"toy-{how}", (how, str(out)), out, command=(sys.executable, str(script)), timeout=60)


def test_the_harness_passes_a_stage_that_swaps_its_folder_in(fault_shim: Path, tmp_path: Path) -> None:
    stage = _toy(tmp_path, "good")
    fresh = fresh_run(stage, fault_shim, tmp_path / "scratch")
    grid = run_grid(stage, fault_shim, tmp_path / "scratch", fresh, plan_for(stage, "full"), recount=True)
    assert grid.points == 15 and len(grid.outcomes) == 45
    assert not grid.failures and not grid.clean_problems, "\n".join(failure_lines([grid]))
    verdicts = {outcome.verdict for outcome in grid.outcomes}
    assert verdicts == {"refused", "killed", "tolerated"}  # a failed clean-up after the swap is tolerated


@pytest.mark.parametrize("how", ["in-place", "swallow"])
def test_the_harness_catches_a_stage_that_loses_the_previous_output(fault_shim: Path, tmp_path: Path,
                                                                    how: str) -> None:
    stage = _toy(tmp_path, how)
    fresh = fresh_run(stage, fault_shim, tmp_path / "scratch")
    grid = run_grid(stage, fault_shim, tmp_path / "scratch", fresh, plan_for(stage, "full"), recount=True)
    problems = " ".join(problem for outcome in grid.failures for problem in outcome.problems)
    assert grid.failures
    if how == "in-place":
        assert "but the previous output changed" in problems and "killed, and the output is neither" in problems
    else:
        assert "exited 0 with an incomplete output" in problems or "exited 0 although writing" in problems
    json.dumps([outcome.to_json() for outcome in grid.outcomes])  # the report can be written


# ------------------------------------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory, fault_shim: Path, shared_cache: Path) -> Pipeline:
    """Each stage's tiniest run; the inputs of a stage are made by the first runs of the stages before it."""
    pytest.importorskip("torch", reason="the stages run the torch backend (the torch extra)")
    pytest.importorskip("litert_torch", reason="export makes .tflite files with litert-torch (the torch extra)")
    return Pipeline(tmp_path_factory.mktemp("faults"), fault_shim, {"EDGETL_CACHE": str(shared_cache)})


@pytest.mark.torch
# export's small grid (about 110 s) runs with -m slow: tests/test_reliability.py kills, fills the disk under and
# interrupts a real export in the default run
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "export" else n for n in STAGES])
def test_small_fault_grid(pipeline: Pipeline, name: str) -> None:
    """ENOSPC, EIO and SIGKILL at the key points of the stage's run."""
    stage, fresh = pipeline.prepare(name)
    grid = run_grid(stage, pipeline.shim, pipeline.scratch(name), fresh,
                    plan_for(stage, "small", offset=STAGES.index(name)))
    assert grid.outcomes and all(outcome.verdict != "not-fired" for outcome in grid.outcomes)
    assert not grid.failures and not grid.clean_problems, "\n" + "\n".join(failure_lines([grid]))


@pytest.mark.faults
@pytest.mark.torch
@pytest.mark.parametrize("name", STAGES)
def test_full_fault_grid(request: pytest.FixtureRequest, pipeline: Pipeline, name: str) -> None:
    """Every write point of the stage × every fault (about an hour on two cores): only with `-m faults`."""
    selected = request.config.getoption("markexpr") or ""
    if "faults" not in selected or "not faults" in selected:
        pytest.skip("the full fault grid runs only when selected: pytest -m faults")
    stage, fresh = pipeline.prepare(name)
    grid = run_grid(stage, pipeline.shim, pipeline.scratch(name), fresh, plan_for(stage, "full"), recount=True)
    assert not grid.failures and not grid.clean_problems, "\n" + "\n".join(failure_lines([grid]))
