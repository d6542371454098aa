"""Learning curves: test top-1 against training images per class, edgetl against its baselines.

    python benchmarks/learning_curve.py run   [--folders fashion-10 icons-2 ...] [--sizes 5 10 25 50 100 300]
                                              [--seeds 0] [--columns edgetl edgetl-fe frozen-head scratch lr-pixels]
                                              [--edgetl-flags "--image-size 128"] [--results FILE]
    python benchmarks/learning_curve.py table [--results FILE]
    python benchmarks/learning_curve.py plot  [--results FILE] [--out FILE.png]

For each folder × images per class × seed, the training subset is written as its own folder (train/ and
the folder's fixed test/, `benchmarks/folders.py`), and each column runs on it:

    edgetl       `python -m edgetl.cli finetune --data SUBSET --out RUN [EXTRA FLAGS]` as a subprocess;
                 test top-1 read from RUN/checkpoint/manifest.json. edgetl carves its validation split out of
                 train/ itself, so it trains on fewer images than the baselines do.
    edgetl-fe    the same with `--epochs-finetune 0` (feature extraction only).
    frozen-head  the Model-Maker-style frozen baseline (benchmarks/baselines.py: frozen_head).
    scratch      the same network from random weights, fixed step budget (baselines.py: from_scratch).
    lr-pixels    logistic regression on raw pixels (baselines.py: lr_pixels).

Only flags given with --edgetl-flags are passed: the harness relies on no default of the edgetl CLI, so
its figures follow edgetl's defaults as they change (the resolved config of each run is stored).
`builtin:fashion-mnist-mini` is accepted as a folder (its own train/ and test/, "all" images only).

Results accumulate in one JSON file (default benchmarks/results/learning-curve.json); a run whose key
(folder, size, seed, column, conditions) is already there, measured on the folder's current files (a
content hash), is skipped, so an interrupted run resumes and a rebuilt folder is measured again.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

import edgetl

try:
    from benchmarks import baselines, folders
except ImportError:  # run as a script without the repository root on sys.path: the siblings are
    import baselines
    import folders

COLUMNS = ("edgetl", "edgetl-fe", "frozen-head", "scratch", "lr-pixels")
LABELS = {"edgetl": "edgetl default", "edgetl-fe": "edgetl feature extraction only",
          "frozen-head": "Model-Maker-style frozen head", "scratch": "from scratch (budget-limited)",
          "lr-pixels": "logistic regression, raw pixels"}
BUILTIN = "builtin:fashion-mnist-mini"
ALL = 10**6  # "every image the pool has"
RUN_MARK = ".learning-curve-run"  # marks run folders this harness made (and may replace)
DEFAULT_RESULTS = Path("benchmarks/results/learning-curve.json")


def conditions(column: str, args: argparse.Namespace) -> dict:
    """What, besides folder/size/seed, decides a column's figure; part of the result's key."""
    if column in ("edgetl", "edgetl-fe"):
        flags = shlex.split(args.edgetl_flags) + (["--epochs-finetune", "0"] if column == "edgetl-fe" else [])
        return {"edgetl_flags": flags}
    if column == "frozen-head":
        return {"image_size": args.image_size}
    if column == "scratch":
        return {"image_size": args.image_size, "steps": args.scratch_steps}
    return {"pixel_size": args.pixel_size}


def run_key(folder: str, per_class: int, seed: int, column: str, cond: dict) -> str:
    size = "all" if per_class >= ALL else str(per_class)
    return f"{folder}|n={size}|seed={seed}|{column}|{json.dumps(cond, sort_keys=True)}"


def edgetl_source() -> dict:
    """Which edgetl the subprocess runs: its location and, in a git checkout, the commit (and whether dirty)."""
    root = Path(edgetl.__file__).resolve().parents[1]
    info = {"path": str(root)}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "edgetl"],
                               capture_output=True, text=True, check=True).stdout.strip()
        info.update(commit=commit, dirty=bool(dirty))
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def run_edgetl(data: str, run_dir: Path, flags: list[str], threads: int, timeout: float | None) -> dict:
    """One `edgetl finetune` in a child process; figures from the checkpoint manifest it writes."""
    if run_dir.exists():
        if not (run_dir / RUN_MARK).is_file():
            sys.exit(f"{run_dir} exists and was not made by this harness; remove it or choose another --work")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / RUN_MARK).write_text("made by benchmarks/learning_curve.py\n")
    command = [sys.executable, "-m", "edgetl.cli", "finetune", "--data", data, "--out", str(run_dir), *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (run_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"edgetl finetune exited {done.returncode}: {' | '.join(tail)}")
    manifest = json.loads((run_dir / "checkpoint" / "manifest.json").read_text())
    test = manifest["metrics"]["test"]
    total = int(test["images"])
    correct = int(round(float(test["top1"]) * total))
    low, high = baselines.wilson(correct, total)
    counts = manifest.get("data", {}).get("counts", {})
    val = manifest["metrics"].get("val", {})
    return {"top1": round(correct / total, 5), "ci95": [round(low, 5), round(high, 5)], "correct": correct,
            "test_images": total, "val": {k: val.get(k) for k in ("top1", "images")},
            "train_per_class": counts.get("train"), "test_per_class": counts.get("test"), "split_counts": counts,
            "seconds": {"total": round(seconds, 2), "training": manifest.get("training", {}).get("seconds")},
            "selected": manifest.get("training", {}).get("best"), "command": shlex.join(command[1:]),
            "config": manifest.get("config"), "run_dir": str(run_dir), "machine": baselines.machine(),
            "edgetl": edgetl_source()}


def folder_content(folder: str, args: argparse.Namespace) -> str:
    """The content key of the folder as it is now (built first if needed)."""
    if folder == BUILTIN:
        from edgetl.datasets import resolve_builtin

        return folders.content_key(resolve_builtin(BUILTIN))
    return folders.read_meta(folders.build_folder(folders.FOLDERS[folder], args.cache, args.source_root))["content_key"]


def prepare(folder: str, per_class: int, seed: int, args: argparse.Namespace) -> tuple[str, Path, dict]:
    """(--data value for edgetl, subset folder, what the subset holds)."""
    if folder == BUILTIN:
        from edgetl.datasets import resolve_builtin

        root = resolve_builtin(BUILTIN)
        return BUILTIN, root, {"folder": BUILTIN, "folder_content": folders.content_key(root),
                               "note": "the built-in's own train/ and test/ trees"}
    source = folders.build_folder(folders.FOLDERS[folder], args.cache, args.source_root)
    size = "all" if per_class >= ALL else str(per_class)
    subset = args.work / "subsets" / f"{folder}-n{size}-s{seed}"
    info = folders.make_subset(source, per_class, seed, subset)
    return str(subset), subset, {k: v for k, v in info.items() if k != "train_files"}


def run_one(column: str, data: str, subset: Path, seed: int, cond: dict, key: str, args: argparse.Namespace,
            extractor: baselines.FeatureExtractor) -> dict:
    if column in ("edgetl", "edgetl-fe"):
        safe = key.split("|{")[0].replace("|", "_").replace("=", "")
        return run_edgetl(data, args.work / "runs" / f"{safe}-{column}-{zlib.crc32(key.encode()):08x}",
                          cond["edgetl_flags"], args.threads, args.timeout)
    train, test = subset / "train", subset / "test"
    if column == "frozen-head":
        return baselines.frozen_head(train, test, seed=seed, image_size=cond["image_size"], extractor=extractor)
    if column == "scratch":
        return baselines.from_scratch(train, test, seed=seed, image_size=cond["image_size"], steps=cond["steps"])
    return baselines.lr_pixels(train, test, seed=seed, pixel_size=cond["pixel_size"])


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"format": 1, "runs": {}}


def save_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def command_run(args: argparse.Namespace) -> None:
    import torch

    from edgetl.ui import console

    torch.set_num_threads(args.threads)
    results = load_results(args.results)
    extractor = baselines.FeatureExtractor()
    plan = []
    for folder in args.folders:
        sizes = [ALL] if folder == BUILTIN else [ALL if s == "all" else int(s) for s in args.sizes]
        for per_class in sizes:
            for seed in args.seeds:
                for column in args.columns:
                    if column == "scratch" and args.scratch_max_per_class and per_class > args.scratch_max_per_class:
                        continue
                    cond = conditions(column, args)
                    plan.append((folder, per_class, seed, column, cond, run_key(folder, per_class, seed, column, cond)))
    current = {folder: folder_content(folder, args) for folder in args.folders}
    todo = [p for p in plan
            if results["runs"].get(p[5], {}).get("subset", {}).get("folder_content") != current[p[0]]]
    stale = sum(1 for p in todo if p[5] in results["runs"])
    console.print(f"{len(plan)} runs planned, {len(plan) - len(todo)} already in {args.results}, {len(todo)} to do"
                  + (f" ({stale} measured on an earlier build of their folder)" if stale else ""))
    for number, (folder, per_class, seed, column, cond, key) in enumerate(todo, 1):
        data, subset, info = prepare(folder, per_class, seed, args)
        console.print(f"[{number}/{len(todo)}] {key}")
        try:
            figures = run_one(column, data, subset, seed, cond, key, args, extractor)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            console.print(f"  failed: {error}")
            continue
        entry = {"folder": folder, "per_class_requested": "all" if per_class >= ALL else per_class, "seed": seed,
                 "column": column, "conditions": cond, "subset": info, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                 **figures}
        results["runs"][key] = entry
        save_results(results, args.results)
        low, high = entry["ci95"]
        console.print(f"  test top-1 {100 * entry['top1']:.1f}% ({100 * low:.1f}–{100 * high:.1f}, "
                      f"{entry['test_images']} images), {entry['seconds']['total']:.0f} s")


# ---------------------------------------------------------------- reading the results


def _per_class(entry: dict) -> float:
    """Training images per class actually used: the mean over classes (what the x axis shows)."""
    counts = entry.get("train_per_class") or entry.get("subset", {}).get("train_per_class")
    return float(np.mean(list(counts.values()))) if counts else float("nan")


def _grouped(results: dict) -> dict:
    """{folder: {column: {requested size: [entries over seeds]}}}."""
    grouped: dict = {}
    for entry in results["runs"].values():
        by_size = grouped.setdefault(entry["folder"], {}).setdefault(entry["column"], {})
        by_size.setdefault(str(entry["per_class_requested"]), []).append(entry)
    return grouped


def _size_order(size: str) -> float:
    return float("inf") if size == "all" else float(size)


def markdown_table(results: dict) -> str:
    """One row per folder × size: each column's test top-1 [Wilson 95%] (test images), seconds; seeds pooled."""
    grouped = _grouped(results)
    columns = [c for c in COLUMNS if any(c in by_column for by_column in grouped.values())]
    head = "| folder | images per class | " + " | ".join(LABELS[c] for c in columns) + " |"
    rows = [head, "|---|---|" + "---|" * len(columns)]
    for folder in sorted(grouped):
        sizes = sorted({s for by_size in grouped[folder].values() for s in by_size}, key=_size_order)
        for size in sizes:
            cells = []
            used = []
            for column in columns:
                entries = grouped[folder].get(column, {}).get(size, [])
                if not entries:
                    cells.append("—")
                    continue
                correct = sum(e["correct"] for e in entries)
                total = sum(e["test_images"] for e in entries)
                low, high = baselines.wilson(correct, total)
                seconds = np.mean([e["seconds"]["total"] for e in entries])
                seeds = f", {len(entries)} seeds" if len(entries) > 1 else ""
                cells.append(f"{100 * correct / total:.1f}% [{100 * low:.1f}–{100 * high:.1f}] "
                             f"(n={total}{seeds}; {seconds:.0f} s)")
                if column not in ("edgetl", "edgetl-fe"):
                    used.append(_per_class(entries[0]))
            shown = size
            if used and (size == "all" or abs(used[0] - float(size)) > 0.5):
                shown = f"{size} (mean {used[0]:.0f} used)"
            rows.append(f"| {folder} | {shown} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _chance(by_column: dict) -> float | None:
    """100 / number of classes, from any entry that lists its test classes."""
    for by_size in by_column.values():
        for entries in by_size.values():
            counts = entries[0].get("test_per_class") or entries[0].get("subset", {}).get("test_per_class")
            if counts:
                return 100 / len(counts)
    return None


def plot(results: dict, out: Path) -> None:
    """One panel per folder: test top-1 against training images per class (log axis), a line per column,
    Wilson 95% intervals as error bars (seeds pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    grouped = _grouped(results)
    names = sorted(grouped)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    figure, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    markers = dict(zip(COLUMNS, "osD^v", strict=True))
    colours = dict(zip(COLUMNS, ("C0", "C1", "C2", "C3", "C4"), strict=True))  # one colour per column in every panel
    for ax, folder in zip(axes.flat, names, strict=False):
        for column in COLUMNS:
            by_size = grouped[folder].get(column)
            if not by_size:
                continue
            points = []
            for size, entries in by_size.items():
                correct = sum(e["correct"] for e in entries)
                total = sum(e["test_images"] for e in entries)
                low, high = baselines.wilson(correct, total)
                x = np.mean([_per_class(e) for e in entries]) if not np.isnan(_per_class(entries[0])) else \
                    _size_order(size)
                points.append((x, correct / total, low, high))
            points.sort()
            x, y, low, high = (np.array(v) for v in zip(*points, strict=True))
            ax.errorbar(x, 100 * y, yerr=[100 * (y - low), 100 * (high - y)], marker=markers[column], capsize=3,
                        color=colours[column], label=LABELS[column])
        chance = _chance(grouped[folder])
        if chance:
            ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([2, 5, 10, 25, 50, 100, 300, 1000]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(folder)
        ax.set_xlabel("training images per class (mean over classes)")
        ax.set_ylabel("test top-1 (%)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    legend: dict = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    order = [LABELS[c] for c in COLUMNS if LABELS[c] in legend] + [k for k in legend if k not in LABELS.values()]
    handles, labels = [legend[k] for k in order], order
    figure.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), frameon=False)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run what is not in the results yet")
    run.add_argument("--folders", nargs="+", default=[n for n in folders.FOLDERS if n != "cards-4"],
                     choices=[*folders.FOLDERS, BUILTIN], metavar="NAME")
    run.add_argument("--sizes", nargs="+", default=[str(s) for s in folders.SIZES], help="images per class, or all")
    run.add_argument("--seeds", nargs="+", type=int, default=[0])
    run.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=COLUMNS)
    run.add_argument("--edgetl-flags", default="", help='extra flags for edgetl finetune, e.g. "--image-size 128"')
    run.add_argument("--image-size", type=int, default=128, help="frozen-head and scratch input size")
    run.add_argument("--pixel-size", type=int, default=32, help="lr-pixels resize")
    run.add_argument("--scratch-steps", type=int, default=150)
    run.add_argument("--scratch-max-per-class", type=int, default=0, help="run scratch only up to this size (0: all)")
    run.add_argument("--threads", type=int, default=1, help="torch threads here and OMP_NUM_THREADS for edgetl")
    run.add_argument("--timeout", type=float, default=None, help="seconds an edgetl run may take")
    run.add_argument("--work", type=Path, default=folders.default_cache().parent / "learning-curve",
                     help="subsets and edgetl run folders (default: %(default)s)")
    run.add_argument("--cache", type=Path, default=folders.default_cache(), help="benchmark folders")
    run.add_argument("--source-root", type=Path, help="where the Debian packages are already unpacked")
    for p in (run, *(sub.add_parser(name, help=text) for name, text in
                     (("table", "print the Markdown table"), ("plot", "draw the learning curves")))):
        p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    sub.choices["plot"].add_argument("--out", type=Path, default=Path("benchmarks/results/learning-curve.png"))
    args = parser.parse_args()
    if args.command == "run":
        command_run(args)
    elif args.command == "table":
        print(markdown_table(load_results(args.results)))
    else:
        plot(load_results(args.results), args.out)


if __name__ == "__main__":
    main()
