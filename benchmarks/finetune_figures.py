"""Fine-tuning figures on builtin:fashion-mnist-mini (not a timed test).

    .venv/bin/python benchmarks/finetune_figures.py [--out benchmarks/results/finetune.json]

The demo's recipe (edgetl's defaults) from ImageNet weights, the stage-1 probe alone (`--epochs-finetune 0`)
and the same recipe from `--weights none`. Prints a Markdown table (test top-1 with its 95% interval, the
rule that chose the kept weights, stage timings) and stores every manifest figure in a JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from edgetl.demo import DEMO_CONFIG
from edgetl.finetune import run_finetune


def run(config) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        checkpoint = run_finetune(config, Path(folder))
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        manifest["wall_seconds"] = round(time.perf_counter() - start, 1)
        return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune.json"))
    args = parser.parse_args()
    results: dict = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}}

    results["pretrained"] = run(DEMO_CONFIG)
    results["probe"] = run(DEMO_CONFIG.with_(epochs_finetune=0))
    results["scratch"] = run(DEMO_CONFIG.with_(weights="none"))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print("| run | test top-1 (95% interval) | val top-1 | kept | stage 1 s | stage 2 s | wall s |")
    print("|---|---|---|---|---|---|---|")
    runs = (("pretrained", "defaults, ImageNet weights"), ("probe", "stage 1 alone (--epochs-finetune 0)"),
            ("scratch", "defaults, --weights none"))
    for key, name in runs:
        manifest = results[key]
        test, val = manifest["metrics"]["test"], manifest["metrics"]["val"]
        low, high = test["top1_ci95"]
        best = manifest["training"]["best"]
        throughput = manifest["training"]["throughput"]
        stage2 = throughput.get("stage2", {}).get("seconds", 0)
        print(f"| {name} | {100 * test['top1']:.1f}% ({100 * low:.1f}–{100 * high:.1f}) | {100 * val['top1']:.1f}% | "
              f"stage {best['stage']} epoch {best['epoch']} ({best['rule']}) | {throughput['stage1']['seconds']:.0f} | "
              f"{stage2:.0f} | {manifest['wall_seconds']:.0f} |")


if __name__ == "__main__":
    main()
