"""The benchmark stage: every exported model × every target, measured by device_bench in a subprocess.

Why a subprocess: device_bench is the very script a user copies to a phone, so the host and emulated
figures come from the same code as the phone's.  On ARM64 targets it runs inside qemu-user (the guest
python for .tflite; the native runner for .pte), and the instruction-count plugin supplies the figure
that stands for phone cost: guest instructions per invoke.  Emulated wall time is kept but labelled
"emulated, not phone latency".
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl import __version__, formats
from edgetl.config import BenchOptions
from edgetl.contracts import (
    BENCH_KIND,
    BENCH_RESULT_KIND,
    SCHEMA_VERSION,
    ArtifactSidecar,
    BenchManifest,
    BenchRow,
    read,
)
from edgetl.errors import StageFailed, UserError
from edgetl.targets import BenchTarget, Runner
from edgetl.targets.local import EMULATED_LABEL

MODEL_SUFFIXES = tuple(formats.SUFFIXES)
DEFAULT_INPUTS = "test_inputs.npz"


@dataclass
class Artifact:
    """One model file and what the export stage said about it (its sidecar, when there is one)."""

    path: Path
    sidecar: ArtifactSidecar | None = None
    spec: dict[str, Any] = field(default_factory=dict)  # device_bench --inspect: input, output, macs
    sha256: str = ""
    modified: bool = False  # its sha256 differs from the one its sidecar recorded at export

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def macs(self) -> int | None:
        said = (self.sidecar.extra.get("macs"), self.sidecar.model.extra.get("macs")) if self.sidecar else ()
        for source in (self.spec.get("macs"), *said):
            if isinstance(source, int) and source > 0:
                return source
        return None


# ------------------------------------------------------------------------------------------- helpers


def device_bench_script() -> Path:
    """device_bench.py as shipped with edgetl, or where EDGETL_DEVICE_BENCH says."""
    env = os.environ.get("EDGETL_DEVICE_BENCH")
    if not env:
        from edgetl import assets

        return assets.file("device_bench", "device_bench.py")
    script = Path(env)
    if not script.is_file():
        raise UserError(f"device_bench script not found at {script}; set EDGETL_DEVICE_BENCH to device_bench.py")
    return script


def find_artifacts(export: Path) -> list[Artifact]:
    """The models to measure: the .tflite/.pte files of an export folder, or one such file."""
    if not export.exists():
        raise UserError(f"export folder {str(export)!r} does not exist; give the folder `edgetl export` wrote")
    if export.is_file():
        paths = [export]
        if export.suffix not in MODEL_SUFFIXES:
            raise UserError(f"{str(export)!r} is not a model; valid: a folder or a {' / '.join(MODEL_SUFFIXES)} file")
    else:
        paths = sorted(p for p in export.iterdir() if p.suffix in MODEL_SUFFIXES and p.is_file())
    if not paths:
        raise UserError(f"no .tflite or .pte files in {str(export)!r}; run `edgetl export` first")
    artifacts = []
    for path in paths:
        sidecar = path.with_name(path.name + ".json")
        described = read(sidecar, ArtifactSidecar) if sidecar.is_file() else None
        artifacts.append(Artifact(path.resolve(), described))
    return artifacts


def check_unmodified(artifacts: list[Artifact], allow_modified: bool) -> None:
    """A file that changed after export is not the file that export verified: refuse it, or mark it."""
    from edgetl.manifest import sha256_file
    from edgetl.ui import console

    for artifact in artifacts:
        artifact.sha256 = sha256_file(artifact.path)
        recorded = artifact.sidecar.sha256 if artifact.sidecar is not None else None
        if recorded is None or recorded == artifact.sha256:
            continue
        artifact.modified = True
        if not allow_modified:
            raise UserError(f"{artifact.name} does not match the sha256 in {artifact.name}.json (the file changed "
                            "after export, so it is not the file export verified): export it again, or pass "
                            "--allow-modified to benchmark it as it is")
        console.print(f"[yellow]bench: {artifact.name} changed after export (sha256 differs from its manifest); "
                      "benchmarked as it is, marked modified in the results[/]")


def default_out(export: Path) -> Path:
    """runs/NAME/export → runs/NAME/bench; any other folder → FOLDER/bench."""
    folder = export.parent if export.is_file() else export
    return folder.parent / "bench" if folder.name == "export" else folder / "bench"


def inspect(artifact: Artifact, script: Path, emulated: bool) -> None:
    """Ask device_bench on the host for the model's tensors and MACs (no timing).

    A host without the ExecuTorch Python runtime can still bench a .pte on ARM64 targets: the native
    runner, under qemu, then describes the input instead.
    """
    done = subprocess.run([sys.executable, str(script), str(artifact.path), "--inspect"], capture_output=True,
                          text=True, check=False)
    if done.returncode == 0:
        artifact.spec = json.loads(done.stdout)["model"]
        return
    message = next((ln for ln in done.stderr.splitlines() if "error:" in ln), done.stderr.strip()[-300:])
    native = formats.get(formats.format_of(artifact.path)).arm64 == "runner"  # edgetl's runner can describe it
    if native and emulated and re.search(r"\bno [\w-]+ runtime\b", message):  # device_bench: no runtime here
        from edgetl import arm64

        userland = arm64.userland()
        if userland.has_runner():
            cmd = [*userland.qemu_command(arm64.TARGETS["arm64-a76"], None), str(userland.runner), str(artifact.path)]
            described = subprocess.run(cmd, capture_output=True, text=True, env=userland.env(), check=False)
            if described.returncode == 0:
                artifact.spec = {"input": json.loads(described.stdout.strip().splitlines()[-1])["input"]}
                return
            message = (described.stderr.strip().splitlines() or [message])[-1]
    raise UserError(f"{artifact.name}: {message.removeprefix('device_bench: error: ')}")


def check_inputs(npz: Path) -> None:
    """The inputs .npz holds what device_bench takes, checked once before any run: then a run that fails is
    that file's failure on that target (a failed row), never bad input repeated on every row."""
    import numpy as np

    valid = "valid: an .npz with x (N, the model's input shape) and optional y (N,) integer labels"
    try:
        with np.load(npz, allow_pickle=False) as data:
            names = list(data.files)
            x = data["x"] if "x" in names else None
            y = data["y"] if "y" in names else None
    except (OSError, ValueError, EOFError) as error:  # not a zip, a pickled array, a truncated member
        raise UserError(f"inputs {str(npz)!r} is not a readable .npz ({' '.join(str(error).split())}); {valid}") \
            from None
    if x is None:
        raise UserError(f"inputs {str(npz)!r} has no array 'x' (found {', '.join(names) or 'none'}); {valid}")
    if x.ndim < 1 or len(x) == 0:
        raise UserError(f"inputs {str(npz)!r}: x holds no samples (shape {tuple(x.shape)}); {valid}")
    if y is not None and (y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer)):
        raise UserError(f"inputs {str(npz)!r}: y has shape {tuple(y.shape)} {y.dtype}; valid: ({len(x)},) "
                        "integer labels, one per sample of x")


