#!/usr/bin/env python3
"""golden_check: the bundle's golden-image self-test, on whatever machine this runs on (a phone in Termux,
a board, a host). Standalone: standard library, numpy and one runtime (ai-edge-litert for .tflite, the
ExecuTorch runtime for .pte). It feeds golden.npz (already preprocessed on the host, float32 NHWC; quantized
here for int8/uint8 inputs) and compares each top-1 and probability with expected.json.
Exit status: 0 all match, 1 a mismatch, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def run_tflite(model: Path, x: np.ndarray, threads: int) -> np.ndarray:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter  # older boards
    interpreter = Interpreter(model_path=str(model), num_threads=threads)
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for image in x:
        batch = image[None]
        dtype = np.dtype(source["dtype"])
        if dtype.kind in "iu":
            scale, zero = source["quantization"]
            info = np.iinfo(dtype)
            batch = np.clip(np.round(batch / scale) + zero, info.min, info.max)
        interpreter.set_tensor(source["index"], batch.astype(dtype))
        interpreter.invoke()
        out = interpreter.get_tensor(target["index"]).reshape(-1).astype(np.float32)
        if np.dtype(target["dtype"]).kind in "iu":
            scale, zero = target["quantization"]
            out = (out - zero) * scale
        rows.append(out)
    return np.stack(rows)


def run_pte(model: Path, x: np.ndarray) -> np.ndarray:
    import torch
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(model)).load_method("forward")
    return np.stack([method.execute([torch.from_numpy(np.ascontiguousarray(image[None]))])[0].numpy().reshape(-1)
                     for image in x])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="the bundled .tflite or .pte")
    parser.add_argument("--golden", type=Path, default=Path(__file__).resolve().parent,
                        help="folder with golden.npz and expected.json (default: beside this script)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    try:
        expected = json.loads((args.golden / "expected.json").read_text())
        x = np.load(args.golden / "golden.npz")["x"].astype(np.float32)
    except (OSError, ValueError, KeyError) as error:
        print(f"golden_check: error: cannot read the golden set in {args.golden} ({error})", file=sys.stderr)
        return 2
    if not args.model.is_file() or args.model.suffix not in (".tflite", ".pte"):
        print(f"golden_check: error: {args.model} is not a .tflite or .pte file", file=sys.stderr)
        return 2
    logits = run_tflite(args.model, x, args.threads) if args.model.suffix == ".tflite" else run_pte(args.model, x)
    if expected.get("model_output") == "probabilities":
        probs = logits
    else:
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
    tolerance, failures = float(expected["tolerance"]), 0
    for row, image in zip(probs, expected["images"], strict=True):
        want = image["top_k"]
        worst = max(abs(float(row[e["index"]]) - e["score"]) for e in want)
        ok = int(row.argmax()) == want[0]["index"] and worst <= tolerance
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {image['file']}: top-1 {int(row.argmax())} (expected {want[0]['index']} "
              f"{want[0]['label']}), largest probability gap {worst:.4f} (tolerance {tolerance})")
    print(f"golden_check: {len(probs) - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
