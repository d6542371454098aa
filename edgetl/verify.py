"""Verification: run each exported file in its real runtime over the held-out test split.

Each file runs in its own runtime (`edgetl.formats`: LiteRT for .tflite, ExecuTorch for .pte); inputs are the
test split preprocessed exactly as the checkpoint says (stored as `test_inputs.npz`). Each file is compared with the
float checkpoint: top-1, agreement of predictions, largest difference of any class probability, and how close
the float model's own top two classes were on the images whose class a file changed (int8 changes the images
the float model barely separates: in 13 int8 checkpoints' files on 2026-12-07 the changed images' median gap was
1.2–7.1 points of probability, the test images' 15.7–84.4). The table is printed and stored, so a later
`verify_export(folder)` gives the same answer without torch training code.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from edgetl import formats
from edgetl.errors import QualityFailed, UserError, machine_failure
from edgetl.manifest import now_utc, write_json
from edgetl.ui import quiet_native, stdout

TEST_INPUTS = "test_inputs.npz"
FLOAT_REFERENCE = "float_reference.npz"
VERIFICATION_JSON = "verification.json"
VERIFICATION_TXT = "verification.txt"


class QualityError(QualityFailed):
    """An int8 file lost more top-1 than allowed; everything is written, the run still fails (exit 3)."""


def top_two_gap(probabilities: np.ndarray) -> np.ndarray:
    """Per image, how far apart the two most probable classes are (probability, 0–1): how decided the model is."""
    ordered = np.sort(probabilities, axis=1)
    return ordered[:, -1] - ordered[:, -2]


def compare(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict:
    """Top-1, agreement with the reference's predictions, the largest class-probability gap and, for the images
    whose class changed, the reference's own top-two gap on them (no labels needed for that part)."""
    predicted = logits.argmax(axis=1)
    probabilities = formats.softmax(reference)
    changed = predicted != reference.argmax(axis=1)
    row = {
        "images": int(len(labels)),
        "top1": float((predicted == labels).mean()),
        "agreement": float((~changed).mean()),
        "max_prob_diff": float(np.abs(formats.softmax(logits) - probabilities).max()),
        "changed": int(changed.sum()),
    }
    if changed.any():
        gaps = top_two_gap(probabilities[changed])
        row["changed_reference_gap"] = {"median": round(float(np.median(gaps)), 6),
                                        "max": round(float(gaps.max()), 6)}
    return row


def changed_line(row: dict, record: dict) -> str | None:
    """Which images a file classifies differently from the reference, said as how undecided the reference was on
    them against all test images; None when it changed none."""
    gap = row.get("changed_reference_gap")
    if not gap or "reference_gap_median" not in record:
        return None
    reference = record.get("reference", "float checkpoint")
    return (f"{row['file']}: {row['changed']} of {row['images']} test images change class; on them the {reference}'s "
            f"top two classes were {100 * gap['median']:.1f} points of probability apart (median, at most "
            f"{100 * gap['max']:.1f}) against {100 * record['reference_gap_median']:.1f} on all test images")


def verify_artifacts(folder: Path, artifacts: list[dict], threads: int | None = None) -> dict:
    """Run every artifact listed (dicts with file/format/quant) and return the verification record."""
    folder = Path(folder)
    data = np.load(folder / TEST_INPUTS)
    x, y = data["x"], data["y"]
    reference = np.load(folder / FLOAT_REFERENCE)["logits"]
    float_top1 = float((reference.argmax(axis=1) == y).mean())
    reference_gap_median = round(float(np.median(top_two_gap(formats.softmax(reference)))), 6)
    rows: list[dict] = []
    predictions: dict[str, np.ndarray] = {}
    for artifact in artifacts:
        row = {"file": artifact["file"], "format": artifact["format"], "quant": artifact["quant"]}
        started = time.perf_counter()
        try:
            with quiet_native():
                out = formats.run(folder / artifact["file"], x, threads, fmt=artifact["format"])
        except Exception as error:  # a file that does not run is a verification result, not a crash
            if machine_failure(error):
                raise  # the machine failed (no memory, an I/O error), not the file
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
        "reference_gap_median": reference_gap_median,
        "rows": rows,
        "cross_format_agreement": pairs,
    }


def _cross_agreement(rows: list[dict], predictions: dict[str, np.ndarray]) -> list[dict]:
    """Every pair of formats at one precision: how often their runtimes pick the same class."""
    pairs = []
    for quant in sorted({r["quant"] for r in rows}):
        files = {r["format"]: r["file"] for r in rows if r["quant"] == quant and r["file"] in predictions}
        ordered = [files[name] for name in formats.FORMATS if name in files]
        for index, first in enumerate(ordered):
            for second in ordered[index + 1:]:
                same = float((predictions[first] == predictions[second]).mean())
                pairs.append({"quant": quant, "files": [first, second], "agreement": same})
    return pairs


