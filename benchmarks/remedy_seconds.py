"""What each label-free int8 remedy costs on one checkpoint, whether or not the policy would call it: PTQ (both
activation observers), then equalization, per-tensor ranges and learned rounding, each timed on its own and with
its calibration logit error against the float model (the criterion the remedies choose by; no label is read).

    python benchmarks/remedy_seconds.py RUN/checkpoint [--calib 256] [--rounding-layers 8] [--out remedies.json]

`edgetl export --int8 auto` calls a remedy only for a file over --max-drop, and its step seconds include converting
and verifying the files again; this script times the remedies' own work, the part that grows with the input size.
Converting a remedied graph costs what the first conversion cost.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgetl import backends
from edgetl.config import ExportConfig
from edgetl.export import load_inputs, load_listing
from edgetl.manifest import read_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--calib", type=int, default=256)
    parser.add_argument("--rounding-layers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    manifest = read_checkpoint(args.checkpoint)
    config = ExportConfig.of(quant=("int8",), calib=args.calib, rounding_layers=args.rounding_layers).validate()
    listing = load_listing(args.checkpoint, manifest)
    inputs = load_inputs(listing, manifest, config, True)
    backend = backends.load(manifest.framework)
    graphs = backend.load_float(args.checkpoint, manifest, listing, config)
    images = inputs.calibration[:64]
    reference = backend.logits(graphs.float_model, images)

    def error() -> float:
        return float(np.mean((backend.logits(graphs.int8, images) - reference) ** 2))

    rows = []
    started = time.perf_counter()
    backend.quantize(graphs, args.checkpoint, manifest, listing, inputs.calibration, config)
    rows.append({"step": "ptq (both observers)", "seconds": round(time.perf_counter() - started, 1),
                 "logit_error": round(error(), 6), "chosen": graphs.quantization["activation_choice"]["chosen"]})
    started = time.perf_counter()  # every int8 export makes the sensitivity table; learned rounding reads it
    graphs.sensitivity = backend.sensitivity(graphs, inputs.calibration, config)
    rows.append({"step": "sensitivity table", "seconds": round(time.perf_counter() - started, 1)})
    for remedy in ("equalize", "ranges", "adaround"):
        started = time.perf_counter()
        backend.remedy(remedy, graphs, args.checkpoint, manifest, listing, inputs.calibration, config)
        row = {"step": remedy, "seconds": round(time.perf_counter() - started, 1), "logit_error": round(error(), 6)}
        if remedy == "equalize":
            row["kept_for_later"] = graphs.quantization["equalization_choice"]["kept"]
        if remedy == "ranges":
            choice = graphs.quantization["activation_choice"]
            row.update({"tensors": choice["tensors"], "tried": choice["tried"], "changed": choice["changed"]})
        rows.append(row)
    record = {"checkpoint": str(args.checkpoint), "model": manifest.model.to_json(),
              "calibration_images": int(len(inputs.calibration)), "torch_threads": torch.get_num_threads(),
              "machine": f"{platform.machine()}, python {platform.python_version()}",
              "command": " ".join(sys.argv), "rows": rows}
    print(json.dumps(record, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