def prepare_inputs(npz: Path | None, artifact: Artifact, workdir: Path) -> Path | None:
    """The inputs file for this model: the given one, or a copy turned NHWC↔NCHW if that is what it wants.

    The export folder holds one test_inputs.npz for files of both layouts; device_bench itself refuses a
    mismatch, so the transposition happens here, on the host, and only when it makes the shapes agree.
    """
    if npz is None:
        return None
    import numpy as np

    want = artifact.spec.get("input", {}).get("shape")
    if not want:
        return npz
    with np.load(npz, allow_pickle=False) as data:
        if "x" not in data.files:
            raise UserError(f"inputs {str(npz)!r} has no array 'x' (found {', '.join(data.files)}); "
                            "valid: x (N, input shape) and y (N,) int labels")
        x = data["x"]
        dtype = artifact.spec.get("input", {}).get("dtype")
        quantized_here = dtype in ("int8", "uint8") and np.issubdtype(x.dtype, np.floating)
        if dtype and str(x.dtype) != dtype and not quantized_here:
            raise UserError(f"inputs {str(npz)!r}: x is {x.dtype}; {artifact.name} takes {dtype}"
                            + (" (or float, quantized with its own scale)" if dtype in ("int8", "uint8") else ""))
        if tuple(x.shape[1:]) == tuple(want[1:]):
            return npz
        arrays = {k: data[k] for k in data.files}
    if x.ndim == 4:
        for axes in ((0, 3, 1, 2), (0, 2, 3, 1)):
            turned = x.transpose(axes)
            if tuple(turned.shape[1:]) == tuple(want[1:]):
                arrays["x"] = np.ascontiguousarray(turned)
                out = workdir / f"{artifact.name}.inputs.npz"
                np.savez(out, **arrays)
                return out
    raise UserError(f"inputs {str(npz)!r}: x has shape {tuple(x.shape)}; {artifact.name} wants "
                    f"(N, {', '.join(str(d) for d in want[1:])}) in either NHWC or NCHW")


