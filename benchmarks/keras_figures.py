"""Measure the Keras figures of docs/BENCHMARKS.md on builtin:fashion-mnist-mini with mobilenet_v2 (not a timed test).

    .venv/bin/python benchmarks/keras_figures.py [--out benchmarks/results/keras.json] [--work DIR]

No MobileNet ImageNet weights can be had offline here, so the backbone does NOT start from ImageNet:
step 1 trains mobilenet_v2 from random initialisation (`--weights none` equivalent, BatchNorm trainable)
on the training split only and saves its no-top weights; step 2 runs edgetl's usual keras recipe from that
file (`--weights PATH`). Then three exports of the same checkpoint:
  A. TFLite fp32, fp16, dynamic-range, full int8 (post-training quantization)
  B. full int8 with tfmot QAT
  C. 50% magnitude pruning (PolynomialDecay) + prune-preserving QAT, int8 (and the pruned fp32)
Prints a Markdown table for docs/BENCHMARKS.md and stores every figure in a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from edgetl.config import ExportConfig, FinetuneConfig
from edgetl.finetune import run_finetune

BACKBONE, WIDTH, SIZE = "mobilenet_v2", 1.0, 32


def export(checkpoint: Path, out: Path, config: ExportConfig) -> dict:
    from edgetl.export import run_export

    started = time.perf_counter()
    run_export(checkpoint, config, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["wall_seconds"] = round(time.perf_counter() - started, 1)
    return manifest


def make_checkpoint(args: argparse.Namespace, results: dict) -> Path:
    """Steps 1-2: backbone trained from scratch on the training split, then edgetl's keras recipe."""
    from edgetl import backends
    from edgetl.finetune import load_listing

    config = FinetuneConfig.of(data="builtin:fashion-mnist-mini", framework="keras", backbone=BACKBONE, width=WIDTH,
                            image_size=SIZE, weights="none", epochs_finetune=4, unfreeze=3)
    weights = args.work / "scratch_backbone.weights.h5"
    results["pretrain"] = backends.load("keras").train_backbone_from_scratch(config, load_listing(config),
                                                                             args.pretrain_epochs, weights)
    config = config.with_(weights=str(weights))
    started = time.perf_counter()
    checkpoint = run_finetune(config, args.work)
    results["finetune_seconds"] = round(time.perf_counter() - started, 1)
    return checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/keras.json"))
    parser.add_argument("--work", type=Path, default=Path("runs/keras-figures"))
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--checkpoint", type=Path, help="reuse a checkpoint made by this script (skips steps 1-2)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                 "load_average_at_start": os.getloadavg()}}
    checkpoint = args.checkpoint or make_checkpoint(args, results)
    results["checkpoint"] = json.loads((checkpoint / "manifest.json").read_text())["metrics"]["test"]
    common = {"formats": ("tflite",), "calib": 256, "max_drop": 100.0}
    runs = {
        "A_ptq": ExportConfig.of(quant=("fp32", "fp16", "dynamic", "int8"), **common),
        "B_qat": ExportConfig.of(quant=("int8",), qat=True, **common),
        "C_prune50_pqat": ExportConfig.of(quant=("fp32", "int8"), prune=0.5, qat=True, **common),
    }
    for key, options in runs.items():
        results[key] = export(checkpoint, args.work / f"export-{key}", options)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"checkpoint test top-1 (Keras float): {100 * results['checkpoint']['top1']:.1f}%")
    print("| variant | file | top-1 (LiteRT) | Δ vs float (pts) | size | gzip size | conversion |")
    print("|---|---|---|---|---|---|---|")
    for key in runs:
        manifest = results[key]
        rows = {row["file"]: row for row in manifest["verification"]["rows"]}
        for artifact in manifest["artifacts"]:
            if artifact["status"] != "ok":
                print(f"| {key} | {artifact['file']} | failed | | | | |")
                continue
            row = rows[artifact["file"]]
            print(f"| {key} | {artifact['file']} | {100 * row['top1']:.1f}% | "
                  f"{100 * (row['top1'] - results['checkpoint']['top1']):+.1f} | {artifact['bytes'] / 1e6:.2f} MB | "
                  f"{artifact['gzip_bytes'] / 1e6:.2f} MB | {artifact['export_seconds']:.0f} s |")


if __name__ == "__main__":
    main()
