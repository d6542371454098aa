"""Run an edgetl stage with a fault injected at its Nth file operation, and judge what it left behind.

A stage is one `edgetl` command whose output folder is `Stage.out`; faults are injected under that folder's
parent (the *fault folder*), so they hit the stage's own writes (its temporary folder, its output, the files
it writes beside it) and never the caches or its inputs. The shim (faultshim.c) counts every write-type file
operation there, across all processes of the run, and fails the chosen one with ENOSPC, EIO or SIGKILL.

A grid for one stage:

1. a first run in count mode makes the previous output and lists the operations of a run (the op log);
2. the *pristine* state of the fault folder is saved (a copy of every entry);
3. each (point, fault) runs the stage again, over the pristine state, with the fault at that point, and is
   judged (`judge`); what the run left beside the output is set aside and the pristine state restored, so
   every run starts from the same state and point k always names the same operation;
4. everything set aside is put back and a last clean run must remove all of it.

The rules a run is judged by (README "Your data is safe", edgetl/errors.py):

- the fault fired and the run exited 1, 2 or 130: the fault folder is byte-identical to the pristine one,
  stderr holds exactly one line starting with `edgetl:` and no traceback;
- the process that hit the fault was edgetl's own and SIGKILL ended it (status -9, or 137 from a shell): the
  fault folder is byte-identical, or holds a complete new output (the kill came after publication);
- the fault fired and the run exited 0: only when the fault was tolerated: the published output is complete
  (the same files as a clean run, every JSON readable, every recorded sha256 right), and a file of the output
  whose write the fault hit is the same as a clean run's (a write that was retried is fine; one whose error was
  swallowed can leave a short file that looks complete); a run that exits 0 with the previous output still in
  place misled its user;
- the fault did not fire (the run performed fewer operations): a clean run, exit 0;
- always: no traceback, the stage's inputs unchanged, and whatever the run left beside the output (temporary
  folders, probe files) is gone after the next clean run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIM_SOURCE = Path(__file__).with_name("faultshim.c")
FAULTS = ("enospc", "eio", "kill")
FAILED_EXITS = (1, 2, 130)  # a failed stage, bad input, interrupted (edgetl/errors.py)
KILLED_EXITS = (-signal.SIGKILL, 128 + signal.SIGKILL)
# operations that put data into a file (a swallowed failure there can leave a short file under a final name)
DATA_OPS = frozenset({"open", "openat", "creat", "fopen", "freopen", "mkstemp", "write", "pwrite", "writev",
                      "pwritev", "sendfile", "copy_file_range", "fwrite", "ftruncate", "truncate", "fallocate",
                      "posix_fallocate", "link", "linkat", "symlink", "symlinkat"})
_HIDDEN_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-\d+-\d+@.+-[A-Za-z0-9_]{8}$")


def compile_shim(folder: Path) -> Path | None:
    """Build the shim with the system C compiler; None when there is no compiler (the tests then skip)."""
    compiler = next((found for name in (os.environ.get("CC", ""), "gcc", "cc") if name
                     for found in [shutil.which(name)] if found), None)
    if compiler is None:
        return None
    target = Path(folder) / "faultshim.so"
    done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(target), str(SHIM_SOURCE), "-ldl"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {SHIM_SOURCE} failed:\n{done.stderr[-3000:]}")
    return target


# ------------------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Stage:
    """One edgetl command: its arguments (with `--out`), its output folder and the folders it reads."""

    name: str
    args: tuple[str, ...]
    out: Path
    inputs: tuple[Path, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 900.0
    source: Path = REPO  # the source tree whose edgetl runs (`python -m` imports it from the working folder)
    command: tuple[str, ...] = ()  # the program, when it is not edgetl's CLI

    @property
    def folder(self) -> Path:
        """The fault folder: the one that holds the output."""
        return self.out.parent


@dataclass(frozen=True)
class Op:
    """One counted file operation, from the shim's log; paths are relative to the fault folder when inside it."""

    seq: int
    pid: int
    time: float
    op: str
    outcome: str
    path: str
    path2: str

    def describe(self) -> str:
        return f"{self.op} {self.path}" + (f" -> {self.path2}" if self.path2 else "")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    ops: list[Op]
    count: int
    fired: bool
    fired_pid: int
    main_pid: int
    seconds: float
    timed_out: bool