def slice_inputs(npz: Path | None, samples: int, workdir: Path) -> Path | None:
    """The first N samples only, for emulated runs: the guest then reads (and holds) only what it scores."""
    if npz is None:
        return None
    import numpy as np

    with np.load(npz, allow_pickle=False) as data:
        if len(data["x"]) <= samples:
            return npz
        arrays = {k: data[k][:samples] for k in data.files}
    out = workdir / f"{npz.stem}.first{samples}.npz"
    np.savez(out, **arrays)
    return out


# --------------------------------------------------------------------------------------------- runs


def breakdown(artifact: Artifact, target: BenchTarget, runner: Runner, whole: dict[str, Any], options: BenchOptions,
              script: Path, workdir: Path) -> dict[str, Any]:
    """Guest instructions per invoke of each network block, counted like the whole (see edgetl.breakdown)."""
    from edgetl import breakdown as blocks
    from edgetl.ui import console

    fmt = artifact.path.suffix.lstrip(".")
    how = formats.get(fmt).blocks
    if how not in BLOCK_CUTTERS:
        reason = f"no way to run a .{fmt} block by block yet (valid: " + ", ".join(
            f".{f.suffix.lstrip('.')}" for f in formats.FORMATS.values() if f.blocks in BLOCK_CUTTERS) + ")"
        console.print(f"[yellow]bench: no breakdown of {artifact.name}: {reason}[/]")
        return {"unavailable": reason}
    folder = workdir / f"{artifact.name}.parts"
    folder.mkdir(exist_ok=True)
    try:
        cuts = BLOCK_CUTTERS[how](artifact, folder)
    except UserError as error:  # e.g. a .tflite whose tensors name no blocks: everything else is still measured
        console.print(f"[yellow]bench: no breakdown of {artifact.name}: {error}[/]")
        return {"unavailable": str(error)}
    parts = []
    for piece, entry in cuts:
        console.print(f"bench: {artifact.name} @ {target.name}: {entry['name']} ...")
        try:
            inspect(piece, script, emulated=True)
            counted = runner.run(piece, 1, None, options, folder)
        except UserError as error:  # a part that does not run alone costs the breakdown, never the whole's figures
            counted = {"failed": str(error)}
        entry.update(macs=entry.get("macs") or piece.macs, input=piece.spec.get("input"),
                     output=piece.spec.get("output"))
        if "failed" in counted:  # a sum without this part would mislead: no breakdown, the whole still stands
            reason = f"block {entry['name']} failed to run alone: {counted['failed']}"
            console.print(f"[red]bench: no breakdown of {artifact.name} @ {target.name}: {reason}[/]")
            return {"unavailable": reason}
        emulation = counted["emulation"]
        entry.update(instructions_per_invoke=emulation["instructions_per_invoke"], spread=emulation["spread"],
                     per_invoke=emulation["per_invoke"])
        parts.append(entry)
    record = blocks.summarize(parts, whole["emulation"]["instructions_per_invoke"], whole["model"].get("macs"), fmt)
    sensitivity = _export_sensitivity(artifact)
    if sensitivity is not None:
        blocks.attribute_int8_loss(record, sensitivity)
    return record


