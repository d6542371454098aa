"""The numerics debugger (`edgetl export --debug-numerics`): where an int8 file's runtime parts from its quantized
graph, block by block, in LiteRT and ExecuTorch side by side.

For a few calibration images, every block boundary (stem, each inverted-residual block, head) is read in four
places: the float model, the PT2E Q/DQ graph both files were converted from, and each runtime. A runtime's
intermediate tensors are not visible inside its XNNPACK delegate, so each block runs in the runtime as a file of
its own, with the same kernels as the whole file: a .tflite block is cut out of the exported .tflite (the operators,
tensors and quantization of the file itself); a .pte block is that block of the Q/DQ graph lowered on its own,
as `--parts` does, and is compared with the graph as lowered (where lowering rewrites it, as each hardswish becomes
XNNPACK's int8 operator with one rounding fewer, that graph's output, computed in torch). Each block is run twice:
- chained: fed the runtime's own output of the block before, so errors accumulate as in the whole file (the last
  block's output is checked against the whole file's);
- alone: fed the Q/DQ graph's input to that block, so its difference from the graph's output is that block's own.
A block *departs* from the graph when, alone, more than `DEPARTS_SHARE` of its output values differ from the
graph's by more than one step of the int8 grid: rounding one value differently moves it by one step, so only
something else (a kernel computing another function, a range clamped, a float island) moves many values further.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import formats
from edgetl.backends.base import one_line
from edgetl.errors import machine_failure

DEPARTS_SHARE = 0.01  # share of a block's output values further than one int8 step from the graph's
KIND = "edgetl.numerics"


def _sqnr(values: np.ndarray, reference: np.ndarray) -> float:
    noise = float(np.sum((values - reference) ** 2))
    signal = float(np.sum(reference**2))
    return math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)


def error(values: np.ndarray, reference: np.ndarray) -> dict[str, float | None]:
    """SQNR (dB), cosine similarity and max |Δ| of `values` against `reference` (same shape, images first).

    The batch SQNR weighs each image by its energy, so a few images with outsized activations dominate it; the
    median of the images' own SQNRs (`sqnr_db_median_image`) says what a typical image sees."""
    per_image = [_sqnr(v, r) for v, r in zip(values.astype(np.float64), reference.astype(np.float64), strict=True)]
    values, reference = values.astype(np.float64).reshape(-1), reference.astype(np.float64).reshape(-1)
    noise = float(np.sum((values - reference) ** 2))
    norms = float(np.linalg.norm(values) * np.linalg.norm(reference))
    cosine = float(values @ reference / norms) if norms > 0 else (1.0 if noise == 0 else 0.0)
    return {"sqnr_db": _finite(_sqnr(values, reference)),
            "sqnr_db_median_image": _finite(float(np.median(per_image))) if per_image else None,
            "cosine": round(cosine, 6),
            "max_abs": round(float(np.max(np.abs(values - reference))) if values.size else 0.0, 6)}


def _finite(value: float) -> float | None:
    """JSON has no infinity: an exact match (no noise) is recorded as null and printed as 'exact'."""
    return round(value, 2) if math.isfinite(value) else None


def departure(values: np.ndarray, graph: np.ndarray, step: float | None) -> dict[str, Any]:
    """How far a block's runtime output lies from the graph's, in steps of the int8 grid of that output."""
    if not step:
        return {"steps_max": None, "share_over_1_step": None, "departs": False}
    steps = np.abs(values.astype(np.float64) - graph.astype(np.float64)) / step
    share = float(np.mean(steps > 1.001)) if steps.size else 0.0  # float32 values: not exactly 1
    return {"steps_max": round(float(steps.max()) if steps.size else 0.0, 2), "share_over_1_step": round(share, 5),
            "departs": share > DEPARTS_SHARE}


def _key(block: Any) -> str:
    """Blocks match by module path; the stem and the head by role, since the two cuts name the modules around
    them differently (the graph by its weighted layers, the .tflite by every named operator)."""
    return block.name if block.role == "block" else block.role


