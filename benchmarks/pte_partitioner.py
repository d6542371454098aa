"""The same int8 graph lowered to .pte by ExecuTorch's stock XNNPACK partitioner and by edgetl's
(`export.xnnpack_partitioner`: an int8 add may end in a clamp, and hardswish runs in int8), beside the float .pte of
the same network. Both lower the graph edgetl gives the .pte (each hardswish as one int8 operator,
`hardswish.native_hardswish`), so the stock partitioner's file shows what it leaves in float of that graph.

    python benchmarks/pte_partitioner.py --backbone mobilenet_v3_large --out DIR
    edgetl bench DIR/FILE.pte --target arm64-a76 --arm-iters 2 --arm-samples 2 --allow-modified   # each file

Prints one JSON line per file: what XNNPACK runs inside its partitions (node counts, float compute, conversions),
read back from the partitions' own serialized graphs. A seeded network (10 classes) and seeded random calibration
images: the instruction counts depend on the graph, not on trained weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    from edgetl.backends.torch import export
    from edgetl.backends.torch.models import build_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="mobilenet_v3_large")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("pte-partitioner"))
    args = parser.parse_args()

    torch.manual_seed(0)
    net = export.ChannelsLastInput(build_model(args.backbone, 1.0, num_classes=10).eval()).eval()
    example = torch.zeros(1, args.size, args.size, 3)
    calibration = np.random.default_rng(0).standard_normal((32, args.size, args.size, 3)).astype(np.float32)
    graph, _ = export.quantize_ptq_graph(net, example, calibration, bias_correction=False)
    args.out.mkdir(parents=True, exist_ok=True)
    stock = export.xnnpack_partitioner
    cases = {"int8-edgetl": (graph, stock), "int8-stock": (graph, XnnpackPartitioner), "fp32": (net, stock)}
    for case, (module, partitioner) in cases.items():
        export.xnnpack_partitioner = partitioner
        try:
            payload, delegation = export.lower_pte(module, example)
        finally:
            export.xnnpack_partitioner = stock
        path = args.out / f"{args.backbone}-{args.size}-{case}.pte"
        path.write_bytes(payload)
        print(json.dumps({"file": str(path), "subgraphs": delegation["subgraphs"],
                          "xnnpack_conversions": delegation["xnnpack_conversions"],
                          "xnnpack_float_compute": delegation["xnnpack_float_compute"],
                          "xnnpack_nodes": delegation["xnnpack_nodes"]}))


if __name__ == "__main__":
    main()