def _tflite_cuts(artifact: Artifact, folder: Path) -> list[tuple[Artifact, dict[str, Any]]]:
    """Each block cut out of the .tflite itself, as a file of its own."""
    from edgetl import breakdown as blocks

    return [(Artifact(blocks.write_part(artifact.path, part, folder / f"{part.name}.tflite")),
             {"name": part.name, "role": part.role, "operators": [part.first_op, part.last_op]})
            for part in blocks.tflite_parts(artifact.path)]


def _lowered_cuts(artifact: Artifact, folder: Path) -> list[tuple[Artifact, dict[str, Any]]]:
    """The blocks `edgetl export --parts` lowered for this very .pte (same sha256)."""
    from edgetl import breakdown as blocks

    return [(Artifact(part["path"]), {"name": part["name"], "role": part["role"], "file": part["file"],
                                      "macs": part.get("macs")})
            for part in blocks.pte_parts(artifact.path, artifact.sha256)]


# Format.blocks → how bench --breakdown gets a file's blocks: cut out of the file, or lowered one by one at export
BLOCK_CUTTERS = {"cut": _tflite_cuts, "lowered": _lowered_cuts}


def _export_sensitivity(artifact: Artifact) -> dict[str, Any] | None:
    """The per-layer int8 sensitivity table of the export an int8 file belongs to (its folder's manifest), if any."""
    if artifact.sidecar is None or artifact.sidecar.quant != "int8":
        return None
    path = artifact.path.parent / "manifest.json"
    try:
        table = (json.loads(path.read_text()).get("quantization") or {}).get("sensitivity")
    except (OSError, ValueError):
        return None
    return table if isinstance(table, dict) and isinstance(table.get("rows"), list) else None


def _fill_macs(artifacts: list[Artifact]) -> None:
    """The files exported from one model (one name, another format) share its MACs; counted once, on the file
    whose format device_bench counts them in (.tflite), and given to the others."""
    by_stem = {a.path.stem: a.macs for a in artifacts if a.macs}
    for artifact in artifacts:
        if not artifact.macs and artifact.path.stem in by_stem:
            artifact.spec["macs"] = by_stem[artifact.path.stem]


def row(result: dict[str, Any]) -> dict[str, Any]:
    """The flat line of the table and of the report for one result (a contracts.BenchRow, as JSON)."""
    target = result["target"]
    if "failed" in result:
        return BenchRow(artifact=result["artifact"], target=target["name"], threads=result["conditions"]["threads"],
                        failed=result["failed"]).to_json()
    timing, accuracy, emulation = result["timing_ms"], result.get("accuracy"), result.get("emulation")
    return BenchRow(
        artifact=result["model"]["file"], target=target["name"], emulated=target["emulated"],
        threads=result["conditions"]["threads"],
        runtime=f"{result['runtime']['name']} {result['runtime']['version']}",
        p50_ms=timing["p50"], p90_ms=timing["p90"], load_ms=timing["load"],
        latency_label=EMULATED_LABEL if target["emulated"] else
        f"wall time on {target['name']}" if target.get("remote") else "host wall time",
        top1=accuracy["top1"] if accuracy else None, top1_samples=accuracy["samples"] if accuracy else None,
        instructions_per_invoke=emulation["instructions_per_invoke"] if emulation else None,
        macs=result["model"].get("macs"),
        instructions_per_mac=emulation["instructions_per_mac"] if emulation else None,
        size_bytes=result["model"]["size_bytes"], peak_rss_kb=result["memory"]["peak_rss_kb"],
        model_rss_kb=result["memory"].get("peak_rss_before_inputs_kb") or result["memory"]["peak_rss_kb"],
        modified_since_export=bool(result["model"].get("modified_since_export")),
    ).to_json()


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """int8/fp32 instruction ratios per target, for files whose names differ only by int8/fp32."""
    found = []
    counts = {(r["artifact"], r["target"]): r["instructions_per_invoke"] for r in rows
              if r.get("instructions_per_invoke")}
    for (name, target), int8 in counts.items():
        if "int8" not in name:
            continue
        fp32 = counts.get((name.replace("int8", "fp32"), target))
        if fp32:
            found.append({"int8": name, "fp32": name.replace("int8", "fp32"), "target": target,
                          "ratio": int8 / fp32})
    return found


