"""`edgetl demo`: the whole pipeline, offline, on the built-in Fashion-MNIST subset.

So far: fine-tuning, then export of both formats in fp32 and int8 with the verification table
(benchmark and bundling join as their issues land).
"""

from __future__ import annotations

import json
from pathlib import Path

from edgetl.config import FinetuneConfig
from edgetl.export import ExportConfig, run_export
from edgetl.finetune import run_finetune
from edgetl.ui import stdout

DEMO_CONFIG = FinetuneConfig(
    data="builtin:fashion-mnist-mini",
    backbone="efficientnet_lite0",
    image_size=128,
    weights="imagenet",
    epochs_head=30,
    epochs_finetune=4,
    unfreeze=3,
)
FAST_CONFIG = FinetuneConfig(
    data="builtin:fashion-mnist-mini",
    backbone="efficientnet_lite0",
    image_size=64,
    weights="imagenet",
    epochs_head=8,
    epochs_finetune=1,
    unfreeze=1,
)


# The fast run calibrates on fewer images: it is a smoke run, and PTQ time grows with the image count.
FAST_EXPORT = ExportConfig(calib=64)


def run_demo(run_dir: Path, fast: bool = False) -> dict:
    """Fine-tune the demo model into RUN/checkpoint, then export and verify it into RUN/export."""
    checkpoint = run_finetune(FAST_CONFIG if fast else DEMO_CONFIG, run_dir)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    top1 = manifest["metrics"]["test"]["top1"]
    stdout.print(f"demo: test top-1 {100 * top1:.1f}% on {manifest['metrics']['test']['images']} held-out images")
    export_dir = run_export(checkpoint, FAST_EXPORT if fast else ExportConfig(), Path(run_dir) / "export")
    manifest["export"] = json.loads((export_dir / "manifest.json").read_text())
    return manifest
