"""int8 by policy: for each checkpoint, `edgetl export --int8 auto --no-qat` (labels never used) at a budget, and
the figures docs/BENCHMARKS.md quotes: float top-1, the first int8 file's drop and changed predictions per format,
the remedy each file got with its cost and gain, the final drop and changed predictions, the sensitivity table's
top layers. `--int8 qat` (or `--allow-qat`) measures the QAT figures instead.

    python benchmarks/int8_figures.py RUN/checkpoint [RUN2/checkpoint ...] --max-drop 0.5 --out /tmp/int8-figures

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
        changed = round((1 - row["agreement"]) * row["images"])
        files[name] = {"first_drop": policy["first"][name]["drop_points"],
                       "first_changed": policy["first"][name]["changed_predictions"],
                       "remedy": row.get("remedy"), "drop": row["drop_points"], "changed": changed,
                       "top1": row["top1"]}
    steps = [{"remedy": s["remedy"], "seconds": s.get("seconds"), "skipped": s.get("skipped"),
              "gain": {f: v["gain_points"] for f, v in s["files"].items()}} for s in policy["steps"]]
    top = sorted((r for r in sensitivity["rows"] if r.get("measured")), key=lambda r: r["rank"])[:3]
    return {"model": manifest["model"], "float_top1": manifest["float_reference"]["top1"],
            "images": manifest["test_inputs"]["images"], "files": files, "steps": steps,
            "sensitivity_seconds": sensitivity["seconds"],
            "most_sensitive": [(r["layer"], r["logit_error"], r["macs_share"]) for r in top],
            "export_seconds": manifest["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("/tmp/int8-figures"))
    parser.add_argument("--extra", default="", help="more export flags, space-separated")
    parser.add_argument("--int8", default="auto", choices=("auto", "qat"), help="export's --int8 mode")
    parser.add_argument("--allow-qat", action="store_true", help="--int8 auto may use QAT (labels); default --no-qat")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, checkpoint in enumerate(args.checkpoints):
        out = args.out / f"export-{index}"
        code, seconds = export(checkpoint, out, args.max_drop, args.extra.split(), args.int8, args.allow_qat)
        entry = {"checkpoint": str(checkpoint), "exit_code": code, "wall_seconds": seconds}
        if (out / "manifest.json").is_file():
            entry.update(figures(out))
        results.append(entry)
        print(json.dumps(entry, indent=1))
    record = {"machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
              "max_drop": args.max_drop, "int8": args.int8, "qat_allowed": args.allow_qat or args.int8 == "qat",
              "command": " ".join(sys.argv), "results": results}
    (args.out / "int8_figures.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