def _relative(path: str, folder: str) -> str:
    return path[len(folder) + 1:] if path.startswith(folder + "/") else path


def read_log(log: Path, folder: Path) -> list[Op]:
    """The shim's op log, in sequence order."""
    if not log.exists():
        return []
    base = str(Path(folder).resolve())
    ops = []
    for line in log.read_text(errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) != 7:
            continue
        seq, pid, when, op, outcome, path, path2 = parts
        ops.append(Op(int(seq), int(pid), float(when), op, outcome, _relative(path, base), _relative(path2, base)))
    return sorted(ops, key=lambda op: op.seq)


def _wait_group(pgid: int, seconds: float) -> None:
    """Let what the run started end (a killed parent's children go on alone), then stop the rest of its group."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_stage(stage: Stage, shim: Path, scratch: Path, point: int = 0, fault: str = "count",
              writes: str = "first") -> Run:
    """Run the stage once under the shim: count only (point 0) or with `fault` at operation `point`."""
    scratch.mkdir(parents=True, exist_ok=True)
    counter = scratch / "counter"
    counter.write_bytes(bytes(4096))
    log = scratch / "ops.log"
    log.unlink(missing_ok=True)
    tmp = scratch / "tmp"  # the run's own temporary files (converters'), kept out of /tmp and removed after
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    preload = " ".join(filter(None, [str(shim), os.environ.get("LD_PRELOAD", "")]))
    env = {**os.environ, **stage.env, "LD_PRELOAD": preload, "TMPDIR": str(tmp),
           "EDGETL_FAULT_DIR": str(stage.folder.resolve()), "EDGETL_FAULT_COUNTER": str(counter),
           "EDGETL_FAULT_LOG": str(log), "EDGETL_FAULT_AT": str(point), "EDGETL_FAULT_MODE": fault,
           "EDGETL_FAULT_WRITES": writes}
    started = time.monotonic()
    command = stage.command or (sys.executable, "-m", "edgetl.cli")
    child = subprocess.Popen([*command, *stage.args], cwd=stage.source, env=env, text=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
    timed_out = False
    try:
        stdout, stderr = child.communicate(timeout=stage.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
    _wait_group(child.pid, 30.0)
    seconds = time.monotonic() - started
    count, fired, fired_pid, _failed = struct.unpack_from("<qiiq", counter.read_bytes())
    shutil.rmtree(tmp, ignore_errors=True)
    return Run(child.returncode, stdout, stderr, read_log(log, stage.folder), count, bool(fired), fired_pid,
               child.pid, seconds, timed_out)


# ------------------------------------------------------------------------------------------- state of a folder


def digest(folder: Path, names: Iterable[str]) -> dict[str, str]:
    """Every file, folder and link under the named entries of `folder`: sha256, "dir" or "link:<target>"."""
    found: dict[str, str] = {}
    for name in sorted(names):
        top = Path(folder) / name
        if not (top.exists() or top.is_symlink()):
            continue
        paths = [top] + (sorted(top.rglob("*")) if top.is_dir() and not top.is_symlink() else [])
        for path in paths:
            key = path.relative_to(folder).as_posix()
            if path.is_symlink():
                found[key] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def describe_change(before: dict[str, str], after: dict[str, str], limit: int = 6) -> str:
    gone = sorted(set(before) - set(after))
    new = sorted(set(after) - set(before))
    changed = sorted(key for key in set(before) & set(after) if before[key] != after[key])
    parts = []
    for label, names in (("removed", gone), ("added", new), ("changed", changed)):
        if names:
            shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
            parts.append(f"{label} {shown}")
    return "; ".join(parts) or "no change"


def _recorded_hashes(document: object) -> Iterable[tuple[str, str]]:
    """(file name, sha256) pairs a JSON document records: `file`+`sha256`, `X_file`+`X_sha256`."""
    if isinstance(document, dict):
        for key, value in document.items():
            if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) and (
                    key == "sha256" or key.endswith("_sha256")):
                name = document.get("file" if key == "sha256" else f"{key[:-len('_sha256')]}_file")
                if isinstance(name, str):
                    yield name, value
            yield from _recorded_hashes(value)
    elif isinstance(document, list):
        for value in document:
            yield from _recorded_hashes(value)


def completeness(folder: Path, names: Iterable[str], expected: set[str]) -> list[str]:
    """What makes the output under `names` incomplete: files missing or extra against a clean run's, a JSON file
    that does not parse, a recorded sha256 that is not the file's."""
    state = digest(folder, names)
    files = {key for key, value in state.items() if value != "dir"}
    problems = []
    if expected - files:
        problems.append(f"missing {', '.join(sorted(expected - files)[:6])}")
    if files - expected:
        problems.append(f"unexpected {', '.join(sorted(files - expected)[:6])}")
    by_name: dict[str, list[str]] = {}
    for key in files:
        by_name.setdefault(Path(key).name, []).append(key)
    for key in sorted(files):
        if not key.endswith(".json"):
            continue
        try:
            document = json.loads((folder / key).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            problems.append(f"{key} is not readable JSON ({error})")
            continue
        for name, sha in _recorded_hashes(document):
            beside = (Path(key).parent / name).as_posix()
            for copy in [beside] if beside in files else by_name.get(Path(name).name, []):
                if state[copy] != sha:
                    problems.append(f"{copy} does not have the sha256 that {key} records")
    return problems


_OWNER_TAG = re.compile(r"-\d+-\d+@[^/\s]+?-[A-Za-z0-9_]{8}(?=/|\s|$)")


def shorten(text: str) -> str:
    """A temporary name without its owner tag (`.export.tmp-123-456@host-abcdefgh` → `.export.tmp-*`)."""
    return _OWNER_TAG.sub("-*", text)


def final_name(relative: str, out_name: str) -> str:
    """Where a path inside a temporary folder ends up once published (`.export.tmp-…/x` → `export/x`)."""
    parts = []
    for part in Path(relative).parts:
        match = _HIDDEN_TEMP.match(part)
        parts.append(match["name"] if match else part)
    return "/".join(parts)


# ------------------------------------------------------------------------------------------- judging a run


@dataclass
class Outcome:
    """One (point, fault) run and its verdict; `problems` empty means the run kept every rule."""

    stage: str
    point: int
    fault: str
    returncode: int
    verdict: str  # refused, killed, tolerated, not-fired, or FAILED
    op: str  # the operation the fault hit, as the shim logged it ("" when it did not fire)
    problems: list[str]
    stderr_tail: str
    seconds: float
    left: list[str] = field(default_factory=list)  # what it left beside the output (checked after a clean run)

    def to_json(self) -> dict:
        return asdict(self)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("edgetl:")]