# ------------------------------------------------------------------------------------------ output


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[dict[str, Any]], found_ratios: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from edgetl.ui import stdout

    # Piped output (CI logs, files) would wrap a 12-column table at 80 characters: give it room instead.
    out = stdout if stdout.is_terminal else Console(width=200, highlight=False)
    table = Table(title="edgetl bench", caption=f"ARM64 rows: wall time is {EMULATED_LABEL}; the ARM cost figure "
                  "is guest instructions per invoke (qemu TCG plugin). RSS: peak after load and first invoke, "
                  "before the inputs are read (.pte runner: its whole run; under qemu, the emulator's)")
    for name, justify in (("artifact", "left"), ("target", "left"), ("thr", "right"), ("runtime", "left"),
                          ("p50 ms", "right"), ("p90 ms", "right"), ("top-1", "right"), ("instr/invoke", "right"),
                          ("MACs", "right"), ("instr/MAC", "right"), ("size MB", "right"), ("RSS MB", "right")):
        table.add_column(name, justify=justify)
    for r in rows:
        if "failed" in r:
            table.add_row(r["artifact"], r["target"], str(r["threads"]), f"[red]failed: {r['failed']}[/]")
            continue
        latency = f"{r['p50_ms']:.3f}" + (" (emul.)" if r["emulated"] else "")
        top1 = f"{r['top1']:.3f} ({r['top1_samples']})" if r["top1"] is not None else "–"
        instr = f"{r['instructions_per_invoke'] / 1e6:.3f} M" if r["instructions_per_invoke"] else "–"
        table.add_row(r["artifact"], r["target"], str(r["threads"]), r["runtime"], latency,
                      f"{r['p90_ms']:.3f}", top1, instr, f"{r['macs'] / 1e6:.2f} M" if r["macs"] else "–",
                      _fmt(r["instructions_per_mac"], 3), f"{r['size_bytes'] / 1e6:.2f}",
                      _fmt(r["model_rss_kb"] / 1024 if r["model_rss_kb"] else None, 0))
    out.print(table)
    for found in found_ratios:
        out.print(f"int8/fp32 instructions on {found['target']}: {found['ratio']:.3f} "
                     f"({found['int8']} vs {found['fp32']})")


