"""Scale-out figures of docs/BENCHMARKS.md: peak memory of `edgetl finetune` on 2,000 vs 20,000 images, images/s
with 1/2/4 loader workers, and 1 vs 2 gloo processes on CPU (agreement of the weights, not speed).

Synthetic folders of 32 px PNGs (10 classes) are generated under --tmp. Each run is the real CLI in a
subprocess; its memory is sampled from /proc every 0.1 s over the whole process tree (loader workers and
torchrun workers included). Results: benchmarks/results/scaleout.json.

    .venv/bin/python benchmarks/scaleout_figures.py [--tmp /tmp/edgetl-scaleout] [--threads 1]
        [--parts memory,workers,processes]

--threads sets OMP_NUM_THREADS for every run (torchrun's workers get 1 each anyway): on a machine shared with
other jobs, torch's default of one intra-op thread per core oversubscribes the cores and measured 7x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
RECIPE = ["--backbone", "mobilenet_v2", "--width", "0.35", "--image-size", "32", "--weights", "none",
          "--epochs-finetune", "1", "--unfreeze", "1", "--batch-size", "64", "--seed", "0"]


def make_folder(root: Path, count: int, classes: int = 10, size: int = 32) -> Path:
    """`count` PNGs of `size` px, each class a different mean colour plus noise (same size for every folder)."""
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for index in range(count):
        label = index % classes
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([25 * label, 255 - 25 * label, 128], np.float32)
        pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.png")
    (root / "done").write_text(str(count))
    return root


def _tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        pids += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return pids


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


THREADS: dict[str, str] = {}


def run_cli(args: list[str]) -> dict:
    """Run `edgetl finetune ARGS`; wall time, exit code, peak RSS of the main process and of the tree."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "edgetl.cli", "finetune", *args], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **THREADS})
    peak_main = peak_tree = 0.0
    while process.poll() is None:
        peak_main = max(peak_main, _rss_mb(process.pid))
        peak_tree = max(peak_tree, sum(_rss_mb(p) for p in _tree(process.pid)))
        time.sleep(0.1)
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"edgetl finetune {' '.join(args)} failed:\n{stderr[-3000:]}")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_main_mb": round(peak_main, 1),
            "peak_rss_tree_mb": round(peak_tree, 1)}


def throughput(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "checkpoint" / "manifest.json").read_text())
    figures = manifest["training"]["throughput"]
    return {"stage1_feature_images_per_s": figures["stage1"]["feature_images_per_s"],
            "stage2_images_per_s": figures["stage2"]["images_per_s"],
            "train_images": sum(manifest["data"]["counts"]["train"].values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tmp", type=Path, default=Path("/tmp/edgetl-scaleout"))
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for every run")
    parser.add_argument("--parts", default="memory,workers,processes")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if args.threads:
        THREADS["OMP_NUM_THREADS"] = str(args.threads)
    target = REPO / "benchmarks" / "results" / "scaleout.json"
    previous = json.loads(target.read_text()) if target.exists() else {}
    key = f"threads_{args.threads}" if args.threads else "threads_default"
    results: dict = previous.get(key, {})
    results.update({"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                "load_average_at_start": os.getloadavg()}, "recipe": RECIPE,
                    "omp_num_threads": args.threads})
    for count in (2000, 20000):
        make_folder(args.tmp / f"data{count}", count)

    memory = {}
    for count in (2000, 20000) if "memory" in parts else ():
        data = make_folder(args.tmp / f"data{count}", count)
        out = args.tmp / f"mem{count}"
        memory[count] = {**run_cli(["--data", str(data), "--out", str(out), "--device", "cpu", *RECIPE]),
                         **throughput(out)}
        print(count, memory[count], flush=True)
    if memory:
        results["memory"] = memory

    small = args.tmp / "data2000"
    workers = {}
    for count in (0, 1, 2, 4) if "workers" in parts else ():
        out = args.tmp / f"workers{count}"
        workers[count] = {**run_cli(["--data", str(small), "--out", str(out), "--device", "cpu", "--workers",
                                     str(count), *RECIPE]), **throughput(out)}
        print("workers", count, workers[count], flush=True)
    if workers:
        results["workers"] = workers
    if "processes" in parts:
        results["processes"] = compare_processes(args.tmp, small)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    target.write_text(json.dumps({**previous, key: results}, indent=2) + "\n")
    print(f"wrote {target}")


def compare_processes(tmp: Path, small: Path) -> dict:
    """1 vs 2 gloo processes on the same data, seed and global batch: weights and per-epoch figures."""
    import torch

    args = argparse.Namespace(tmp=tmp)
    processes: dict = {}
    for count in (1, 2):
        out = args.tmp / f"procs{count}"
        processes[count] = {**run_cli(["--data", str(small), "--out", str(out), "--device", "cpu", "--devices",
                                       str(count), *RECIPE]), **throughput(out)}
    one = torch.load(args.tmp / "procs1" / "checkpoint" / "model.pt")
    two = torch.load(args.tmp / "procs2" / "checkpoint" / "model.pt")
    histories = [json.loads((args.tmp / f"procs{c}" / "checkpoint" / "history.json").read_text()) for c in (1, 2)]
    processes["max_abs_weight_difference"] = max(float((one[k].float() - two[k].float()).abs().max()) for k in one)
    processes["val_top1"] = [[h["val_top1"] for h in history] for history in histories]
    processes["train_loss"] = [[h["train_loss"] for h in history] for history in histories]
    print("processes", processes, flush=True)
    return processes


if __name__ == "__main__":
    main()