class TfliteBlocks:
    """The exported .tflite cut into the same blocks (breakdown.tflite_parts), each a file run by LiteRT with its
    default XNNPACK delegate, like the whole."""

    def __init__(self, model: Path, signals: list[Any], folder: Path) -> None:  # noqa: ARG002 - cut from the file
        from edgetl.breakdown import tflite_parts, write_part
        from edgetl.formats.tflite import interpreter

        self.files: dict[str, Path] = {}
        for index, part in enumerate(tflite_parts(model)):
            self.files[_key(part)] = write_part(model, part, folder / f"{index:02d}.tflite")
        self._interpreter = interpreter

    @staticmethod
    def expected(signal: Any) -> np.ndarray:
        """What the block should give: the .tflite is converted from the shared graph itself."""
        return signal.graph_output

    def run(self, name: str, inputs: list[np.ndarray]) -> np.ndarray:
        from edgetl.formats.tensors import dequantize, quantize

        model = self._interpreter(self.files[name])
        sources, target = model.get_input_details(), model.get_output_details()[-1]
        if len(sources) != len(inputs):
            raise ValueError(f"the .tflite block reads {len(sources)} tensor(s), the graph's {len(inputs)}")
        outputs = []
        for image in range(len(inputs[0])):
            for source, values in zip(sources, inputs, strict=True):
                x = values[image : image + 1].reshape(source["shape"])
                dtype = np.dtype(source["dtype"])
                scale, zero = source["quantization"]
                x = quantize(x, scale, int(zero), dtype) if dtype.kind in "iu" else x.astype(dtype)
                model.set_tensor(source["index"], np.ascontiguousarray(x))
            model.invoke()
            result = model.get_tensor(target["index"])
            dtype = np.dtype(target["dtype"])
            scale, zero = target["quantization"]
            outputs.append(dequantize(result, scale, int(zero)) if dtype.kind in "iu" else result.astype(np.float32))
        return np.concatenate(outputs).astype(np.float32)


class PteBlocks:
    """Each block of the Q/DQ graph lowered to a .pte of its own, run in the ExecuTorch runtime."""

    def __init__(self, model: Path, signals: list[Any], folder: Path) -> None:  # noqa: ARG002 - from the graph
        self.files = {}
        for index, signal in enumerate(signals):
            if signal.pte is not None:
                path = folder / f"{index:02d}.pte"
                path.write_bytes(signal.pte)
                self.files[_key(signal)] = path

    @staticmethod
    def expected(signal: Any) -> np.ndarray:
        """What the block should give: the graph each block was lowered from, where it is not the shared one (the
        .pte runs each hardswish as one int8 operator, one rounding fewer), else the shared graph's output."""
        lowered = getattr(signal, "lowered_output", None)
        return signal.graph_output if lowered is None else lowered

    def run(self, name: str, inputs: list[np.ndarray]) -> np.ndarray:
        from edgetl.formats.pte import run_inputs

        return run_inputs(self.files[name], inputs)


# Format.blocks → how the debugger runs a file block by block: blocks "cut" out of the file, or the graph's blocks
# "lowered" one by one (block_signals lowers them when asked)
BLOCK_RUNNERS = {"cut": TfliteBlocks, "lowered": PteBlocks}