def print_breakdowns(results: list[dict[str, Any]]) -> None:
    """Each counted breakdown as a table: the blocks, their MACs, instructions, share and instructions per MAC."""
    from rich.console import Console
    from rich.table import Table

    from edgetl.ui import stdout

    out = stdout if stdout.is_terminal else Console(width=200, highlight=False)
    for result in results:
        record = result.get("breakdown")
        if not record:
            continue
        title = f"where the instructions go: {result['model']['file']} @ {result['target']['name']}"
        if "parts" not in record:
            out.print(f"{title}: unavailable ({record['unavailable']})")
            continue
        whole = record["whole_instructions_per_invoke"]
        lowered = formats.FORMATS.get(record.get("format", ""), formats.get("tflite")).blocks == "lowered"
        how = "lowered on its own (--parts)" if lowered else "cut out of the file"
        table = Table(title=title, caption=f"each block {how} and counted alone; the parts sum to "
                      f"{record['sum_of_parts'] / 1e6:.3f} M against {whole / 1e6:.3f} M for the whole "
                      f"({record['sum_minus_whole_relative']:+.1%}): per-invoke overhead once per part")
        for name in ("block", "role", "ops", "MACs", "instr/invoke", "share", "instr/MAC", "int8 loss"):
            table.add_column(name, justify="left" if name in ("block", "role") else "right")
        for part in record["parts"]:
            loss = part.get("int8_loss_share")
            ops = part["operators"][1] - part["operators"][0] + 1 if part.get("operators") else None
            table.add_row(part["name"], part["role"], "–" if ops is None else str(ops),
                          f"{part['macs'] / 1e6:.3f} M" if part.get("macs") else "–",
                          f"{part['instructions_per_invoke'] / 1e3:.1f} k", f"{part['share_of_whole']:.1%}",
                          _fmt(part["instructions_per_mac"], 3), "–" if loss is None else f"{loss:.1%}")
        out.print(table)
        if record.get("int8_loss_share_source"):
            out.print(f"int8 loss: {record['int8_loss_share_source']}")


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Top-1 against instructions per invoke (ARM targets) and against host p50 latency.

    Colour names the artifact, the marker the target (host points: filled for 1 thread, hollow for more),
    so points that sit on top of each other stay readable through the legend.
    """
    usable = [r for r in rows if "failed" not in r and r.get("top1") is not None]
    if not usable:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    artifacts = sorted({r["artifact"] for r in usable})
    targets = sorted({r["target"] for r in usable})
    colours = plt.get_cmap("tab10")
    markers = "osD^v<>pP*"
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    for r in usable:
        colour = colours(artifacts.index(r["artifact"]) % 10)
        marker = markers[targets.index(r["target"]) % len(markers)]
        if r["instructions_per_invoke"]:
            left.scatter(r["instructions_per_invoke"] / 1e6, r["top1"], color=colour, marker=marker, s=60)
        if not r["emulated"]:
            face = colour if r["threads"] == 1 else "none"
            right.scatter(r["p50_ms"], r["top1"], edgecolors=colour, facecolors=face, marker=marker, s=60)
    left.set(xlabel="guest instructions per invoke, millions (qemu 7.2 TCG count, 1 thread)", ylabel="top-1",
             title="top-1 vs ARM64 instructions per invoke")
    right.set(xlabel="host p50 latency, ms (filled: 1 thread, hollow: more)", ylabel="top-1",
              title="top-1 vs host latency")
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=colours(i % 10), marker="o", linestyle="", label=name)
               for i, name in enumerate(artifacts)]
    handles += [Line2D([], [], color="grey", marker=markers[i % len(markers)], linestyle="", label=name)
                for i, name in enumerate(targets)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * (len(handles) // 4), 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _write(path: Path, payload: Any) -> None:
    from edgetl.paths import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=float) + "\n").encode())


def _stage_report(out: Path, rows: list[dict[str, Any]], found_ratios: list[dict[str, Any]]
                  ) -> tuple[Path, Path] | None:
    """runs/NAME/report.json with its `bench` section added (or replaced), when bench sits in a run folder:
    (staged, final). It is written under a temporary name beside the report as the last step before the bench
    folder is published, so a full disk stops the stage with the previous results intact; after publication
    only a rename is left to do. A run killed in between leaves the temporary file, which the next run removes
    (`clean_stale`)."""
    if out.name != "bench":
        return None
    from edgetl.paths import stage_bytes

    report = out.parent / "report.json"
    try:
        document = json.loads(report.read_text()) if report.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        document = {}
    if not isinstance(document, dict):
        document = {}
    document["bench"] = {"rows": rows, "int8_fp32_instruction_ratios": found_ratios,
                         "manifest": str(out / "manifest.json")}
    return stage_bytes(report, (json.dumps(document, indent=2, default=float) + "\n").encode()), report


# ---------------------------------------------------------------------------------------- the stage


def setup_userland(kind: str) -> dict[str, Any]:
    """`edgetl bench --setup arm64`: provision the emulated userland now, printing what it does."""
    from edgetl import arm64
    from edgetl.ui import console

    if kind != "arm64":
        raise UserError(f"unknown set-up {kind!r}; valid: arm64")
    record = arm64.setup(lambda message: console.print(message))
    steps = ", ".join(f"{name} {step['seconds']:.1f} s" for name, step in record["steps"].items())
    console.print(f"arm64 userland ready in {arm64.arm64_root()} (set-up took {record['total_seconds']:.1f} s: "
                  f"{steps}; {record['steps']['qemu-user'].get('qemu_version', 'qemu')})")
    return record


def _named(rows: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['artifact']} @ {r['target']} t{r['threads']}" for r in rows)


def _inputs(given: Path | None, folder: Path) -> Path | None:
    """The inputs .npz: the one given, else the export's test inputs when there are some; checked."""
    inputs = Path(given) if given is not None else None
    if inputs is None and (folder / DEFAULT_INPUTS).is_file():
        inputs = folder / DEFAULT_INPUTS
    if inputs is not None and not inputs.is_file():
        raise UserError(f"inputs {str(inputs)!r} does not exist; give an .npz with x and y")
    if inputs is not None:
        check_inputs(inputs)
    return inputs


