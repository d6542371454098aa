"""Verification: run each exported file in its real runtime over the held-out test split.

ai-edge-litert's Interpreter runs .tflite, the ExecuTorch runtime runs .pte; inputs are the test split
preprocessed exactly as the checkpoint says (stored as `test_inputs.npz`). Each file is compared with the
float checkpoint: top-1, agreement of predictions, largest difference of any class probability. The
table is printed and stored, so a later `verify_export(folder)` gives the same answer without torch
training code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from edgetl.errors import QualityFailed, UserError
from edgetl.manifest import now_utc, write_json
from edgetl.ui import stdout

TEST_INPUTS = "test_inputs.npz"
FLOAT_REFERENCE = "float_reference.npz"
VERIFICATION_JSON = "verification.json"
VERIFICATION_TXT = "verification.txt"


@contextlib.contextmanager
def quiet_native() -> Iterator[None]:
    """Silence what C++ libraries print on fds 1/2 (absl, oneDNN, LiteRT's delegate banner, cpuinfo).

    Python-level output inside is swallowed too, so callers print before and after. EDGETL_DEBUG=1
    shows everything.
    """
    if os.environ.get("EDGETL_DEBUG") == "1":
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class QualityError(QualityFailed):
    """An int8 file lost more top-1 than allowed; everything is written, the run still fails (exit 3)."""


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def quantize_input(x: np.ndarray, scale: float, zero_point: int, dtype: np.dtype) -> np.ndarray:
    """Float → int tensor with a tensor's (scale, zero_point), as an app would feed an int8 model."""
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def run_tflite(path: Path, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Run a .tflite (batch 1) on each image; int8 inputs/outputs are (de)quantized with their params."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:
        raise UserError(f"ai-edge-litert is not installed ({error}); pip install 'edgetl[torch]'") from None
    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    target = interpreter.get_output_details()[0]
    in_scale, in_zero = source["quantization"]
    out_scale, out_zero = target["quantization"]
    in_dtype = np.dtype(source["dtype"])
    outputs = []
    for index in range(len(x)):
        image = x[index : index + 1]
        if in_dtype.kind == "i":
            image = quantize_input(image, in_scale, int(in_zero), in_dtype)
        interpreter.set_tensor(source["index"], np.ascontiguousarray(image.astype(in_dtype, copy=False)))
        interpreter.invoke()
        result = interpreter.get_tensor(target["index"]).reshape(-1)
        if np.dtype(target["dtype"]).kind == "i":
            result = (result.astype(np.float32) - out_zero) * out_scale
        outputs.append(result.astype(np.float32))
    return np.stack(outputs)


def tflite_io(path: Path) -> dict:
    """Input/output tensors of a .tflite as the sidecar manifest records them (dtype, shape, quant)."""
    from ai_edge_litert.interpreter import Interpreter

    with quiet_native():
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()

    def describe(detail: dict) -> dict:
        scale, zero_point = detail["quantization"]
        return {
            "name": detail["name"],
            "dtype": np.dtype(detail["dtype"]).name,
            "shape": [int(v) for v in detail["shape"]],
            "quantization": {"scale": float(scale), "zero_point": int(zero_point)} if scale else None,
        }

    ops: dict[str, int] = {}
    details = interpreter._get_ops_details()
    for op in details:
        ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
    # LiteRT applies its XNNPACK delegate when the interpreter is built: the nodes it takes are replaced by
    # DELEGATE nodes. One DELEGATE from the model's input to its output means the whole graph runs in XNNPACK.
    inputs = {int(d["index"]) for d in interpreter.get_input_details()}
    outputs = {int(d["index"]) for d in interpreter.get_output_details()}
    delegates = [op for op in details if op["op_name"] == "DELEGATE"]
    whole = len(delegates) == 1 and inputs <= {int(i) for i in delegates[0]["inputs"]} and outputs == {
        int(i) for i in delegates[0]["outputs"]
    }
    return {
        "inputs": [describe(d) for d in interpreter.get_input_details()],
        "outputs": [describe(d) for d in interpreter.get_output_details()],
        "ops": dict(sorted(ops.items())),
        "delegation": {
            "delegate": "XNNPACK (LiteRT default CPU delegate)",
            "delegate_nodes": len(delegates),
            "graph_ops": len(details) - len(delegates),
            "whole_graph_delegated": bool(whole),
        },
    }


def run_artifact(path: Path, fmt: str, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Logits of one exported file over `x` (NHWC float32), in the file's own runtime."""
    if fmt == "tflite":
        return run_tflite(path, x, threads)
    if fmt == "pte":
        from edgetl.backends.torch.runtime import run_pte

        return run_pte(path, x, threads)
    raise UserError(f"cannot verify {str(path)!r}: unknown format {fmt!r}")


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1, agreement with the reference's predictions and the largest class-probability gap."""
    predicted = logits.argmax(axis=1)
    return {
        "images": int(len(labels)),
        "top1": float((predicted == labels).mean()),
        "agreement": float((predicted == reference.argmax(axis=1)).mean()),
        "max_prob_diff": float(np.abs(softmax(logits) - softmax(reference)).max()),
    }


def verify_artifacts(folder: Path, artifacts: list[dict], threads: int | None = None) -> dict:
    """Run every artifact listed (dicts with file/format/quant) and return the verification record."""
    folder = Path(folder)
    data = np.load(folder / TEST_INPUTS)
    x, y = data["x"], data["y"]
    reference = np.load(folder / FLOAT_REFERENCE)["logits"]
    float_top1 = float((reference.argmax(axis=1) == y).mean())
    rows: list[dict] = []
    predictions: dict[str, np.ndarray] = {}
    for artifact in artifacts:
        row = {"file": artifact["file"], "format": artifact["format"], "quant": artifact["quant"]}
        started = time.perf_counter()
        try:
            with quiet_native():
                out = run_artifact(folder / artifact["file"], artifact["format"], x, threads)
        except Exception as error:  # a file that does not run is a verification result, not a crash
            row.update(status="failed", error=f"{type(error).__name__}: {error}"[:300])
            rows.append(row)
            continue
        row.update(compare(out, reference, y))
        row["drop_points"] = round(100 * (float_top1 - row["top1"]), 2)
        row["seconds"] = round(time.perf_counter() - started, 1)
        row["status"] = "ok"
        predictions[artifact["file"]] = out.argmax(axis=1)
        rows.append(row)
    pairs = _cross_agreement(rows, predictions)
    return {
        "created": now_utc(),
        "images": int(len(y)),
        "float_top1": float_top1,
        "rows": rows,
        "cross_format_agreement": pairs,
    }


def _cross_agreement(rows: list[dict], predictions: dict[str, np.ndarray]) -> list[dict]:
    """Same-precision .tflite vs .pte: how often the two runtimes pick the same class."""
    pairs = []
    for quant in sorted({r["quant"] for r in rows}):
        files = {r["format"]: r["file"] for r in rows if r["quant"] == quant and r["file"] in predictions}
        if "tflite" in files and "pte" in files:
            same = float((predictions[files["tflite"]] == predictions[files["pte"]]).mean())
            pairs.append({"quant": quant, "files": [files["tflite"], files["pte"]], "agreement": same})
    return pairs


def render_table(record: dict, title: str = "verification") -> Table:
    reference = record.get("reference", "float checkpoint")  # a pruned export compares with its pruned float model
    table = Table(
        title=f"{title}: {record['images']} test images, {reference} top-1 {100 * record['float_top1']:.1f}%",
        box=box.SIMPLE_HEAD,
        caption=f".tflite runs in LiteRT, .pte in ExecuTorch; drop and agreement are against the {reference}",
    )
    table.add_column("file", no_wrap=True)
    for column in ("top-1", "drop", "agree", "max Δp", "s"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in record["rows"]:
        if row["status"] != "ok":
            table.add_row(row["file"], "[red]failed[/]", "", "", "", "")
            continue
        table.add_row(
            row["file"], f"{100 * row['top1']:.1f}%", f"{row['drop_points']:.1f}",
            f"{100 * row['agreement']:.1f}%", f"{row['max_prob_diff']:.3f}", f"{row['seconds']:.0f}",
        )
    return table


def store(folder: Path, record: dict) -> None:
    """verification.json for tools, verification.txt (the printed table) for people."""
    write_json(Path(folder) / VERIFICATION_JSON, record)
    text = Console(record=True, width=120, file=io.StringIO())
    text.print(render_table(record))
    for pair in record["cross_format_agreement"]:
        text.print(f"{pair['quant']}: .tflite and .pte agree on {100 * pair['agreement']:.1f}% of test images")
    (Path(folder) / VERIFICATION_TXT).write_text(text.export_text())


def print_record(record: dict) -> None:
    stdout.print(render_table(record))
    for pair in record["cross_format_agreement"]:
        stdout.print(f"{pair['quant']}: .tflite and .pte agree on {100 * pair['agreement']:.1f}% of test images")


def check_drop(record: dict, max_drop: float) -> None:
    """Fail (after everything is written) when an int8 file lost more than `max_drop` points of top-1."""
    bad = [r for r in record["rows"] if r["status"] == "ok" and r["quant"] == "int8" and r["drop_points"] > max_drop]
    if not bad:
        return
    worst = max(bad, key=lambda r: r["drop_points"])
    raise QualityError(
        f"int8 top-1 fell {worst['drop_points']:.1f} points below the float checkpoint "
        f"({100 * record['float_top1']:.1f}% → {100 * worst['top1']:.1f}% for {worst['file']}; "
        f"--max-drop {max_drop:g}); files are written — try more calibration images (--calib 1000), "
        f"keep bias correction on, or quantization-aware training"
    )


def verify_export(folder: Path, threads: int | None = None) -> dict:
    """Re-verify an export folder from its manifest alone (no checkpoint needed)."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{str(folder)!r} is not an export folder (no manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    artifacts = [a for a in manifest.get("artifacts", []) if a.get("status") == "ok"]
    return verify_artifacts(folder, artifacts, threads)
