"""Measure the compression figures of docs/BENCHMARKS.md on one checkpoint (the demo model: efficientnet_lite0, 128 px).

Three real `edgetl export` runs of the same checkpoint — dense int8 (PT2E PTQ), int8 with QAT, and 50% of the
channels removed (recovery fine-tune, then PTQ) — each verified in its runtime, then `edgetl bench` on the
emulated Cortex-A76 (guest instructions per invoke, the ARM cost figure). Optionally a magnitude-pruned run
for the size figures. Results are written after every step, so a run cut short keeps what it measured.

    .venv/bin/edgetl bench --setup arm64
    .venv/bin/python benchmarks/compress_figures.py runs/demo/checkpoint --out benchmarks/results/compress.json

Writes one JSON with the machine's conditions (cores, load average before and after each step).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

VARIANTS = {
    "dense-int8": {},
    "qat-int8": {"qat": True},
    "ch50-int8": {"prune": "channels:0.5"},
    "ch30-int8": {"prune": "channels:0.3"},
}
MAGNITUDE = {"sp50": {"prune": "magnitude:0.5", "quant": ("fp32", "int8")}}


def machine() -> dict:
    import platform

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def export_variant(checkpoint: Path, name: str, overrides: dict, folder: Path, formats: tuple[str, ...]) -> dict:
    from edgetl.config import ExportConfig
    from edgetl.export import run_export

    settings = {"quant": ("int8",), "formats": formats, "max_drop": 100.0, **overrides}
    started, before = time.perf_counter(), load()
    out = run_export(checkpoint, ExportConfig.of(**settings), folder / name / "export")
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {row["file"]: row for row in manifest["verification"]["rows"]}
    files = {}
    for artifact in manifest["artifacts"]:
        row = rows.get(artifact["file"], {})
        files[artifact["file"]] = {"format": artifact["format"], "quant": artifact["quant"],
                                   "bytes": artifact.get("bytes"), "gzip_bytes": artifact.get("gzip_bytes"),
                                   "top1": row.get("top1"), "agreement_with_float": row.get("agreement"),
                                   "status": row.get("status", artifact["status"])}
    pruning = manifest.get("pruning") or {}
    quantization = manifest.get("quantization") or {}
    return {
        "export_dir": str(out), "config": manifest["config"], "files": files,
        "float_reference_top1": manifest["float_reference"]["top1"],
        "pruning": {k: v for k, v in pruning.items() if k not in ("blocks", "layers")} or None,
        "qat": quantization.get("qat"), "quantization_seconds": quantization.get("seconds"),
        "seconds": round(time.perf_counter() - started, 1), "load_before": before, "load_after": load(),
    }


def bench_variant(export_dir: Path, target: str) -> dict:
    from edgetl.bench import run_bench
    from edgetl.config import BenchOptions

    started, before = time.perf_counter(), load()
    out = run_bench(export_dir, BenchOptions(targets=target, threads="1", arm_iters=2, arm_warmup=1, arm_samples=5,
                                            out=export_dir.parent / "bench"))
    manifest = json.loads((out / "manifest.json").read_text())
    rows = {row["artifact"]: {"instructions_per_invoke": row.get("instructions_per_invoke"),
                              "instructions_per_mac": row.get("instructions_per_mac"),
                              "failed": row.get("failed")} for row in manifest["rows"]}
    return {"target": target, "rows": rows, "seconds": round(time.perf_counter() - started, 1),
            "load_before": before, "load_after": load()}


def summarise(results: dict) -> dict:
    """The two claims: ch50 ≥ 2× fewer a76 instructions at ≤ 2 points below dense int8; QAT recovers ≥ half."""
    variants = results["variants"]
    summary: dict = {}

    def first(name: str, fmt: str, key: str):
        files = variants.get(name, {}).get("files", {})
        return next((f[key] for f in files.values() if f["format"] == fmt and f["quant"] == "int8"), None)

    float_top1 = results.get("checkpoint_float_top1")
    for fmt in ("tflite", "pte"):
        dense, qat, ch = (first(n, fmt, "top1") for n in ("dense-int8", "qat-int8", "ch50-int8"))
        if dense is None:
            continue
        row: dict = {"dense_int8_top1": dense, "float_top1": float_top1}
        if float_top1 is not None:
            row["ptq_drop_points"] = round(100 * (float_top1 - dense), 2)
        if qat is not None:
            row["qat_int8_top1"] = qat
            if float_top1 is not None:
                drop = float_top1 - dense
                row["qat_drop_points"] = round(100 * (float_top1 - qat), 2)
                row["qat_recovered_fraction_of_ptq_drop"] = round((qat - dense) / drop, 3) if drop > 0 else None
        if ch is not None:
            row["ch50_int8_top1"] = ch
            row["ch50_points_below_dense_int8"] = round(100 * (dense - ch), 2)
        benches = results.get("bench", {})
        dense_i = next((r["instructions_per_invoke"] for n, r in benches.get("dense-int8", {}).get("rows", {}).items()
                        if n.endswith(fmt)), None)
        ch_i = next((r["instructions_per_invoke"] for n, r in benches.get("ch50-int8", {}).get("rows", {}).items()
                     if n.endswith(fmt)), None)
        if dense_i and ch_i:
            row["a76_instructions_dense_int8"] = dense_i
            row["a76_instructions_ch50_int8"] = ch_i
            row["a76_instruction_ratio"] = round(dense_i / ch_i, 2)
        summary[fmt] = row
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--work", type=Path, default=Path("runs/compress-figures"), help="export/bench folders")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compress.json"))
    parser.add_argument("--formats", default="tflite", help="tflite, pte or tflite,pte")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS | MAGNITUDE)}")
    parser.add_argument("--target", default="arm64-a76")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--recovery-epochs", type=int, help="pruning fine-tune epochs (default: export's)")
    parser.add_argument("--qat-epochs", type=int, help="QAT epochs (default: export's)")
    parser.add_argument("--qat-lr", type=float, help="QAT learning rate (default: export's)")
    parser.add_argument("--tune-images", type=int, help="training images of the fine-tunes (default: all)")
    args = parser.parse_args()
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    checkpoint_manifest = json.loads((args.checkpoint / "manifest.json").read_text())
    results: dict = {"machine": machine(), "checkpoint": str(args.checkpoint.resolve()),
                     "checkpoint_float_top1": checkpoint_manifest["metrics"]["test"]["top1"],
                     "formats": list(formats), "variants": {}, "bench": {}}
    if args.out.is_file():  # resume: keep what an earlier (cut short) run measured
        previous = json.loads(args.out.read_text())
        results["variants"], results["bench"] = previous.get("variants", {}), previous.get("bench", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        results["summary"] = summarise(results)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    known = VARIANTS | MAGNITUDE
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in results["variants"]:
            overrides = dict(known[name])
            if "prune" in overrides and args.recovery_epochs is not None:
                overrides["recovery_epochs"] = args.recovery_epochs
            if overrides.get("qat") and args.qat_epochs is not None:
                overrides["qat_epochs"] = args.qat_epochs
            if overrides.get("qat") and args.qat_lr is not None:
                overrides["qat_lr"] = args.qat_lr
            if ("prune" in overrides or overrides.get("qat")) and args.tune_images is not None:
                overrides["tune_images"] = args.tune_images
            results["variants"][name] = export_variant(args.checkpoint, name, overrides, args.work, formats)
            save()
        if not args.no_bench and name in VARIANTS and name not in results["bench"]:
            results["bench"][name] = bench_variant(Path(results["variants"][name]["export_dir"]), args.target)
            save()
    save()
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
