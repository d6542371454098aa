"""The fault-injection grid: every stage, every write point, ENOSPC, EIO and SIGKILL; counts as JSON and markdown.

Each stage (finetune, export, bench, sweep, bundle) runs in its tiniest configuration under an LD_PRELOAD shim
(tests/faults/faultshim.c) that fails its Nth file operation; tests/faults/harness.py explains the rules each
run is judged by. The counts (points tried × outcome) and every failure go to
benchmarks/results/faults/fault_grid.{json,md} (the small grid of the default test run: fault_grid-small.*).

    .venv/bin/python benchmarks/fault_grid.py                    # the full grid (about an hour on two cores)
    .venv/bin/python benchmarks/fault_grid.py --grid small       # the default test run's grid (minutes)
    .venv/bin/python benchmarks/fault_grid.py --stages bundle,bench --faults enospc
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.faults.harness import (  # noqa: E402
    FAULTS,
    STAGES,
    Grid,
    Pipeline,
    Plan,
    SetupFailed,
    compile_shim,
    failure_lines,
    markdown,
    plan_for,
    run_grid,
    summary,
)


def _label(source: Path) -> str:
    """The commit the grid ran (with "+changes" for a working tree that differs from it)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=source)
    if commit.returncode != 0:
        return str(source)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=source).stdout.strip()
    return commit.stdout.strip() + ("+changes" if dirty else "")


def _write(args: argparse.Namespace, grids: list[Grid], faults: list[str], seconds: float) -> None:
    suffix = "" if args.grid == "full" else "-small"
    args.out.mkdir(parents=True, exist_ok=True)
    label = args.label or _label(args.source)
    document = {
        "grid": args.grid, "writes": args.writes, "faults": faults, "seconds": round(seconds, 1), "source": label,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "counts": summary(grids), "failures": failure_lines(grids), "stages": [grid.to_json() for grid in grids],
    }
    (args.out / f"fault_grid{suffix}.json").write_text(json.dumps(document, indent=2) + "\n")
    title = f"Fault-injection grid ({args.grid}, writes: {args.writes}) at {label}, {seconds / 60:.1f} min"
    (args.out / f"fault_grid{suffix}.md").write_text(markdown(grids, title))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ", ".join(STAGES))
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma list of " + ", ".join(FAULTS))
    parser.add_argument("--grid", choices=("full", "small"), default="full")
    parser.add_argument("--writes", choices=("first", "all"), default="first",
                        help="a file's data writes count once (first) or each call (all)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "faults")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed after)")
    parser.add_argument("--source", type=Path, default=REPO,
                        help="the source tree whose edgetl runs, e.g. a `git worktree` of another commit")
    parser.add_argument("--label", help="what the source is, for the report (default: its git commit)")
    parser.add_argument("--points", default="1-", help="only these points, FIRST-LAST (either may be left out): to "
                        "split a long grid into parts or finish one that was stopped")
    args = parser.parse_args()
    stages = [name.strip() for name in args.stages.split(",") if name.strip()]
    faults = [name.strip() for name in args.faults.split(",") if name.strip()]
    unknown = [name for name in stages if name not in STAGES] + [name for name in faults if name not in FAULTS]
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}")
    first, _, last = args.points.partition("-")
    if not (first or "1").isdigit() or not (last or "0").isdigit():
        parser.error(f"--points {args.points!r}: give FIRST-LAST, e.g. 1-40 or 33-")
    low, high = int(first or 1), int(last) if last else None
    with tempfile.TemporaryDirectory(prefix="edgetl-faults-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        shim = compile_shim(work)
        if shim is None:
            print("fault_grid: no C compiler (gcc or cc) to build the shim", file=sys.stderr)
            return 2
        env = {"EDGETL_CACHE": str(work / "cache"), "TORCH_HOME": str(work / "torch-home")}
        pipeline = Pipeline(work / "pipeline", shim, env, args.writes, args.source.resolve())
        grids: list[Grid] = []
        started = time.monotonic()
        for name in stages:
            try:
                stage, fresh = pipeline.prepare(name)
            except SetupFailed as error:
                print(f"fault_grid: {error}", file=sys.stderr)
                return 1
            chosen = plan_for(stage, args.grid, faults, offset=STAGES.index(name))

            def plan(ops: list, count: int, chosen: Plan = chosen) -> list[tuple[int, str]]:
                return [(point, fault) for point, fault in chosen(ops, count)
                        if low <= point and (high is None or point <= high)]

            grid = run_grid(stage, shim, pipeline.scratch(name), fresh, plan, recount=args.grid == "full",
                            writes=args.writes, progress=lambda line: print(line, file=sys.stderr, flush=True))
            grids.append(grid)
            print(f"{name}: {grid.points} write points, {len(grid.outcomes)} runs, {len(grid.failures)} failed, "
                  f"{grid.seconds:.0f} s", file=sys.stderr, flush=True)
            _write(args, grids, faults, time.monotonic() - started)  # after each stage: a long grid keeps its part
    print(f"fault_grid: {sum(len(grid.outcomes) for grid in grids)} runs, "
          f"{sum(len(grid.failures) for grid in grids)} failed; results in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
