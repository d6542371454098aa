"""Host latency of two .pte files of one input shape, interleaved in one process: the ratio is the speed figure.

    python benchmarks/pte_latency_ab.py BEFORE.pte NOW.pte --rounds 12

Each round runs both files (the order alternates between rounds), 5 warm-up invokes then 40 timed ones, on one
thread, and keeps each file's median; the ratio NOW/BEFORE is taken per round, so load that drifts over the run
hits both files alike. Prints one JSON line: the medians, the median ratio and its range over the rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import torch
    from executorch.extension.pybindings import portable_lib

    from edgetl.formats.pte import _program, describe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("now", type=Path)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--invokes", type=int, default=40)
    args = parser.parse_args()

    portable_lib._unsafe_reset_threadpool(1)
    files = {"before": args.before, "now": args.now}
    programs = {name: _program(path) for name, path in files.items()}  # a method needs its program alive
    methods = {name: program.load_method("forward") for name, program in programs.items()}
    shape = describe(args.before)["inputs"][0]["shape"]
    image = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
    medians: dict[str, list[float]] = {name: [] for name in files}
    for round_number in range(args.rounds):
        for name in (list(files) if round_number % 2 == 0 else list(files)[::-1]):
            method = methods[name]
            for _ in range(5):
                method.execute([image])
            seconds = []
            for _ in range(args.invokes):
                started = time.perf_counter()
                method.execute([image])
                seconds.append(time.perf_counter() - started)
            medians[name].append(1e3 * statistics.median(seconds))
    ratios = [now / before for now, before in zip(medians["now"], medians["before"], strict=True)]
    print(json.dumps({"files": {name: str(path) for name, path in files.items()}, "rounds": args.rounds,
                      "threads": 1, "median_ms": {name: round(statistics.median(v), 3) for name, v in medians.items()},
                      "ratio_now_over_before": round(statistics.median(ratios), 3),
                      "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)]}))


if __name__ == "__main__":
    main()
