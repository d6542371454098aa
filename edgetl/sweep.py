"""The sweep: one checkpoint → a grid of compressed variants, each exported, verified and benchmarked.

Why a stage of its own: pruning and quantization are meant to make a model faster, and that claim holds
only where it is measured. So every variant goes through the same export (each file verified in its own
runtime) and the same bench on the same targets, and `report.py` compares what came back. This module
only orchestrates: `export.run_export` and `bench.run_bench` do the work, one variant at a time, into
`SWEEP/variants/<name>/{export,bench}`; a variant that fails is recorded and the others go on.

The grid is data: a variant is a name plus ExportConfig overrides (`config.VARIANTS`); a sweep recipe
(`export/sweeps/*.toml`, read by `config.load_recipe`) picks variants, targets and bench settings, and may
define variants of its own.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgetl.config import VARIANTS, ExportConfig, SweepConfig, Variant, resolve
from edgetl.contracts import SCHEMA_VERSION, SWEEP_KIND, ArtifactSidecar, BenchManifest, ExportManifest, read
from edgetl.errors import UserError, machine_failure
from edgetl.targets import preflight

DEFAULT_RECIPE = "default"


def resolve_config(recipe: str | None = None, settings: list[str] | None = None, **flags: object) -> SweepConfig:
    """Defaults ← recipe (export/sweeps/NAME.toml, `default` when none is named) ← flags that were given."""
    return resolve("sweep", recipe, settings, **flags)


# ------------------------------------------------------------------------------------------ the stage


def run_sweep(checkpoint: Path, config: SweepConfig, out: Path | None = None, reuse: Path | None = None) -> Path:
    """Export, verify and bench every variant, then write sweep.json, report.md and report.html.

    `reuse`: an export folder of this checkpoint (e.g. RUN/export) whose files a variant may take instead of
    exporting them again, when its settings are the same (see `reusable`).
    """
    from edgetl.manifest import read_checkpoint
    from edgetl.paths import atomic_dir, claim_output, ensure_writable_dir
    from edgetl.report import SWEEP_JSON

    checkpoint = Path(checkpoint)
    manifest = read_checkpoint(checkpoint)
    config = config.validate()
    if manifest.framework != "torch":
        raise UserError(f"checkpoint {str(checkpoint)!r} is a {manifest.framework!r} checkpoint; "
                        "edgetl sweep supports torch checkpoints (valid: a checkpoint from edgetl finetune "
                        "--framework torch)")
    _check_variant_configs(config, manifest.framework)
    out = claim_output(Path(out) if out is not None else checkpoint.parent / "sweep", SWEEP_KIND,
                       [checkpoint, reuse], manifest=SWEEP_JSON)
    ensure_writable_dir(out.parent, "sweep folder")
    if reuse is not None and not (Path(reuse) / "manifest.json").is_file():
        raise UserError(f"--reuse {str(reuse)!r} is not an export folder (no manifest.json); give RUN/export")

    from edgetl.bench import setup_userland
    from edgetl.ui import console

    targets = config.bench.parsed_targets()
    if any(t.emulated for t in targets):  # once, before any export: a set-up failure costs no exports
        setup_userland("arm64")
    preflight(targets, config.bench.remote_python, config.bench.taskset)  # an unreachable board costs no exports
    started = time.perf_counter()
    load_before = _loadavg()
    from edgetl.report import print_summary, write_report

    with atomic_dir(out) as work:  # the whole sweep, or nothing: a stopped sweep leaves the previous one as it was
        variants = []
        for index, name in enumerate(config.variants, 1):
            variant = config.known()[name]
            console.rule(f"sweep {index}/{len(config.variants)}: {name} — {variant.description or 'custom variant'}")
            variants.append(run_variant(checkpoint, config, name, work / "variants" / name, reuse))
            status = variants[-1]["status"]
            elapsed = time.perf_counter() - started
            console.print(f"sweep: {name} {status} in {variants[-1]['seconds']:.0f} s "
                          f"({index}/{len(config.variants)} done, {elapsed / 60:.1f} min so far)")
        rows, failures = collect(work, variants)
        document = {
            "kind": SWEEP_KIND, "schema_version": SCHEMA_VERSION, "created": _now(),
            "checkpoint": {"path": str(checkpoint.resolve()), "model": manifest.model.to_json(),
                           "test_top1_at_finetune": manifest.test_top1},
            "config": config.to_json(),
            "variants": variants,
            "reference": reference_top1(variants, manifest),
            "conditions": conditions(work, variants, config, load_before),
            "rows": rows, "failures": failures, "breakdowns": breakdowns(variants),
            "seconds": round(time.perf_counter() - started, 1),
        }
        _repoint(work, out, variants)
        document = write_report(work, document)
    document["report"] = {key: str(out / Path(path).name) for key, path in document["report"].items()}
    print_summary(document)
    return out


def _repoint(work: Path, out: Path, variants: list[dict[str, Any]]) -> None:
    """Paths recorded while the sweep ran in its temporary folder, made to name the final one.

    Rewritten files get a new inode (atomic_write_bytes), so files hard-linked from a --reuse export are
    never changed through the link."""
    from edgetl.paths import atomic_write_bytes

    pairs = [(str(work.resolve()), str(out.resolve())), (str(work), str(out))]
    for variant in variants:
        for key in ("export", "bench"):
            for old, new in pairs:
                variant[key] = variant[key].replace(old, new)
    for path in [*work.glob("variants/*/bench/*.json"), *work.glob("variants/*/report.json")]:
        text = path.read_text()
        changed = text
        for old, new in pairs:
            changed = changed.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
        if changed != text:
            atomic_write_bytes(path, changed.encode())


def _check_variant_configs(config: SweepConfig, framework: str) -> None:
    """A variant whose settings export would refuse (also for the checkpoint's backend) is a user error, named,
    before any work.

    Anything else (an option the installed export does not know yet) is left to the run, where that
    variant is recorded as failed and the others go on.
    """
    for name in config.variants:
        try:
            config.export_config(name).for_backend(framework)
        except UserError as error:
            raise UserError(f"sweep variant {name!r}: {error}") from None
        except Exception:  # noqa: BLE001, S112 - recorded per variant by run_variant
            continue


def run_variant(checkpoint: Path, config: SweepConfig, name: str, folder: Path,
                reuse: Path | None = None) -> dict[str, Any]:
    """Export (+ verify) then bench one variant; every failure is recorded, never raised."""
    from edgetl.bench import run_bench
    from edgetl.export import ExportFailed, run_export
    from edgetl.ui import console
    from edgetl.verify import QualityError

    variant = config.known()[name]
    entry: dict[str, Any] = {"name": name, "description": variant.description,
                             "overrides": _jsonable(variant.overrides), "status": "failed",
                             "export": str(folder / "export"), "bench": str(folder / "bench")}
    started = time.perf_counter()
    try:
        export_config = config.export_config(name)
        entry["export_config"] = export_config.to_json()
        taken = reusable(Path(reuse), checkpoint, export_config) if reuse is not None else None
        if taken:
            take_export(Path(reuse), taken, folder / "export")
            entry["reused_from"] = str(Path(reuse).resolve())
            console.print(f"sweep: {name}: the same settings were exported and verified in {reuse}; "
                          f"taking {', '.join(taken)} from there")
        else:
            run_export(checkpoint, export_config, folder / "export")
    except (QualityError, ExportFailed) as error:  # written; the report judges accuracy and lists failures
        entry["export_note"] = str(error)
    except KeyboardInterrupt:
        raise
    except Exception as error:  # this variant is lost, the sweep goes on
        if machine_failure(error):
            raise  # a full disk or an I/O error would fail every variant after it: stop, publish nothing
        entry["error"] = f"export: {_one_line(error)}"
    if "error" not in entry:
        try:
            run_bench(folder / "export", replace(config.bench, out=folder / "bench"))
            entry["status"] = "ok"
        except KeyboardInterrupt:
            raise
        except Exception as error:
            if machine_failure(error):
                raise
            entry["error"] = f"bench: {_one_line(error)}"
    if "error" in entry:
        console.print(f"[red]sweep: variant {name} failed[/] — {entry['error']}")
    entry["seconds"] = round(time.perf_counter() - started, 1)
    return entry


REUSE_MUST_MATCH = ("calib", "bias_correction", "fuse_clamp", "seed", "prune", "qat")
# Settings of the int8 policy: they shape only the int8 files, and an int8 file the policy left as PTQ (no
# remedy was needed) is the file an int8-ptq variant would make.
INT8_POLICY = ("int8", "no_qat", "max_drop", "rounding_layers")


def reusable(export: Path, checkpoint: Path, config: Any) -> list[str] | None:
    """The files of `export` that are exactly what `config` would make, or None.

    Same parent checkpoint (manifest and weights hashes), same settings that shape a file, every requested
    format × precision present, exported and verified: then exporting again would only repeat the work.
    """
    from edgetl.config import artifact_name
    from edgetl.manifest import sha256_file

    path = export / "manifest.json"
    if not path.is_file():
        return None
    manifest = read(path, ExportManifest)
    if manifest.parent.get("manifest_sha256") != sha256_file(checkpoint / "manifest.json"):
        return None
    made = ExportConfig.settings_of(manifest.config)  # an export of an earlier release holds them flat
    wanted = config.validate().flat()
    if wanted.get("prune") or wanted.get("qat"):  # trained variants: their settings are many; always made anew
        return None
    if any(made.get(key) != wanted.get(key) for key in REUSE_MUST_MATCH):
        return None
    verified, exported = manifest.verified(), manifest.made()
    asked = config.quantization
    names = [artifact_name(manifest.model, quant, fmt) for quant in asked.quant for fmt in asked.formats]
    if not all(name in verified and name in exported and (export / name).is_file() for name in names):
        return None
    int8_names = [artifact_name(manifest.model, "int8", fmt) for fmt in asked.formats if "int8" in asked.quant]
    if int8_names and any(made.get(key) != wanted.get(key) for key in INT8_POLICY):
        remedy_of = ((manifest.quantization or {}).get("policy") or {}).get("remedy_of", {})
        if wanted.get("int8") != "ptq" or any(remedy_of.get(name) != "ptq" for name in int8_names):
            return None
    return names


def take_export(source: Path, names: list[str], folder: Path) -> None:
    """A variant's export folder made of another export's files (hard links where possible) and a manifest
    that lists only them, with their verification rows; written atomically like an export."""
    import shutil

    from edgetl.manifest import write_json
    from edgetl.paths import atomic_dir

    manifest = read(source / "manifest.json", ExportManifest).to_json()
    shared = [n for n in ("labels.txt", "test_inputs.npz", "float_reference.npz") if (source / n).is_file()]
    with atomic_dir(folder) as tmp:
        for name in [*names, *(f"{n}.json" for n in names), *shared]:
            try:
                os.link(source / name, tmp / name)
            except OSError:
                shutil.copy2(source / name, tmp / name)
        manifest["artifacts"] = [a for a in manifest["artifacts"] if a["file"] in names]
        record = manifest["verification"]
        record["rows"] = [r for r in record["rows"] if r["file"] in names]
        record["cross_format_agreement"] = [p for p in record.get("cross_format_agreement", [])
                                            if set(p["files"]) <= set(names)]
        manifest["reused_from"] = str(source.resolve())
        write_json(tmp / "manifest.json", manifest)
        write_json(tmp / "verification.json", record)


def _one_line(error: BaseException) -> str:
    text = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
    return (text.strip().splitlines() or [type(error).__name__])[0][:400]


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


# ------------------------------------------------------------------------------------- result table


def collect(out: Path, variants: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One flat row per artifact × target × thread count, from the files export and bench wrote.

    Accuracy is the verification top-1 (the file in its own runtime, whole test split, on the host); cost
    is bench's: host p50 latency, or guest instructions per invoke on an emulated ARM64 target.
    """
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for variant in variants:
        export = Path(variant["export"])
        manifest_path = export / "manifest.json"
        if not manifest_path.is_file():
            failures.append({"variant": variant["name"], "artifact": None, "stage": "export",
                             "error": variant.get("error", "no export manifest")})
            continue
        manifest = read(manifest_path, ExportManifest)
        config = ExportConfig.settings_of(manifest.config)
        verified = {r["file"]: r for r in manifest.verification["rows"]}
        bench_rows: dict[str, list[dict[str, Any]]] = {}
        bench_manifest = Path(variant["bench"]) / "manifest.json"
        if bench_manifest.is_file() and variant["status"] == "ok":
            for row in read(bench_manifest, BenchManifest).rows:
                bench_rows.setdefault(row.artifact, []).append(row.to_json())
        elif variant.get("error"):
            failures.append({"variant": variant["name"], "artifact": None, "stage": "bench",
                             "error": variant["error"]})
        for artifact in manifest.artifacts:
            name = artifact.file
            check = verified.get(name, {})
            if not artifact.ok or check.get("status") != "ok":
                failures.append({"variant": variant["name"], "artifact": name,
                                 "stage": "export" if not artifact.ok else "verify",
                                 "error": artifact.error or check.get("error") or "not verified"})
                continue
            sidecar = read(export / f"{name}.json", ArtifactSidecar)
            base = {
                "id": f"{variant['name']}/{name}", "variant": variant["name"], "artifact": name,
                "format": artifact.format, "quant": artifact.quant, "prune": config.get("prune"),
                "qat": bool(config.get("qat")), "size_bytes": sidecar.bytes, "top1": check["top1"],
                "top1_images": check["images"], "agreement": check.get("agreement"),
                **delegation(sidecar),
            }
            for bench in bench_rows.get(name, []):
                if "failed" in bench:
                    failures.append({"variant": variant["name"], "artifact": name, "stage": "bench",
                                     "target": bench["target"], "error": bench["failed"]})
                    continue
                rows.append({**base, "target": bench["target"], "emulated": bench["emulated"],
                             "threads": bench["threads"], "runtime": bench["runtime"], "p50_ms": bench["p50_ms"],
                             "p90_ms": bench["p90_ms"], "instructions_per_invoke": bench["instructions_per_invoke"],
                             "instructions_per_mac": bench["instructions_per_mac"], "macs": bench["macs"],
                             "bench_top1": bench["top1"], "bench_top1_samples": bench["top1_samples"]})
    return rows, failures


def breakdowns(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every block breakdown bench wrote (bench --breakdown), one per file × emulated target."""
    found = []
    for variant in variants:
        for path in sorted(Path(variant["bench"]).glob("*@*.json")):
            if path.name == "manifest.json":
                continue
            for run in json.loads(path.read_text()).get("runs", []):
                record = run.get("breakdown")
                if record and "parts" in record:
                    found.append({"id": f"{variant['name']}/{run['model']['file']}", "target": run["target"]["name"],
                                  **record})
    return found


def delegation(sidecar: ArtifactSidecar) -> dict[str, Any]:
    """What ran outside XNNPACK: compute ops left to portable kernels (.pte), or LiteRT ops not delegated; None
    for a format whose runtime has no delegate to leave ops to (.onnx in ONNX Runtime's CPU provider)."""
    if sidecar.delegation is None:
        return {"ops_outside": [], "fully_delegated": None}
    info = sidecar.delegation
    if "compute_ops_outside" in info:  # ExecuTorch's partitioner count
        outside = list(info.get("compute_ops_outside") or [])
        return {"ops_outside": outside, "fully_delegated": not outside}
    whole = bool(info.get("whole_graph_delegated", True))
    outside = [] if whole else [f"{info.get('graph_ops', '?')} op(s) outside {info.get('delegate_nodes', '?')} "
                                "XNNPACK delegate node(s)"]
    return {"ops_outside": outside, "fully_delegated": whole}


def reference_top1(variants: list[dict[str, Any]], manifest: Any) -> dict[str, Any]:
    """The float checkpoint's top-1 that drops are measured from: the one export computed in this run.

    Taken from a variant that neither prunes nor trains (its float reference is the checkpoint itself);
    without one, the fine-tuning manifest's test top-1, labelled as such.
    """
    for variant in variants:
        overrides = variant.get("overrides", {})
        path = Path(variant["export"]) / "manifest.json"
        if overrides.get("prune") or overrides.get("qat") or not path.is_file():
            continue
        export = read(path, ExportManifest)
        record = export.verification
        return {"top1": record.get("float_top1", (export.float_reference or {}).get("top1")),
                "images": record.get("images"), "source": f"float checkpoint in torch, measured by the "
                f"{variant['name']} export of this sweep on the test split"}
    test = manifest.metrics.get("test", {})
    return {"top1": test.get("top1"), "images": test.get("images"),
            "source": "float checkpoint's test top-1 from its fine-tuning manifest (no unpruned export succeeded)"}


def conditions(out: Path, variants: list[dict[str, Any]], config: SweepConfig,
               load_before: list[float] | None) -> dict[str, Any]:
    """How the figures were measured: threads, iterations, runtimes, CPUs, qemu, the host's load."""
    bench = config.bench
    found: dict[str, Any] = {"host_threads": list(bench.threads), "host_iters": bench.iters,
                             "host_warmup": bench.warmup, "host_samples": bench.samples, "arm_threads": 1,
                             "arm_iters": bench.arm_iters, "arm_warmup": bench.arm_warmup,
                             "arm_samples": bench.arm_samples, "load_average_before": load_before,
                             "load_average_after": _loadavg(), "runtimes": [], "host_cpu": None, "qemu": None,
                             "targets": {}, "versions": {}}
    runtimes: set[str] = set()
    for variant in variants:
        bench = Path(variant["bench"])
        manifest_path = bench / "manifest.json"
        if not manifest_path.is_file():
            continue
        manifest = read(manifest_path, BenchManifest)
        found["versions"] = manifest.versions
        runtimes.update(r.runtime for r in manifest.rows if r.runtime)
        for result_file in sorted(bench.glob("*@*.json")):
            result = json.loads(result_file.read_text())
            target = result["target"]
            found["targets"].setdefault(target["name"], target)
            for run in result["runs"]:
                if "failed" in run:
                    continue
                if not target["emulated"] and found["host_cpu"] is None:
                    cpu = run["platform"]["cpu"]
                    found["host_cpu"] = {"model": cpu.get("model_name"), "cores": cpu.get("cpu_count"),
                                         "machine": cpu.get("machine")}
                if target["emulated"] and found["qemu"] is None:
                    found["qemu"] = run.get("emulation", {}).get("qemu")
    found["runtimes"] = sorted(runtimes)
    names = [t.name for t in config.bench.parsed_targets()]  # ssh:pi@pi5 is filed as ssh-pi5
    found["targets"] = {name: found["targets"][name] for name in names if name in found["targets"]}
    return found


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _now() -> str:
    from edgetl.manifest import now_utc

    return now_utc()


__all__ = ["VARIANTS", "SweepConfig", "Variant", "resolve_config", "run_sweep"]
