"""Learned rounding of one layer at full size (256 images, batches of 32) against sized in pixels
(`adaround.sized_for`), alternated twice on one thread so that both see the same machine.

    python benchmarks/rounding_sized_ab.py RUN/checkpoint LAYER_INDEX OUT.json
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgetl import backends
from edgetl.backends.torch import adaround
from edgetl.backends.torch.export import fold_batchnorm, to_int8_form
from edgetl.backends.torch.sensitivity import quantized_layers
from edgetl.config import ExportConfig
from edgetl.export import load_inputs, load_listing
from edgetl.manifest import read_checkpoint


def main() -> None:
    torch.set_num_threads(1)
    checkpoint, layer_index, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    manifest = read_checkpoint(checkpoint)
    config = ExportConfig.of(quant=("int8",), calib=256).validate()
    listing = load_listing(checkpoint, manifest)
    inputs = load_inputs(listing, manifest, config, True)
    graphs = backends.load(manifest.framework).load_float(checkpoint, manifest, listing, config)
    base = to_int8_form(fold_batchnorm(graphs.float_model, graphs.example))
    calibration = torch.from_numpy(np.ascontiguousarray(inputs.calibration))
    name = [layer for layer, _ in quantized_layers(base)][layer_index]
    sized = adaround.sized_for
    rows = []
    for attempt in range(2):
        for mode in ("full", "sized"):
            adaround.sized_for = sized if mode == "sized" else (lambda _c, images=256, batch=32: (images, batch))
            started = time.perf_counter()
            _, info = adaround.adaround(copy.deepcopy(base), calibration, [name])
            layer = info["layers"][0]
            rows.append({"round": attempt, "mode": mode, "seconds": round(time.perf_counter() - started, 1),
                         "error_nearest": layer["error_nearest"], "error_learned": layer["error_learned"]})
            print(json.dumps(rows[-1]), flush=True)
    adaround.sized_for = sized
    out.write_text(json.dumps({"checkpoint": str(checkpoint), "layer": name, "threads": 1, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