def _emulated_userland(artifacts: list[Artifact]) -> None:
    """Set up (or check) the emulated ARM64 userland, with the native runner when a file needs it."""
    from edgetl import arm64
    from edgetl.ui import console

    needs_runner = any(formats.get(formats.format_of(a.path)).arm64 == "runner" for a in artifacts)
    if not arm64.ready(pte=needs_runner):
        console.print("arm64 userland not set up yet: setting it up now (once; about a minute)")
    setup_userland("arm64")


def _run_one(artifact: Artifact, target: BenchTarget, runner: Runner, threads: int, inputs: Path | None,
             options: BenchOptions, script: Path, workdir: Path) -> dict[str, Any]:
    """One file on one target at one thread count (and its blocks, with --breakdown); a failure is its row."""
    from edgetl.ui import console

    what = f"{artifact.name} @ {target.name}, {threads} thread{'s' if threads > 1 else ''}"
    console.print(f"bench: {what} ...")
    result = runner.run(artifact, threads, inputs, options, workdir)
    if artifact.modified and "model" in result:
        result["model"]["modified_since_export"] = True
    if options.breakdown and target.emulated and "failed" not in result:
        result["breakdown"] = breakdown(artifact, target, runner, result, options, script, workdir)
    if "failed" in result:
        console.print(f"[red]bench: {what} failed: {result['failed']}[/]")
    return result