def _compare_runtime(signals: list[Any], runner: Any, whole: Callable[[], np.ndarray] | None,
                     selected: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every block (every `selected` one, when any is) of one runtime, chained and alone, against the float model and
    the graph. A chain stops at the first block not run: later blocks are then compared alone only."""
    rows: list[dict[str, Any]] = []
    chained: dict[str, np.ndarray] = {}
    broken = False
    for signal in signals:
        row: dict[str, Any] = {"block": signal.name}
        if selected and signal.name not in selected:
            row["not_selected"] = True
            broken = True
            rows.append(row)
            continue
        if _key(signal) not in runner.files:
            row["skipped"] = "; ".join(signal.notes) or "the runtime's file has no block of this name"
            broken = True
            rows.append(row)
            continue
        try:
            alone = runner.run(_key(signal), signal.graph_inputs).reshape(signal.graph_output.shape)
            expected = runner.expected(signal)
            row["alone"] = departure(alone, expected, signal.step)
            row["alone"].update({"vs_graph": error(alone, expected)})
            if expected is not signal.graph_output:
                row["alone"]["against"] = "the graph as lowered to this file"
            if not broken:
                inputs = [chained.get(key, values) for key, values in zip(signal.input_keys, signal.graph_inputs,
                                                                           strict=True)]
                output = runner.run(_key(signal), inputs).reshape(signal.graph_output.shape)
                chained[signal.output_key] = output
                if signal.float_output is not None:
                    row["chained_vs_float"] = error(output, signal.float_output)
        except Exception as failure:  # noqa: BLE001 - a block that will not run is reported, the rest still are
            if machine_failure(failure) is not None:
                raise
            row["skipped"] = f"it did not run ({one_line(failure)})"
            broken = True
        rows.append(row)
    record: dict[str, Any] = {"blocks": rows}
    if whole is not None and not broken and signals and signals[-1].output_key in chained:
        record["chain_vs_whole_file"] = error(chained[signals[-1].output_key], whole())
    return record


def debug_numerics(signals: list[Any], files: dict[str, Path], images: np.ndarray,
                   threads: int | None = None, selected: tuple[str, ...] = ()) -> dict[str, Any]:
    """The debugger's record for the int8 `files` (format → path) on `images`: per block, the graph's error
    against float and each runtime's, chained and alone, and the first block where a runtime departs."""
    blocks = []
    for signal in signals:
        row: dict[str, Any] = {"block": signal.name, "role": signal.role, "macs": signal.macs, "step": signal.step}
        if signal.float_output is not None:
            row["graph_vs_float"] = error(signal.graph_output, signal.float_output)
        if signal.notes:
            row["notes"] = list(signal.notes)
        blocks.append(row)
    record: dict[str, Any] = {"kind": KIND, "images": int(len(images)), "departs_share": DEPARTS_SHARE,
                              "method": __doc__.split("\n\n", 1)[1].strip().replace("\n", " "),
                              "blocks": blocks, "runtimes": {}}
    if selected:
        record["selected"] = list(selected)
    with tempfile.TemporaryDirectory(prefix="edgetl-numerics-") as scratch:
        for fmt, path in files.items():
            folder = Path(scratch) / fmt
            folder.mkdir()
            try:
                runner = BLOCK_RUNNERS[formats.get(fmt).blocks](path, signals, folder)
            except Exception as failure:  # noqa: BLE001 - a file that cannot be cut: said, the other still runs
                if machine_failure(failure) is not None:
                    raise
                record["runtimes"][fmt] = {"file": path.name, "skipped": f"cannot be cut into blocks "
                                                                         f"({one_line(failure)})"}
                continue
            result = _compare_runtime(signals, runner, lambda p=path: formats.run(p, images, threads), selected)
            result["file"] = path.name
            departing = [row["block"] for row in result["blocks"] if row.get("alone", {}).get("departs")]
            result["departs_at"] = departing
            result["could_not_compare"] = [row["block"] for row in result["blocks"] if "skipped" in row]
            record["runtimes"][fmt] = result
    return record


def _db(figures: dict[str, Any] | None, key: str = "sqnr_db_median_image") -> str:
    if not figures:
        return ""
    return "exact" if figures.get(key) is None else f"{figures[key]:.1f}"


def _rows_by_block(record: dict[str, Any], fmt: str) -> dict[str, dict[str, Any]]:
    return {row["block"]: row for row in record["runtimes"].get(fmt, {}).get("blocks", [])}


def render_table(record: dict[str, Any]) -> Any:
    """Per block: SQNR against float (dB) of the graph and of each runtime chained, and, alone, the share of values
    further than one int8 step from the graph's (red where the runtime departs)."""
    from rich import box
    from rich.table import Table

    formats = [fmt for fmt, result in record["runtimes"].items() if "blocks" in result]
    table = Table(title=f"numerics: {record['images']} calibration images, each block's SQNR against float (dB, "
                        "median over images) and, run alone on the graph's input, the share of values > 1 int8 "
                        "step from the graph's",
                  box=box.SIMPLE_HEAD,
                  caption=f"a block departs (red) when over {100 * DEPARTS_SHARE:g}% of its values are more than one "
                          "step from the Q/DQ graph's: more than rounding explains")
    table.add_column("block", no_wrap=True)
    table.add_column("graph", justify="right", no_wrap=True)
    for fmt in formats:
        table.add_column(f".{fmt}", justify="right", no_wrap=True)
        table.add_column(f".{fmt} >1 step", justify="right", no_wrap=True)
    rows = {fmt: _rows_by_block(record, fmt) for fmt in formats}
    for block in record["blocks"]:
        cells = [block["block"], _db(block.get("graph_vs_float"))]
        for fmt in formats:
            row = rows[fmt].get(block["block"], {})
            if "skipped" in row:
                cells += ["[yellow]not compared[/]", ""]
                continue
            if row.get("not_selected"):
                cells += ["[dim]not selected[/]", ""]
                continue
            alone = row.get("alone", {})
            share = alone.get("share_over_1_step")
            text = "" if share is None else f"{100 * share:.2f}%"
            cells += [_db(row.get("chained_vs_float")), f"[red]{text}[/]" if alone.get("departs") else text]
        table.add_row(*cells)
    return table


def summary(record: dict[str, Any]) -> str:
    """One line per runtime: where it departs from the graph, what could not be compared, and whether the chain
    of blocks reproduces the whole file."""
    lines = []
    for fmt, result in record["runtimes"].items():
        if "skipped" in result:
            lines.append(f".{fmt}: {result['skipped']}")
            continue
        departs = result.get("departs_at") or []
        chosen = record.get("selected")
        text = (f".{fmt}: departs from the Q/DQ graph at {', '.join(departs)}" if departs
                else f".{fmt}: follows the Q/DQ graph in every block (within rounding)" if not chosen
                else f".{fmt}: follows the Q/DQ graph in the {len(chosen)} selected block(s) (within rounding)")
        whole = result.get("chain_vs_whole_file")
        if whole is not None:
            text += ("; its blocks chained reproduce the whole file's logits "
                     + ("exactly" if whole.get("sqnr_db") is None else f"to SQNR {whole['sqnr_db']:.1f} dB"))
        missing = result.get("could_not_compare") or []
        if missing:
            reasons = {row["block"]: row["skipped"] for row in result["blocks"] if "skipped" in row}
            text += "; not compared: " + "; ".join(f"{name} ({reasons[name]})" for name in missing)
        lines.append(text)
    return "\n".join(lines)


def plot(record: dict[str, Any]) -> bytes | None:
    """numerics.png: SQNR against float per block for the graph and each runtime (chained), and below, each
    runtime's share of values more than one step from the graph when run alone."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [block["block"] for block in record["blocks"]]
    if not names:
        return None
    positions = np.arange(len(names))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(names) + 3), 7), sharex=True)

    def db(figures: dict[str, Any] | None) -> float:
        if not figures:
            return math.nan
        value = figures.get("sqnr_db_median_image")
        return 80.0 if value is None else float(value)

    top.plot(positions, [db(b.get("graph_vs_float")) for b in record["blocks"]], "k-o", label="Q/DQ graph (torch)")
    for fmt, result in record["runtimes"].items():
        if "blocks" not in result:
            continue
        rows = _rows_by_block(record, fmt)
        color, marker = formats.get(fmt).style
        top.plot(positions, [db(rows.get(n, {}).get("chained_vs_float")) for n in names], marker=marker,
                 color=color, linestyle="--", label=f".{fmt} in its runtime, blocks chained")
        shares = [100 * (rows.get(n, {}).get("alone", {}).get("share_over_1_step") or 0.0) for n in names]
        width = 0.8 / max(1, len(record["runtimes"]))
        offset = (list(record["runtimes"]).index(fmt) - (len(record["runtimes"]) - 1) / 2) * width
        bottom.bar(positions + offset, shares, width=width, color=color, label=f".{fmt} alone vs graph")
    bottom.axhline(100 * DEPARTS_SHARE, color="red", linewidth=1, label="departs above this")
    top.set_ylabel("SQNR against float (dB),\nmedian over images")
    top.set_title(f"int8 numerics per block ({record['images']} calibration images)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_ylabel("% of values > 1 int8 step\nfrom the graph's")
    bottom.set_xticks(positions, names, rotation=60, ha="right", fontsize=8)
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