def _tail(stderr: str, lines: int = 6) -> str:
    kept = [line for line in stderr.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def judge(stage: Stage, run: Run, point: int, fault: str, pristine: dict[str, str], baseline: set[str],
          expected: set[str], inputs: dict[str, dict[str, str]]) -> Outcome:
    """Apply the rules (module docstring) to one finished run."""
    folder = stage.folder
    problems: list[str] = []
    now = digest(folder, baseline)
    unchanged = now == pristine
    hit = next((op for op in run.ops if op.seq == point and op.outcome != "ok"), None)
    code = run.returncode
    errors = _errors(run.stderr)
    if run.timed_out:
        problems.append(f"did not end within {stage.timeout:.0f} s")
    if "Traceback" in run.stderr:
        problems.append("a traceback on stderr")
    for source, before in inputs.items():
        after = digest(Path(source).parent, [Path(source).name])
        if after != before:
            problems.append(f"the input {source} changed: {describe_change(before, after)}")
    if not run.fired:
        verdict = "not-fired"
        if code != 0:
            problems.append(f"no fault fired (the run made {run.count} operations) yet it exited {code}")
        else:
            problems += [f"the output is incomplete: {why}" for why in completeness(folder, baseline, expected)]
    elif code == 0:
        verdict = "tolerated"
        published = any(op.op.startswith("rename") and op.path2 == stage.out.name and op.outcome == "ok"
                        for op in run.ops)
        if unchanged and not published:
            problems.append("exited 0 but published nothing: the previous output is still in place")
        else:
            problems += [f"exited 0 with an incomplete output: {why}" for why in completeness(folder, baseline,
                                                                                                expected)]
        target = final_name(hit.path, stage.out.name) if hit is not None and hit.op in DATA_OPS else ""
        if target in now and not target.endswith(".json") and now[target] != pristine.get(target):
            problems.append(f"exited 0 although writing {target} of the published output failed, and the file "
                            "differs from a clean run's")
    elif code in KILLED_EXITS and run.fired_pid == run.main_pid and fault == "kill":
        verdict = "killed"
        if not unchanged:
            why = completeness(folder, baseline, expected)
            if why:
                problems.append(f"killed, and the output is neither the previous one nor a complete new one: "
                                f"{describe_change(pristine, now)}; {'; '.join(why)}")
    elif code in FAILED_EXITS:
        verdict = "refused"
        if not unchanged:
            problems.append(f"exited {code} but the previous output changed: {describe_change(pristine, now)}")
        if len(errors) != 1:
            problems.append(f"{len(errors)} lines starting with 'edgetl:' on stderr, not one")
    else:
        verdict = "exit"
        problems.append(f"exit status {code}; a fault allows 1, 2, 130, or 137 when SIGKILL ended edgetl itself, "
                        "or 0 when the output was published complete")
    return Outcome(stage.name, point, fault, code, "FAILED" if problems else verdict,
                   hit.describe() if hit else "", problems, _tail(run.stderr), round(run.seconds, 1))


# ------------------------------------------------------------------------------------------- plans


def publication(ops: list[Op], out_name: str) -> int | None:
    """The operation that put the finished output under its final name (a rename onto it)."""
    return next((op.seq for op in ops if op.op.startswith("rename") and op.path2 == out_name), None)


def key_points(ops: list[Op], out_name: str) -> list[int]:
    """Points that stand for the phases of a run: the first operation, the first in the temporary folder, a
    data write half-way, the publication and the first operation after it. Taken from a run that made the
    output afresh; all of them precede the clean-up of a replaced output, so they are the same operations in a
    run over a previous output."""
    if not ops:
        return []
    published = publication(ops, out_name)
    def in_temp(op: Op) -> bool:
        match = _HIDDEN_TEMP.match(op.path.split("/", 1)[0])
        return match is not None and match["name"] == out_name

    temp = next((op.seq for op in ops if in_temp(op)), None)
    points = [1]
    if temp is not None:
        points.append(temp)
    end = published if published is not None else ops[-1].seq + 1
    start = temp if temp is not None else 1
    writes = [op.seq for op in ops if start < op.seq < end and op.op in DATA_OPS]
    if writes:
        points.append(writes[len(writes) // 2])
    if published is not None:
        points += [published, published + 1]
    return sorted(set(points))


def small_plan(ops: list[Op], out_name: str, runs: int, offset: int = 0) -> list[tuple[int, str]]:
    """At most `runs` (point, fault) pairs over the key points: each round gives every point one fault, turning
    the faults so that neighbouring points (and stages, through `offset`) get different ones."""
    points = key_points(ops, out_name)
    pairs = [(point, FAULTS[(index + offset + turn) % len(FAULTS)])
             for turn in range(len(FAULTS)) for index, point in enumerate(points)]
    return pairs[:runs]


def full_plan(count: int, faults: Iterable[str] = FAULTS) -> list[tuple[int, str]]:
    return [(point, fault) for point in range(1, count + 1) for fault in faults]


Plan = Callable[[list[Op], int], list[tuple[int, str]]]
# runs per stage in the small grid (the default test run): as many as a stage's run time allows
SMALL_RUNS = {"finetune": 5, "export": 4, "bench": 8, "sweep": 8, "bundle": 15}


def plan_for(stage: Stage, grid: str, faults: Iterable[str] = FAULTS, runs: int | None = None,
             offset: int = 0) -> Plan:
    """The grid's plan for `stage`: full (every point of a counted run × every fault) or small."""
    chosen = tuple(faults)
    if grid == "full":
        return lambda ops, count: full_plan(count, chosen)
    budget = runs if runs is not None else SMALL_RUNS.get(stage.name, len(FAULTS))
    return lambda ops, count: [pair for pair in small_plan(ops, stage.out.name, budget, offset) if pair[1] in chosen]


# ------------------------------------------------------------------------------------------- a grid


@dataclass
class Grid:
    """The outcome of a grid on one stage."""

    stage: str
    points: int  # operations of a run over a previous output
    points_fresh: int  # operations of a run that makes the output afresh
    ops: list[str]  # the operations of a run over a previous output, by point
    outcomes: list[Outcome]
    clean_problems: list[str]  # the last clean run's own problems
    seconds: float

    @property
    def failures(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.problems]

    def to_json(self) -> dict:
        """Runs that kept every rule as rows (point, fault, verdict, exit status, seconds); failures in full."""
        return {"stage": self.stage, "points": self.points, "points_fresh": self.points_fresh,
                "ops": [shorten(op) for op in self.ops], "seconds": round(self.seconds, 1),
                "clean_problems": self.clean_problems,
                "runs": [[outcome.point, outcome.fault, outcome.verdict, outcome.returncode, outcome.seconds]
                         for outcome in self.outcomes if not outcome.problems],
                "failures": [{**outcome.to_json(), "op": shorten(outcome.op)} for outcome in self.outcomes
                             if outcome.problems]}


class SetupFailed(RuntimeError):
    """A clean run of the stage failed: the grid has no previous output to protect."""


def _clean(stage: Stage, run: Run, what: str) -> None:
    if run.returncode != 0 or run.fired:
        raise SetupFailed(f"{stage.name}: the {what} (edgetl {' '.join(stage.args)}) exited {run.returncode}:\n"
                          f"{run.stderr[-3000:]}")


def fresh_run(stage: Stage, shim: Path, scratch: Path, writes: str = "first") -> Run:
    """Make the stage's output afresh (counted): the previous output that the grid then protects."""
    if stage.out.exists():
        shutil.rmtree(stage.out)
    stage.folder.mkdir(parents=True, exist_ok=True)
    run = run_stage(stage, shim, scratch / "fresh", writes=writes)
    _clean(stage, run, "first clean run")
    return run


def run_grid(stage: Stage, shim: Path, scratch: Path, fresh: Run, plan: Plan, recount: bool = False,
             writes: str = "first",
             progress: Callable[[str], None] | None = None) -> Grid:
    """Run `plan` (given a run's ops and its count) on a stage whose output `fresh` made, then the clean run.

    `recount`: count a run over the previous output first, and give the plan its ops (the full grid needs
    every point of such a run); otherwise the plan gets the fresh run's ops (`key_points` explains why that is
    enough for the small grid)."""
    started = time.monotonic()
    folder = stage.folder
    inputs = {str(source): digest(Path(source).parent, [Path(source).name]) for source in stage.inputs}
    counted = fresh
    if recount:
        counted = run_stage(stage, shim, scratch / "count", writes=writes)
        _clean(stage, counted, "counting run")
    baseline = {entry.name for entry in folder.iterdir()}
    pristine = digest(folder, baseline)
    expected = {key for key, value in pristine.items() if value != "dir"}
    saved = scratch / "pristine"
    shutil.rmtree(saved, ignore_errors=True)
    saved.mkdir(parents=True)
    for name in baseline:
        source = folder / name
        if source.is_dir() and not source.is_symlink():
            shutil.copytree(source, saved / name, symlinks=True)
        else:
            shutil.copy2(source, saved / name, follow_symlinks=False)
    held = scratch / "held"
    shutil.rmtree(held, ignore_errors=True)
    outcomes: list[Outcome] = []
    for index, (point, fault) in enumerate(plan(counted.ops, counted.count)):
        run = run_stage(stage, shim, scratch / "run", point, fault, writes)
        outcome = judge(stage, run, point, fault, pristine, baseline, expected, inputs)
        for entry in sorted(folder.iterdir()):
            if entry.name not in baseline:  # set aside: the last clean run must remove it
                outcome.left.append(entry.name)
                (held / str(index)).mkdir(parents=True, exist_ok=True)
                entry.rename(held / str(index) / entry.name)
        if digest(folder, baseline) != pristine:  # start every run from the same state
            for name in baseline:
                target = folder / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                source = saved / name
                if source.is_dir() and not source.is_symlink():
                    shutil.copytree(source, target, symlinks=True)
                else:
                    shutil.copy2(source, target, follow_symlinks=False)
        outcomes.append(outcome)
        if progress is not None:
            progress(f"{stage.name} point {point} {fault}: {outcome.verdict} "
                     f"(exit {outcome.returncode}, {outcome.seconds:.1f} s) {outcome.op}"
                     + "".join(f"\n    {problem}" for problem in outcome.problems))
    owner: dict[str, Outcome] = {}
    if held.exists():
        for index_folder in held.iterdir():
            for entry in index_folder.iterdir():
                owner[entry.name] = outcomes[int(index_folder.name)]
                entry.rename(folder / entry.name)
    final = run_stage(stage, shim, scratch / "clean", writes=writes)
    clean_problems = []
    if final.returncode != 0:
        clean_problems.append(f"the clean run after the grid exited {final.returncode}: {_tail(final.stderr)}")
    if "Traceback" in final.stderr:
        clean_problems.append("the clean run after the grid printed a traceback")
    for entry in sorted(folder.iterdir()):
        if entry.name in owner:
            owner[entry.name].problems.append(f"left {entry.name} beside the output, still there after the next "
                                              "clean run")
            owner[entry.name].verdict = "FAILED"
        elif entry.name not in baseline:
            clean_problems.append(f"the clean run after the grid left {entry.name}")
    if final.returncode == 0:
        clean_problems += [f"the clean run's output is incomplete: {why}"
                           for why in completeness(folder, baseline, expected)]
    if recount:
        ops = counted.ops
    else:  # the clean run's own operations, without its removal of what the grid set aside and put back
        ops = [op for op in final.ops if Path(op.path).parts[:1] not in [(name,) for name in owner]]
    return Grid(stage.name, len(ops), fresh.count, [op.describe() for op in ops], outcomes, clean_problems,
                time.monotonic() - started)


# ------------------------------------------------------------------------------------------- reports


def summary(grids: list[Grid]) -> dict[str, dict[str, dict[str, int]]]:
    """Counts of outcomes: stage → fault → verdict → runs."""
    table: dict[str, dict[str, dict[str, int]]] = {}
    for grid in grids:
        for outcome in grid.outcomes:
            row = table.setdefault(grid.stage, {}).setdefault(outcome.fault, {})
            row[outcome.verdict] = row.get(outcome.verdict, 0) + 1
    return table


def failure_lines(grids: list[Grid]) -> list[str]:
    """One entry per failed run: stage, point, fault, operation, exit status, problems, stderr tail."""
    lines = []
    for grid in grids:
        lines += [f"{grid.stage}: clean run: {problem}" for problem in grid.clean_problems]
        for outcome in grid.failures:
            tail = outcome.stderr_tail.replace("\n", "\n      | ")
            lines.append(f"{grid.stage} point {outcome.point}/{grid.points} {outcome.fault} "
                         f"[{shorten(outcome.op) or 'did not fire'}] exit {outcome.returncode}: "
                         f"{'; '.join(outcome.problems)}\n      | {tail}")
    return lines


def markdown(grids: list[Grid], title: str) -> str:
    verdicts = ("refused", "killed", "tolerated", "not-fired", "FAILED")
    rows = [f"# {title}", "",
            "Runs per stage and fault, by outcome: refused (exit 1/2/130, previous output byte-identical, one "
            "line), killed (SIGKILL ended edgetl; previous output intact or a complete new one), tolerated (exit "
            "0, complete new output), not-fired (the run made fewer operations), FAILED (a rule broken).", "",
            "| stage | write points | fault | runs | " + " | ".join(verdicts) + " |",
            "|---|---:|---|---:|" + "---:|" * len(verdicts)]
    table = summary(grids)
    for grid in grids:
        for fault in FAULTS:
            counts = table.get(grid.stage, {}).get(fault, {})
            if counts:
                rows.append(f"| {grid.stage} | {grid.points} | {fault} | {sum(counts.values())} | "
                            + " | ".join(str(counts.get(verdict, 0)) for verdict in verdicts) + " |")
    failures = failure_lines(grids)
    rows += ["", f"## Failures ({len(failures)})", ""]
    rows += [f"- {line.splitlines()[0]}" + "".join(f"\n  {extra}" for extra in line.splitlines()[1:])
             for line in failures] or ["None."]
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------------------------------- the tiny pipeline

TINY_MODEL = ("--data", "builtin:shapes", "--backbone", "mobilenet_v2", "--width", "0.35", "--image-size", "32",
              "--weights", "none", "--epochs-finetune", "0", "--device", "cpu")
STAGES = ("finetune", "export", "bench", "sweep", "bundle")


class Pipeline:
    """The tiniest run of each stage, each writing into a fault folder of its own under `root`; the inputs of a
    stage are copies (outside every fault folder) of what the earlier stages' first runs made."""

    def __init__(self, root: Path, shim: Path, env: dict[str, str] | None = None, writes: str = "first",
                 source: Path = REPO) -> None:
        self.root = Path(root)
        self.source = Path(source)
        self.shim = shim
        self.env = dict(env or {})
        self.writes = writes
        self.checkpoint = self.root / "inputs" / "run" / "checkpoint"
        self.export = self.root / "inputs" / "run" / "export"
        self.fresh: dict[str, Run] = {}

    def scratch(self, name: str) -> Path:
        return self.root / name / "scratch"

    def stage(self, name: str) -> Stage:
        return replace(self._stage(name), source=self.source)

    def _stage(self, name: str) -> Stage:
        folder = self.root / name / "out"
        checkpoint, export = str(self.checkpoint), str(self.export)
        if name == "finetune":
            return Stage(name, ("finetune", *TINY_MODEL, "--out", str(folder)), folder / "checkpoint", (), self.env)
        if name == "export":
            return Stage(name, ("export", checkpoint, "--formats", "tflite", "--quant", "fp32", "--out",
                                str(folder / "export")), folder / "export", (self.checkpoint,), self.env)
        if name == "bench":
            return Stage(name, ("bench", export, "--target", "host", "--threads", "1", "--iters", "2", "--warmup",
                                "0", "--samples", "8", "--out", str(folder / "bench")), folder / "bench",
                         (self.export,), self.env)
        if name == "sweep":
            return Stage(name, ("sweep", checkpoint, "--variants", "fp32", "--formats", "tflite", "--target", "host",
                                "--threads", "1", "--iters", "2", "--samples", "8", "--reuse", export, "--out",
                                str(folder / "sweep")), folder / "sweep", (self.checkpoint, self.export), self.env)
        if name == "bundle":
            return Stage(name, ("bundle", export, "--golden", "1", "--top-k", "1", "--no-metadata", "--out",
                                str(folder / "bundle")), folder / "bundle", (self.export,), self.env)
        raise ValueError(f"unknown stage {name!r}; valid: {', '.join(STAGES)}")

    def prepare(self, name: str) -> tuple[Stage, Run]:
        """The stage with its previous output made (counted), after the inputs it reads."""
        stage = self.stage(name)
        if name in self.fresh:
            return stage, self.fresh[name]
        if name != "finetune" and not self.checkpoint.exists():
            self.prepare("finetune")
        if name in ("bench", "sweep", "bundle") and not self.export.exists():
            self.prepare("export")
        self.fresh[name] = fresh_run(stage, self.shim, self.scratch(name), self.writes)
        if name == "finetune":
            shutil.copytree(stage.out, self.checkpoint)
        elif name == "export":
            shutil.copytree(stage.out, self.export)
        return stage, self.fresh[name]