def _manifest(folder: Path, artifacts: list[Artifact], inputs: Path | None, targets: list[BenchTarget],
              thread_counts: list[int], options: BenchOptions, folder_out: Path, figure: Path | None,
              rows: list[dict[str, Any]], found_ratios: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """The bench folder's manifest: what was measured, where, how, with which libraries."""
    from edgetl import arm64
    from edgetl.manifest import library_versions, now_utc

    made = {formats.format_of(a.path) for a in artifacts}
    libraries = [lib for name in formats.FORMATS if name in made for lib in formats.get(name).libraries]
    return BenchManifest(
        created=now_utc(), edgetl=__version__,
        source={"path": str(folder.resolve()), "artifacts": {a.name: a.sha256 for a in artifacts},
                "modified_since_export": sorted(a.name for a in artifacts if a.modified),
                "inputs": str(Path(inputs).resolve()) if inputs else None},
        conditions={"targets": [t.name for t in targets], "host_threads": thread_counts,
                    "remote_threads": thread_counts if any(t.remote for t in targets) else None,
                    "taskset": options.taskset,
                    "arm_threads": 1, "iters": options.iters, "warmup": options.warmup,
                    "samples": options.samples, "arm_iters": options.arm_iters,
                    "arm_warmup": options.arm_warmup, "arm_samples": options.arm_samples,
                    "breakdown": options.breakdown},
        files=sorted(p.name for p in folder_out.glob("*@*.json")), plot=figure.name if figure else None,
        rows=tuple(BenchRow.from_json(r, "bench rows") for r in rows), int8_fp32_instruction_ratios=found_ratios,
        arm64_setup=arm64.status() if any(t.emulated for t in targets) else None,
        versions=library_versions(("numpy", *dict.fromkeys(libraries), "matplotlib")),
        seconds=round(time.perf_counter() - started, 1),
    ).to_json()


def run_bench(export: Path, options: BenchOptions, strict: bool = False) -> Path:
    """Measure every artifact on every target; write bench/*.json, the manifest, the plot; print the table.

    A run that fails is a failed row and the others go on. `strict` (the CLI: scripts and CI read the exit
    status) then raises StageFailed, exit 1: after publishing when some rows worked, since their figures are
    worth keeping; before publishing when none did, so the previous results stay. A sweep is not strict:
    it records failed rows per variant.
    """
    from edgetl.ui import console

    options = options.validate()
    targets, thread_counts = options.parsed_targets(), list(options.threads)
    for target in targets:
        if target.remote:  # an unreachable board or an unusable phone costs nothing yet
            target.preflight(options.remote_python, options.taskset)
    export = Path(export)
    artifacts = find_artifacts(export)
    folder = export if export.is_dir() else export.parent
    inputs = _inputs(options.inputs, folder)
    script = device_bench_script()
    check_unmodified(artifacts, options.allow_modified)
    from edgetl.paths import atomic_dir, claim_output, clean_stale, ensure_writable_dir

    out = claim_output(Path(options.out) if options.out else default_out(export), BENCH_KIND,
                       [export, Path(inputs) if inputs else None])
    ensure_writable_dir(out.parent, "bench folder")
    clean_stale(out.parent / "report.json")  # a run report staged by a killed run
    if any(t.emulated for t in targets):
        _emulated_userland(artifacts)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    with (tempfile.TemporaryDirectory(prefix="edgetl-bench-") as tmp, atomic_dir(out) as folder_out,
          contextlib.ExitStack() as remotes):
        workdir = Path(tmp)
        for artifact in artifacts:
            inspect(artifact, script, emulated=any(t.emulated for t in targets))
        _fill_macs(artifacts)
        runners = {target.name: target.open([a.path for a in artifacts], options, script, remotes)
                   for target in targets}
        for runner in runners.values():  # every target's checks passed: now copy
            runner.stage()
        for artifact in artifacts:
            model_inputs = prepare_inputs(Path(inputs) if inputs else None, artifact, workdir)
            arm_inputs = (slice_inputs(model_inputs, options.arm_samples, workdir)
                          if any(t.emulated for t in targets) else None)
            for target in targets:
                target_runs = [_run_one(artifact, target, runners[target.name], threads,
                                        arm_inputs if target.emulated else model_inputs, options, script, workdir)
                               for threads in ([1] if target.emulated else thread_counts)]
                results.extend(target_runs)
                _write(folder_out / f"{artifact.name}@{target.name}.json",
                       {"schema_version": SCHEMA_VERSION, "kind": BENCH_RESULT_KIND, "artifact": artifact.name,
                        "target": target.record(), "runs": target_runs})
        rows = [row(r) for r in results]
        failed = [r for r in rows if "failed" in r]
        if strict and failed and len(failed) == len(rows):
            raise StageFailed(f"bench: every run failed ({_named(failed)}; the first: {failed[0]['failed']}); "
                              f"nothing published, {str(out)!r} is unchanged")
        found_ratios = ratios(rows)
        print_table(rows, found_ratios)
        print_breakdowns(results)
        figure = plot(rows, folder_out / "bench.png")
        manifest = _manifest(folder, artifacts, inputs, targets, thread_counts, options, folder_out, figure, rows,
                             found_ratios, started)
        _write(folder_out / "manifest.json", manifest)
        staged = _stage_report(out, rows, found_ratios)  # the last step before publication
    report = None
    if staged is not None:
        try:
            os.replace(*staged)
        except OSError as error:
            raise StageFailed(f"bench: results are published in {str(out)!r}, but the run's report {str(staged[1])!r} "
                              f"could not be updated ({error.strerror or error}); run bench again to add them to "
                              "it") from None
        report = staged[1]
    console.print(f"bench: results in {out}" + (f"; plot {out / figure.name}" if figure else
                                               "; no plot (no top-1: no inputs)")
                  + (f"; rows added to {report}" if report else ""))
    if strict and failed:
        raise StageFailed(f"bench: {len(failed)} of {len(rows)} runs failed ({_named(failed)}; the first: "
                          f"{failed[0]['failed']}); the {len(rows) - len(failed)} that worked are in {out}")
    return out


__all__ = ["BenchOptions", "run_bench", "setup_userland"]  # BenchOptions is config.BenchOptions
