"""int8 by policy: for each checkpoint, `edgetl export --int8 auto --no-qat` (labels never used) at a budget, and
the figures docs/BENCHMARKS.md quotes: float top-1, the first int8 file's drop and changed predictions per format,
the remedy each file got with its cost and gain, the final drop and changed predictions, the sensitivity table's
top layers. `--int8 qat` (or `--allow-qat`) measures the QAT figures instead.

    python benchmarks/int8_figures.py RUN/checkpoint [RUN2/checkpoint ...] --max-drop 0.5 --out /tmp/int8-figures
    python benchmarks/int8_figures.py --table /tmp/int8-figures/int8_figures.json   # the goal table, markdown
    python benchmarks/int8_figures.py --paired /tmp/int8-figures/export-*   # paired 95% intervals of each drop

Each export runs as its own `edgetl export` process (the CLI a user runs); the script only reads the manifests.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def export(checkpoint: Path, out: Path, max_drop: float, extra: list[str], mode: str = "auto",
           allow_qat: bool = False) -> tuple[int, float]:
    started = time.perf_counter()
    labels = [] if allow_qat or mode == "qat" else ["--no-qat"]  # without QAT no label is used
    command = [sys.executable, "-m", "edgetl.cli", "export", str(checkpoint), "--quant", "int8", "--int8", mode,
               *labels, "--max-drop", f"{max_drop:g}", "--out", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd="/tmp")
    (out.parent / f"{out.name}.log").write_text(result.stdout + result.stderr)
    return result.returncode, round(time.perf_counter() - started, 1)


def figures(out: Path) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    policy, sensitivity = manifest["quantization"]["policy"], manifest["quantization"]["sensitivity"]
    files = {}
    for row in manifest["verification"]["rows"]:
        name = row["file"]
        if name not in policy["first"]:  # an fp32 file of an export that made both
            continue
        changed = round((1 - row["agreement"]) * row["images"])
        sidecar = json.loads((out / f"{name}.json").read_text())
        delegation = sidecar.get("delegation") or {}
        first = policy["first"][name].get("test", policy["first"][name])  # PTQ alone on the test images
        judged = policy["first"][name]  # PTQ alone on the judge's images (validation and unlabelled)
        files[name] = {"first_drop": first["drop_points"], "first_changed": first["changed_predictions"],
                       "first_judged": {k: v for k, v in judged.items() if k != "test"},
                       "remedy": row.get("remedy"), "drop": row["drop_points"], "changed": changed,
                       "top1": row["top1"], "partitions": delegation.get("subgraphs"),
                       "outside_compute": delegation.get("compute_ops_outside")}
    steps = [{"remedy": s["remedy"], "seconds": s.get("seconds"), "skipped": s.get("skipped"),
              "gain": {f: v["gain_points"] for f, v in s["files"].items() if "gain_points" in v},
              "kept": {f: v["kept"] for f, v in s["files"].items()},
              "changed": {f: [v.get("changed_before"), v.get("changed_predictions")] for f, v in s["files"].items()}}
             for s in policy["steps"]]
    top = sorted((r for r in sensitivity["rows"] if r.get("measured")), key=lambda r: r["rank"])[:3]
    return {"model": manifest["model"], "float_top1": manifest["float_reference"]["top1"],
            "judged_on": policy.get("judged_on", {"split": "test"}),
            "activation_choice": manifest["quantization"].get("activation_choice"),
            "images": manifest["test_inputs"]["images"], "files": files, "steps": steps,
            "sensitivity_seconds": sensitivity["seconds"],
            "most_sensitive": [(r["layer"], r["logit_error"], r["macs_share"]) for r in top],
            "export_seconds": manifest["seconds"]}


def paired(out: Path) -> list[dict]:
    """Each int8 file of an export folder against its float model on the same test images: b = float right and
    int8 wrong, c = the reverse; the drop (b - c) / n with a 95% normal interval on the paired difference, and
    the float top-1 with its Wilson 95% interval. The files run again in their own runtimes."""
    import math

    import numpy as np

    from edgetl import formats

    reference, inputs = np.load(out / "float_reference.npz"), np.load(out / "test_inputs.npz")
    labels = reference["labels"]
    float_right = reference["logits"].argmax(1) == labels
    n, z = len(labels), 1.96
    p = float(float_right.mean())
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (
        1 + z * z / n)
    rows = []
    for path in sorted(p for suffix in formats.SUFFIXES for p in out.glob(f"*-int8*{suffix}")):
        right = np.asarray(formats.run(path, inputs["x"], 1)).argmax(1) == labels
        b, c = int((float_right & ~right).sum()), int((~float_right & right).sum())
        drop = (b - c) / n
        spread = z * math.sqrt(max(0.0, b + c - (b - c) ** 2 / n)) / n
        rows.append({"file": path.name, "images": n, "float_top1": round(100 * p, 1),
                     "float_interval": [round(100 * (centre - half), 1), round(100 * (centre + half), 1)],
                     "b": b, "c": c, "drop_points": round(100 * drop, 2),
                     "drop_interval": [round(100 * (drop - spread), 1), round(100 * (drop + spread), 1)]})
    return rows


def data_of(checkpoint: Path) -> str | None:
    """The data set a checkpoint was fine-tuned on, as its manifest names it."""
    try:
        source = json.loads((checkpoint / "manifest.json").read_text()).get("data", {}).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(source).name if source and not source.startswith("builtin:") else source


def table(record: dict) -> str:
    """One markdown row per checkpoint: float top-1, the first PTQ's and the final drop per format with changed
    predictions, PTQ's activation observer, the remedies that ran with their seconds, and the .pte's partitions."""
    lines = ["| checkpoint | data | float top-1 | PTQ observer | PTQ drop .tflite / .pte (changed) | final drop "
             ".tflite / .pte (changed) | remedies (s) | .pte partitions | export s |",
             "|---|---|---:|---|---|---|---|---:|---:|"]
    for entry in record["results"]:
        if "files" not in entry:
            lines.append(f"| {entry['checkpoint']} | | exit {entry['exit_code']} | | | | | | |")
            continue
        model = entry["model"]
        by_format = {name.rsplit(".", 1)[1]: figures for name, figures in entry["files"].items()}
        tfl, pte = by_format.get("tflite", {}), by_format.get("pte", {})

        def pair(key: str, changed: str, tfl: dict = tfl, pte: dict = pte) -> str:
            return (f"{tfl.get(key, '–')} / {pte.get(key, '–')} "
                    f"({tfl.get(changed, '–')} / {pte.get(changed, '–')})")

        remedies = ", ".join(f"{s['remedy']} {s['seconds']:g}" for s in entry["steps"] if not s.get("skipped")) or "–"
        choice = (entry.get("activation_choice") or {}).get("chosen", "–")
        width = "" if model["width"] == 1.0 else f" {model['width']:g}"
        name = f"{model['backbone']}{width} {model['image_size']} px"
        lines.append(f"| {name} ({Path(entry['checkpoint']).parent.name}) | {entry.get('data') or '–'} | "
                     f"{100 * entry['float_top1']:.1f}% | "
                     f"{choice} | {pair('first_drop', 'first_changed')} | {pair('drop', 'changed')} | {remedies} | "
                     f"{pte.get('partitions', '–')} | {entry['export_seconds']:g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--table", type=Path, help="print the markdown goal table of an int8_figures.json and stop")
    parser.add_argument("--paired", type=Path, nargs="+", help="export folders: print each int8 file's paired "
                                                               "interval against its float model and stop")
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/int8-figures"))
    parser.add_argument("--extra", default="", help="more export flags, space-separated")
    parser.add_argument("--int8", default="auto", choices=("auto", "qat"), help="export's --int8 mode")
    parser.add_argument("--allow-qat", action="store_true", help="--int8 auto may use QAT (labels); default --no-qat")
    args = parser.parse_args()
    if args.paired:
        for out in args.paired:
            for row in paired(out):
                print(json.dumps({"export": str(out), **row}))
        return
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return
    if not args.checkpoints:
        parser.error("give checkpoints, or --table JSON")
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, checkpoint in enumerate(args.checkpoints):
        out = args.out / f"export-{index}"
        code, seconds = export(checkpoint, out, args.max_drop, args.extra.split(), args.int8, args.allow_qat)
        entry = {"checkpoint": str(checkpoint), "exit_code": code, "wall_seconds": seconds}
        if (out / "manifest.json").is_file():
            entry.update(figures(out))
            entry["data"] = data_of(checkpoint)
        results.append(entry)
        print(json.dumps(entry, indent=1))
    record = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
              "max_drop": args.max_drop, "int8": args.int8, "qat_allowed": args.allow_qat or args.int8 == "qat",
              "command": " ".join(sys.argv), "results": results}
    (args.out / "int8_figures.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
