"""Measure the export figures of docs/HISTORY.md ("Figures: the demo model") on one checkpoint (efficientnet_lite0).

Two parts:
  1. int8 recipe study on the quantized torch graph (the graph both runtimes receive; they agree with it
     to within a fraction of a point): plain XNNPACKQuantizer PTQ vs. ReLU6 observed after the clamp vs.
     that plus bias correction, and top-1 / agreement against the number of calibration images — which is
     how `--calib`'s default was chosen.
  2. (--full) a real `edgetl export` of both formats and precisions: sizes, top-1 in LiteRT and
     ExecuTorch, agreement, export wall time per artifact.

    .venv/bin/python benchmarks/export_figures.py runs/demo/checkpoint --full --out benchmarks/export_figures.json

Writes one JSON with the machine's conditions (cores, load average) beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def machine() -> dict:
    """What the timings depend on: CPU model, cores, and how busy the machine was."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "load_average": [round(v, 2) for v in os.getloadavg()],
            "python": platform.python_version()}


def study(checkpoint: Path, sizes: list[int], ablation_calib: int, seed: int) -> dict:
    """Top-1 and agreement of the int8 torch graph for each recipe variant and calibration size."""
    import torch

    from edgetl.backends.torch.export import ChannelsLastInput, load_model, logits
    from edgetl.backends.torch.quantize import bias_correct, fold_batchnorm, quantize_ptq
    from edgetl.export import _load_split, load_listing
    from edgetl.manifest import read_checkpoint

    manifest = read_checkpoint(checkpoint)
    listing = load_listing(checkpoint, manifest)
    spec = manifest.preprocess.with_layout("NHWC")
    x_test, y_test, _ = _load_split(listing, listing.splits["test"], spec, "test images")
    train = listing.splits["train"]
    order = np.random.default_rng(seed).permutation(len(train))[: max(sizes + [ablation_calib])]
    x_calib, _, _ = _load_split(listing, [train[i] for i in order], spec, "calibration images")

    model = ChannelsLastInput(load_model(checkpoint, manifest)).eval()
    size = manifest.model.image_size
    example = torch.zeros(1, size, size, 3)
    reference = logits(model, x_test)
    predicted = reference.argmax(1)
    float_top1 = float((predicted == y_test).mean())

    def measure(name: str, n: int, fuse_clamp: bool, correct: bool) -> dict:
        started = time.perf_counter()
        calib = torch.from_numpy(x_calib[:n])
        prepared = fold_batchnorm(model, example)
        if correct:
            prepared = bias_correct(prepared, calib)
        graph = quantize_ptq(prepared, example, torch.split(calib, 64), fuse_clamp=fuse_clamp)
        seconds = time.perf_counter() - started
        out = logits(graph, x_test).argmax(1)
        row = {"variant": name, "calibration_images": n, "top1": float((out == y_test).mean()),
               "agreement": float((out == predicted).mean()), "ptq_seconds": round(seconds, 1)}
        row["drop_points"] = round(100 * (float_top1 - row["top1"]), 2)
        print(json.dumps(row), flush=True)
        return row

    ablation = [
        measure("plain XNNPACKQuantizer", ablation_calib, fuse_clamp=False, correct=False),
        measure("ReLU6 observed after the clamp", ablation_calib, fuse_clamp=True, correct=False),
        measure("clamp + bias correction (default)", ablation_calib, fuse_clamp=True, correct=True),
    ]
    sweep = [measure("clamp + bias correction", n, fuse_clamp=True, correct=True) for n in sizes]
    return {"float_top1": float_top1, "test_images": int(len(y_test)), "ablation": ablation, "calibration": sweep}


def full_export(checkpoint: Path, out: Path) -> dict:
    """A real export of everything, timed per artifact, read back from its manifests."""
    from edgetl.config import ExportConfig
    from edgetl.export import run_export

    started = time.perf_counter()
    folder = run_export(checkpoint, ExportConfig.of(), out)
    manifest = json.loads((folder / "manifest.json").read_text())
    record = manifest["verification"]
    rows = {row["file"]: row for row in record["rows"]}
    artifacts = []
    for artifact in manifest["artifacts"]:
        row = rows.get(artifact["file"], {})
        artifacts.append({
            "file": artifact["file"], "bytes": artifact.get("bytes"), "export_seconds": artifact.get("export_seconds"),
            "top1": row.get("top1"), "drop_points": row.get("drop_points"), "agreement": row.get("agreement"),
            "max_prob_diff": row.get("max_prob_diff"),
        })
    return {"float_top1": record["float_top1"], "ptq_seconds": manifest["quantization"]["seconds"],
            "total_seconds": round(time.perf_counter() - started, 1), "artifacts": artifacts,
            "cross_format_agreement": record["cross_format_agreement"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--sizes", default="32,64,128,256,512,1000", help="calibration sizes to sweep")
    parser.add_argument("--ablation-calib", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="also run a real export of everything")
    parser.add_argument("--skip-study", action="store_true")
    parser.add_argument("--export-out", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/export_figures.json"))
    args = parser.parse_args()
    result: dict = {"checkpoint": str(args.checkpoint), "machine_before": machine()}
    if not args.skip_study:
        result["study"] = study(args.checkpoint, [int(s) for s in args.sizes.split(",")], args.ablation_calib,
                                args.seed)
    if args.full:
        result["export"] = full_export(args.checkpoint, args.export_out or args.checkpoint.parent / "export")
    result["machine_after"] = machine()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
