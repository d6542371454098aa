"""The ExecuTorch runtime (its Python bindings need torch, so it lives in the torch backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def run_pte(path: Path, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Run a .pte's `forward` on each image of `x` (batch 1, as exported); returns stacked outputs."""
    from executorch.runtime import Runtime

    if threads:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)
    program = Runtime.get().load_program(Path(path))
    method = program.load_method("forward")
    outputs = []
    for index in range(len(x)):
        result = method.execute([torch.from_numpy(np.ascontiguousarray(x[index : index + 1]))])
        outputs.append(result[0].detach().numpy().reshape(-1))
    return np.stack(outputs)
