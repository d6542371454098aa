"""Measure the fine-tuning figures of docs/BENCHMARKS.md on builtin:fashion-mnist-mini (not a timed test).

    .venv/bin/python benchmarks/finetune_figures.py [--out benchmarks/results/finetune.json]

1. Transfer vs from scratch: the demo recipe from ImageNet weights and from `--weights none`.
2. Stage-1 throughput with the feature cache vs computing the backbone every epoch (same epochs).
Prints a Markdown table for docs/BENCHMARKS.md and stores every manifest figure in a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from edgetl.demo import DEMO_CONFIG
from edgetl.finetune import run_finetune


def run(config, feature_cache: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        checkpoint = run_finetune(config, Path(folder), feature_cache=feature_cache)
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        manifest["wall_seconds"] = round(time.perf_counter() - start, 1)
        return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune.json"))
    parser.add_argument("--cache-epochs", type=int, default=5, help="stage-1 epochs for the cache comparison")
    args = parser.parse_args()
    results: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}}

    results["pretrained"] = run(DEMO_CONFIG)
    results["scratch"] = run(replace(DEMO_CONFIG, weights="none"))
    stage1 = replace(DEMO_CONFIG, epochs_head=args.cache_epochs, epochs_finetune=0, patience=args.cache_epochs)
    results["stage1_cached"] = run(stage1, feature_cache=True)
    results["stage1_uncached"] = run(stage1, feature_cache=False)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    def top1(key: str, split: str = "test") -> str:
        return f"{100 * results[key]['metrics'][split]['top1']:.1f}%"

    print("| run | test top-1 | val top-1 | train wall time |")
    print("|---|---|---|---|")
    runs = (("pretrained", "efficientnet_lite0, ImageNet weights"), ("scratch", "same recipe, --weights none"))
    for key, name in runs:
        print(f"| {name} | {top1(key)} | {top1(key, 'val')} | {results[key]['training']['seconds']:.0f} s |")
    print()
    print("| stage 1 | epochs | images/s (train images × epochs / stage-1 seconds) | stage-1 seconds |")
    print("|---|---|---|---|")
    for key, name in (("stage1_cached", "feature cache"), ("stage1_uncached", "backbone every epoch")):
        figures = results[key]["training"]["throughput"]["stage1"]
        print(f"| {name} | {figures['epochs']} | {figures['images_per_s']} | {figures['seconds']} |")


if __name__ == "__main__":
    main()