def render_table(record: dict, title: str = "verification") -> Table:
    reference = record.get("reference", "float checkpoint")  # a pruned export compares with its pruned float model
    table = Table(
        title=f"{title}: {record['images']} test images, {reference} top-1 {100 * record['float_top1']:.1f}%",
        box=box.SIMPLE_HEAD,
        caption=f"{_runtimes_line(record)}; drop and agreement are against the {reference}",
    )
    table.add_column("file", no_wrap=True)
    remedies = any(row.get("remedy") for row in record["rows"])
    for column in ("top-1", "drop", "agree", "max Δp", "s"):
        table.add_column(column, justify="right", no_wrap=True)
    if remedies:  # which int8 method made each file: ptq, adaround (learned rounding) or qat
        table.add_column("int8 by", no_wrap=True)
    for row in record["rows"]:
        extra = [row.get("remedy") or ""] if remedies else []
        if row["status"] != "ok":
            table.add_row(row["file"], "[red]failed[/]", "", "", "", "", *extra)
            continue
        table.add_row(
            row["file"], f"{100 * row['top1']:.1f}%", f"{row['drop_points']:.1f}",
            f"{100 * row['agreement']:.1f}%", f"{row['max_prob_diff']:.3f}", f"{row['seconds']:.0f}", *extra,
        )
    return table


def _runtimes_line(record: dict) -> str:
    """Which runtime ran each format of the table, e.g. ".tflite in LiteRT (…), .pte in ExecuTorch (…)"."""
    present = {row.get("format") for row in record["rows"]}
    return ", ".join(f"{f.suffix} in {f.runtime}" for name, f in formats.FORMATS.items() if name in present)


def _agreement_line(pair: dict) -> str:
    first, second = (Path(name).suffix for name in pair["files"])
    return f"{pair['quant']}: {first} and {second} agree on {100 * pair['agreement']:.1f}% of test images"


def store(folder: Path, record: dict) -> None:
    """verification.json for tools, verification.txt (the printed table) for people."""
    write_json(Path(folder) / VERIFICATION_JSON, record)
    text = Console(record=True, width=120, file=io.StringIO())
    text.print(render_table(record))
    for line in _notes(record):
        text.print(line, markup=False, highlight=False)
    (Path(folder) / VERIFICATION_TXT).write_text(text.export_text())


def _notes(record: dict) -> list[str]:
    """The lines under the table: cross-format agreement, then which images each int8 file changed."""
    lines = [_agreement_line(pair) for pair in record["cross_format_agreement"]]
    changed = (changed_line(row, record) for row in record["rows"] if row["status"] == "ok" and row["quant"] == "int8")
    return lines + [line for line in changed if line]


def print_record(record: dict) -> None:
    stdout.print(render_table(record))
    for line in _notes(record):
        stdout.print(line, markup=False, highlight=False)


def check_drop(record: dict, max_drop: float) -> None:
    """Fail (after everything is written) when an int8 file lost more than `max_drop` points of top-1."""
    bad = [r for r in record["rows"] if r["status"] == "ok" and r["quant"] == "int8" and r["drop_points"] > max_drop]
    if not bad:
        return
    worst = max(bad, key=lambda r: r["drop_points"])
    changed = changed_line(worst, record)
    raise QualityError(
        f"int8 top-1 fell {worst['drop_points']:.1f} points below the float checkpoint "
        f"({100 * record['float_top1']:.1f}% → {100 * worst['top1']:.1f}% for {worst['file']}; "
        f"--max-drop {max_drop:g}; made by {worst.get('remedy') or 'ptq'}); files are written — --int8 auto "
        f"(the default) tries learned rounding, float fallback of --float-layers, then QAT; also try more "
        f"calibration images (--calib 1000), --rounding-layers 16, or --float-layers with the top layers of the "
        f"int8 sensitivity table" + (f" ({changed})" if changed else "")
    )


def verify_export(folder: Path, threads: int | None = None) -> dict:
    """Re-verify an export folder from its manifest alone (no checkpoint needed)."""
    from edgetl.contracts import ExportManifest, read

    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"{str(folder)!r} is not an export folder (no manifest.json)")
    manifest = read(manifest_path, ExportManifest)
    return verify_artifacts(folder, [a.to_json() for a in manifest.artifacts if a.ok], threads)
