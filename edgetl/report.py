"""The sweep report: measured rows in; Pareto fronts, one recommendation per target, alarms, report.md,
a self-contained report.html (plots embedded as data URIs) and sweep.json out.

Pure apart from the plots and the writing: `analyse` takes the result rows (see `sweep.collect`) and the
budget and decides; tests feed it constructed rows. The rules are stated in the report itself.

Cost per target: on emulated ARM64 targets, guest instructions per invoke (qemu TCG count; emulated wall
time is not phone latency); on the host, p50 latency at the sweep's first thread count. Accuracy: each
file's top-1 in its own runtime over the whole test split, and its drop from the float checkpoint.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from edgetl import formats
from edgetl.config import SweepConfig

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
SWEEP_JSON = "sweep.json"
# Costs within this fraction of the best count as a tie (then the smaller file wins). ARM counts repeat
# to ~5 ppm, so 1% separates real differences; host p50 on a shared 2-core machine moves by several %.
TIE = {"arm": 0.01, "host": 0.05}
# An int8 file is "slower" than its fp32 twin, or a pruned one "not faster" than its unpruned twin, only
# beyond this band: exact counts on ARM, the host's timing noise on the host.
NOISE = {"arm": 0.0, "host": 0.05}
RULE = ("On each target the recommended file is the cheapest among those within the accuracy budget (top-1 "
        "drop from the float checkpoint ≤ {budget:.1f} points): fewest guest instructions per invoke on an "
        "emulated ARM64 target, lowest p50 latency ({threads} thread{s}) on the host. Files within {arm:.0%} "
        "(ARM) or {host:.0%} (host) of the cheapest count as tied; among tied files the smaller file wins, "
        "then the higher top-1. When no file is within the budget, the most accurate one is named instead.")


def kind(row: dict[str, Any]) -> str:
    return "arm" if row["emulated"] else "host"


def cost(row: dict[str, Any]) -> float | None:
    """The figure a target is ranked by: instructions per invoke (ARM64, emulated) or host p50 ms."""
    return row.get("instructions_per_invoke") if row["emulated"] else row.get("p50_ms")


def host_threads(rows: list[dict[str, Any]], configured: list[int] | None = None) -> int:
    """The host thread count that ranks host rows: the sweep's first, else the fewest measured."""
    if configured:
        return configured[0]
    counts = sorted({r["threads"] for r in rows if not r["emulated"]})
    return counts[0] if counts else 1


def ranked_rows(rows: list[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    """Rows that can be ranked: host rows at the ranking thread count, every ARM row, with cost and top-1."""
    return [r for r in rows if (r["emulated"] or r["threads"] == threads)
            and cost(r) is not None and r.get("top1") is not None]


def drop(row: dict[str, Any], reference: float) -> float:
    """Top-1 drop from the float checkpoint, in points (negative: the file scored higher)."""
    return round(100 * (reference - row["top1"]), 2)


def pareto_front(points: list[dict[str, Any]], cost_key: str) -> list[str]:
    """Ids of the points no other point beats: none is at most as costly and at least as accurate, with one
    of the two strictly better. Sorted by cost."""
    front = []
    for p in points:
        dominated = any(
            q is not p and q[cost_key] <= p[cost_key] and q["top1"] >= p["top1"]
            and (q[cost_key] < p[cost_key] or q["top1"] > p["top1"])
            for q in points
        )
        if not dominated:
            front.append(p)
    return [p["id"] for p in sorted(front, key=lambda p: (p[cost_key], -p["top1"], p["id"]))]


def fronts(rows: list[dict[str, Any]], threads: int) -> dict[str, list[str]]:
    """Pareto fronts: top-1 against each target's cost, and against file size (target-independent)."""
    usable = ranked_rows(rows, threads)
    found: dict[str, list[str]] = {}
    for target in dict.fromkeys(r["target"] for r in usable):
        points = [{"id": r["id"], "cost": cost(r), "top1": r["top1"]} for r in usable if r["target"] == target]
        found[target] = pareto_front(points, "cost")
    sizes = {r["id"]: {"id": r["id"], "size": r["size_bytes"], "top1": r["top1"]} for r in rows
             if r.get("top1") is not None}
    found["file size"] = pareto_front(list(sizes.values()), "size")
    return found


def _twin(row: dict[str, Any], rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The row of another variant measured under the same conditions (format, target, threads) that matches."""
    for other in rows:
        if other is row or other["format"] != row["format"] or other["target"] != row["target"]:
            continue
        if other["threads"] != row["threads"] or cost(other) is None:
            continue
        if all(other.get(key) == value for key, value in match.items()):
            return other
    return None


def describe_cost(row: dict[str, Any], value: float | None = None) -> str:
    value = cost(row) if value is None else value
    if value is None:
        return "–"
    if row["emulated"]:
        return f"{value / 1e6:.2f} M instr/invoke"
    return f"{value:.3g} ms p50"


def recommend(rows: list[dict[str, Any]], target: str, budget: float, reference: float,
              threads: int) -> dict[str, Any] | None:
    """One file for `target`, by the rule in RULE, with the reason spelled out."""
    candidates = [r for r in ranked_rows(rows, threads) if r["target"] == target]
    if not candidates:
        return None
    within = [r for r in candidates if drop(r, reference) <= budget]
    if not within:
        best = max(candidates, key=lambda r: (r["top1"], -r["size_bytes"]))
        return {"target": target, "id": best["id"], "artifact": best["artifact"], "variant": best["variant"],
                "within_budget": False, "cost": cost(best),
                "reason": f"no file is within the {budget:.1f}-point budget on {target} "
                          f"({len(candidates)} measured); the most accurate is named: top-1 {best['top1']:.3f} "
                          f"(drop {drop(best, reference):.1f} points), {describe_cost(best)}"}
    cheapest = min(cost(r) for r in within)
    tied = [r for r in within if cost(r) <= cheapest * (1 + TIE[kind(within[0])])]
    pick = min(tied, key=lambda r: (r["size_bytes"], -r["top1"], r["id"]))
    what = "fewest guest instructions per invoke" if pick["emulated"] else f"lowest host p50 latency ({threads} " \
        f"thread{'s' if threads > 1 else ''})"
    reason = (f"{what} on {target}: {describe_cost(pick)} among the {len(within)} of {len(candidates)} files "
              f"within the {budget:.1f}-point budget; top-1 {pick['top1']:.3f} "
              f"(drop {drop(pick, reference):.1f} points from float), {pick['size_bytes'] / 1e6:.2f} MB")
    fp32 = _twin(pick, rows, variant="fp32")
    if fp32 is not None and pick["variant"] != "fp32":
        reason += f"; {cost(pick) / cost(fp32):.2f}× the fp32 {pick['format']} file's cost"
    others = [r["id"] for r in tied if r is not pick]
    if others:
        reason += (f"; tied within {TIE[kind(pick)]:.0%} with {', '.join(others)}: the smaller file wins")
    return {"target": target, "id": pick["id"], "artifact": pick["artifact"], "variant": pick["variant"],
            "within_budget": True, "cost": cost(pick), "reason": reason}


def alarms(rows: list[dict[str, Any]], budget: float, reference: float, threads: int) -> list[dict[str, Any]]:
    """What a user must not miss: int8 slower than fp32, ops outside XNNPACK, accuracy over budget, pruning
    that did not speed up the target it was meant to."""
    found: list[dict[str, Any]] = []
    per_file = {r["id"]: r for r in rows}
    for r in per_file.values():
        if r.get("ops_outside"):
            found.append({"kind": "outside-delegate", "id": r["id"], "target": None,
                          "message": f"{r['id']}: compute outside the XNNPACK delegate ({', '.join(r['ops_outside'])})"
                                     " — those ops run on slower portable kernels"})
        if drop(r, reference) > budget:
            found.append({"kind": "accuracy", "id": r["id"], "target": None,
                          "message": f"{r['id']}: top-1 {r['top1']:.3f} is {drop(r, reference):.1f} points below "
                                     f"the float checkpoint ({reference:.3f}); budget {budget:.1f}"})
    for r in ranked_rows(rows, threads):
        band = NOISE[kind(r)]
        if r["quant"] == "int8":
            fp32 = _twin(r, rows, quant="fp32", prune=r.get("prune"))
            if fp32 is not None and cost(r) > cost(fp32) * (1 + band):
                found.append({"kind": "int8-slower", "id": r["id"], "target": r["target"],
                              "message": f"{r['id']} is slower than its fp32 twin {fp32['id']} on {r['target']}: "
                                         f"{describe_cost(r)} vs {describe_cost(fp32)} "
                                         f"({cost(r) / cost(fp32):.2f}×)"})
        if str(r.get("prune") or "").startswith("channels"):  # channel pruning is meant to be faster everywhere
            dense = _twin(r, rows, quant=r["quant"], qat=r.get("qat"), prune=None)
            if dense is not None and cost(r) >= cost(dense) * (1 - band):
                noise = f" (host noise band {band:.0%})" if band else ""
                found.append({"kind": "pruned-not-faster", "id": r["id"], "target": r["target"],
                              "message": f"{r['id']} ({r['prune']}) is not faster than its unpruned twin "
                                         f"{dense['id']} on {r['target']}: {describe_cost(r)} vs "
                                         f"{describe_cost(dense)}{noise}"})
    return found


def analyse(rows: list[dict[str, Any]], budget: float, reference: float,
            configured_threads: list[int] | None = None) -> dict[str, Any]:
    """Fronts, recommendations and alarms for the rows of one sweep."""
    threads = host_threads(rows, configured_threads)
    targets = list(dict.fromkeys(r["target"] for r in rows))
    recommendations = [rec for t in targets if (rec := recommend(rows, t, budget, reference, threads))]
    return {
        "host_threads_ranked": threads,
        "rule": RULE.format(budget=budget, threads=threads, s="s" if threads > 1 else "", **TIE),
        "pareto": fronts(rows, threads),
        "recommendations": recommendations,
        "alarms": alarms(rows, budget, reference, threads),
    }


# ------------------------------------------------------------------------------------------- plots


def breakdown_sections(document: dict[str, Any]) -> list[Block]:
    """Where the instructions go: one table per file × emulated target that bench --breakdown counted."""
    found = document.get("breakdowns") or []
    if not found:
        return []
    blocks: list[Block] = [("h2", "Where the instructions go")]
    for record in found:
        gap = record["sum_minus_whole_relative"]
        blocks.append(("p", f"{record['id']} on {record['target']}: {record['method']}. Whole "
                            f"{record['whole_instructions_per_invoke'] / 1e6:.3f} M instructions per invoke; the parts "
                            f"sum to {record['sum_of_parts'] / 1e6:.3f} M ({gap:+.1%}): {record['gap_reason']}. "
                            "int8 loss share: "
                            + (record.get("int8_loss_share_source") or "no sensitivity table in this run") + "."))
        blocks.append(("table", ["block", "role", "M MACs", "M instr", "share", "instr/MAC", "int8 loss share"],
                       [[p["name"], p["role"], "–" if not p.get("macs") else f"{p['macs'] / 1e6:.3f}",
                         f"{p['instructions_per_invoke'] / 1e6:.4f}", f"{p['share_of_whole']:.1%}",
                         "–" if p.get("instructions_per_mac") is None else f"{p['instructions_per_mac']:.3f}",
                         "–" if p.get("int8_loss_share") is None else f"{p['int8_loss_share']:.1%}"]
                        for p in record["parts"]]))
    return blocks


def breakdown_plot(document: dict[str, Any]) -> bytes | None:
    """Bars: each block's guest instructions per invoke, with its MACs on a second axis, per counted file."""
    found = document.get("breakdowns") or []
    if not found:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(found), 1, figsize=(11, 3.6 * len(found)), squeeze=False)
    for axis, record in zip(axes[:, 0], found, strict=True):
        names = [p["name"] for p in record["parts"]]
        axis.bar(range(len(names)), [p["instructions_per_invoke"] / 1e6 for p in record["parts"]], color="tab:blue",
                 label="guest instructions per invoke (M)")
        axis.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
        axis.set(ylabel="M instructions", title=f"{record['id']} on {record['target']}: sum of parts "
                 f"{record['sum_minus_whole_relative']:+.1%} vs whole (per-invoke overhead once per part)")
        twin = axis.twinx()
        twin.plot(range(len(names)), [(p.get("macs") or 0) / 1e6 for p in record["parts"]], "o-", color="tab:orange",
                  label="MACs (M)")
        twin.set_ylabel("M MACs")
        axis.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def plots(document: dict[str, Any]) -> dict[str, bytes]:
    """PNG figures: top-1 against ARM instructions per invoke (one panel per target), host latency, size.

    Colour names the variant, the marker the format; Pareto-front points are ringed and joined.
    """
    rows, analysis = document["rows"], document["analysis"]
    threads = analysis["host_threads_ranked"]
    usable = ranked_rows(rows, threads)
    if not usable:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colours = plt.get_cmap("tab10")
    markers = {name: record.style[1] for name, record in formats.FORMATS.items()}
    reference, budget = document["reference"]["top1"], document["config"]["max_drop"]
    legend = [Line2D([], [], color=colours(i % 10), marker="o", linestyle="", label=v) for i, v in enumerate(variants)]
    legend += [Line2D([], [], color="grey", marker=m, linestyle="", label=f".{f}") for f, m in markers.items()]
    legend += [Line2D([], [], color="black", linestyle="--", marker="o", markerfacecolor="none", label="Pareto front"),
               Line2D([], [], color="red", linestyle=":", label=f"budget: float − {budget:.1f} points")]

    def panel(axis, points: list[dict[str, Any]], x_of, front_ids: list[str], xlabel: str, title: str) -> None:
        for r in points:
            axis.scatter(x_of(r), r["top1"], color=colours(variants.index(r["variant"]) % 10),
                         marker=markers.get(r["format"], "D"), s=55, zorder=3)
        chosen = {r["id"]: r for r in points}
        front = [chosen[i] for i in front_ids if i in chosen]
        if front:
            axis.plot([x_of(r) for r in front], [r["top1"] for r in front], "k--", linewidth=1, zorder=2)
            axis.scatter([x_of(r) for r in front], [r["top1"] for r in front], s=160, facecolors="none",
                         edgecolors="black", zorder=4)
        axis.axhline(reference - budget / 100, color="red", linestyle=":", linewidth=1)
        axis.set(xlabel=xlabel, ylabel="top-1 (own runtime, test split)", title=title)
        axis.grid(True, alpha=0.3)

    def finish(fig) -> bytes:
        columns = max(2, min(len(legend), int(fig.get_figwidth() // 2.3)))
        lines = -(-len(legend) // columns)
        fig.legend(handles=legend, loc="lower center", ncol=columns, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, min(0.4, 0.3 * lines / fig.get_figheight() + 0.02), 1, 1))
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        return buffer.getvalue()

    figures: dict[str, bytes] = {}
    arm_targets = list(dict.fromkeys(r["target"] for r in usable if r["emulated"]))
    if arm_targets:
        columns = min(3, len(arm_targets))
        lines = -(-len(arm_targets) // columns)
        fig, axes = plt.subplots(lines, columns, figsize=(max(8.0, 5.2 * columns), 4.2 * lines + 1.2),
                                 squeeze=False)
        for axis, target in zip(axes.flat, arm_targets, strict=False):
            panel(axis, [r for r in usable if r["target"] == target], lambda r: r["instructions_per_invoke"] / 1e6,
                  analysis["pareto"].get(target, []), "guest instructions per invoke, M (qemu TCG count)",
                  f"{target} (emulated; 1 thread)")
        for axis in list(axes.flat)[len(arm_targets):]:
            axis.set_visible(False)
        figures["top1_vs_arm_instructions"] = finish(fig)
    timed = list(dict.fromkeys(r["target"] for r in usable if not r["emulated"]))  # host, then ssh: machines
    if timed:
        fig, axes = plt.subplots(1, len(timed), figsize=(8 * len(timed), 5.6), squeeze=False)
        for axis, target in zip(axes.flat, timed, strict=True):
            where = "host CPU (real time)" if target == "host" else f"{target} (real time on that machine)"
            panel(axis, [r for r in usable if r["target"] == target], lambda r: r["p50_ms"],
                  analysis["pareto"].get(target, []),
                  f"{target} p50 latency, ms ({threads} thread{'s' if threads > 1 else ''})", where)
        figures["top1_vs_host_latency"] = finish(fig)
    sized = list({r["id"]: r for r in rows if r.get("top1") is not None}.values())
    fig, axis = plt.subplots(figsize=(8, 5.6))
    panel(axis, sized, lambda r: r["size_bytes"] / 1e6, analysis["pareto"]["file size"], "file size, MB",
          "file size")
    figures["top1_vs_file_size"] = finish(fig)
    sensitivity = int8_sensitivity(document)
    if sensitivity is not None:
        figures["int8_sensitivity"] = _sensitivity_plot(plt, *sensitivity)
    numerics = int8_numerics(document)
    if numerics is not None:
        from edgetl.numerics import plot as numerics_plot

        figure = numerics_plot(numerics)
        if figure is not None:
            figures["int8_numerics"] = figure
    return figures


def int8_numerics(document: dict[str, Any]) -> dict[str, Any] | None:
    """The numerics debugger's record of the first variant whose export ran it (export --debug-numerics)."""
    for variant in document.get("variants", []):
        path = Path(variant.get("export", "")) / "manifest.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text()).get("numerics") or {}
        record = record if "blocks" in record else next((r for r in record.get("graphs", []) if "blocks" in r), None)
        if record:
            return record
    return None


def int8_sensitivity(document: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The per-layer int8 sensitivity table of the first variant whose export measured one (variant, table)."""
    for variant in document.get("variants", []):
        path = Path(variant.get("export", "")) / "manifest.json"
        if not path.is_file():
            continue
        table = (json.loads(path.read_text()).get("quantization") or {}).get("sensitivity")
        if table and any(r.get("measured") for r in table["rows"]):
            return variant["name"], table
    return None


def _sensitivity_plot(plt, variant: str, table: dict[str, Any]) -> bytes:
    """Each layer's logit error when only its weights are rounded to int8 (bars) and its share of MACs (line)."""
    rows = table["rows"]
    fig, axis = plt.subplots(figsize=(max(8.0, 0.16 * len(rows) + 3), 4.8))
    positions = range(len(rows))
    axis.bar(positions, [r.get("logit_error", 0.0) for r in rows], color="tab:red")
    axis.set(xlabel="layer, in network order (unmeasured: no bar)",
             ylabel="mean |Δlogit|, that layer alone int8",
             title=f"int8 sensitivity per layer ({variant}; {table['images']} calibration images)")
    twin = axis.twinx()
    twin.plot(positions, [100 * r["macs_share"] for r in rows], color="tab:blue", marker=".", linewidth=1)
    twin.set_ylabel("share of MACs, %", color="tab:blue")
    top = sorted((r for r in rows if r.get("measured")), key=lambda r: r["rank"])[:3]
    for r in top:
        axis.annotate(r["layer"].removeprefix("model."), (r["index"], r["logit_error"]), fontsize=7, rotation=20)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


# ------------------------------------------------------------------------------- report documents

Block = tuple  # ("p", text) | ("ul", [text]) | ("table", headers, rows) | ("img", name, alt) | ("h", text)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def sections(document: dict[str, Any]) -> list[Block]:
    """The report as blocks, rendered alike to Markdown and HTML so the two never disagree."""
    analysis, rows, conditions = document["analysis"], document["rows"], document["conditions"]
    config, reference = SweepConfig.settings_of(document["config"]), document["reference"]
    model = document["checkpoint"]["model"]
    threads = analysis["host_threads_ranked"]
    budget = config["max_drop"]
    blocks: list[Block] = [("h1", "edgetl sweep report")]
    blocks.append(("p", f"Checkpoint {document['checkpoint']['path']} — {model.get('backbone')} "
                        f"(width {model.get('width')}), {model.get('image_size')} px, {model.get('num_classes')} "
                        f"classes. Made {document['created']} in {document['seconds'] / 60:.1f} min; "
                        f"{len(document['variants'])} variants, targets {', '.join(config['targets'])}."))
    ref_top1 = reference["top1"]
    blocks.append(("p", f"Accuracy reference: float top-1 {ref_top1:.3f} on {reference.get('images')} test images "
                        f"({reference['source']}). Each file's top-1 is measured in its own runtime (LiteRT for "
                        f".tflite, ExecuTorch for .pte) on the host over the same test split; budget: a drop of "
                        f"at most {budget:.1f} points."))
    cpu = conditions.get("host_cpu") or {}
    load = conditions.get("load_average_before"), conditions.get("load_average_after")
    blocks.append(("h2", "Conditions"))
    blocks.append(("ul", [
        f"Host: {cpu.get('model') or 'unknown CPU'} ({cpu.get('cores')} cores, {cpu.get('machine')}); "
        f"{conditions['host_iters']} timed invokes after {conditions['host_warmup']} warm-ups, threads "
        f"{', '.join(map(str, conditions['host_threads']))}; host rows ranked at {threads} thread"
        f"{'s' if threads > 1 else ''}. Load average (1, 5, 15 min) before {load[0]}, after {load[1]}: "
        "host latencies are this run's, on a machine that may be shared.",
        f"Emulated ARM64: {conditions.get('qemu') or 'qemu-user'}, 1 thread, {conditions['arm_iters']} counted "
        f"invokes, bench top-1 cross-check on the first {conditions['arm_samples']} test images (host: "
        f"{conditions.get('host_samples')}). The cost figure is guest "
        "instructions per invoke (TCG plugin). Emulated wall time is not phone latency and is not used.",
        "Runtimes: " + (", ".join(conditions.get("runtimes") or []) or "none measured") + ".",
        *[f"{name}: {t['description']}" + (f" — qemu -cpu {t['qemu_cpu']}" if t.get("emulated") else "")
          for name, t in conditions.get("targets", {}).items()],
    ]))
    blocks.append(("h2", "Recommendations"))
    blocks.append(("p", "Rule: " + analysis["rule"]))
    blocks.append(("table", ["target", "file", "cost", "reason"],
                   [[r["target"], r["id"], describe_cost(_row(rows, r["id"], r["target"], threads)), r["reason"]]
                    for r in analysis["recommendations"]] or [["–", "no target had a measured file", "", ""]]))
    blocks.append(("h2", f"Alarms ({len(analysis['alarms'])})"))
    blocks.append(("ul", [f"**{a['kind']}**: {a['message']}" for a in analysis["alarms"]] or ["none"]))
    if document["failures"]:
        blocks.append(("h2", f"Failures ({len(document['failures'])})"))
        blocks.append(("ul", [f"{f['variant']}" + (f"/{f['artifact']}" if f.get("artifact") else "")
                              + f" ({f['stage']}" + (f", {f['target']}" if f.get("target") else "") + f"): "
                              f"{f['error']}" for f in document["failures"]]))
    blocks.append(("h2", "Results"))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fronts_by = analysis["pareto"]
    headers = ["file", "size MB", "M MACs", "top-1", "drop", "XNNPACK"]
    for target in targets:
        emulated = next(r["emulated"] for r in rows if r["target"] == target)
        headers.append(f"{target} M instr" if emulated else f"{target} p50 ms ({threads}t)")
    table = []
    for file_id in dict.fromkeys(r["id"] for r in rows):
        first = next(r for r in rows if r["id"] == file_id)
        macs = next((r.get("macs") for r in rows if r["id"] == file_id and r.get("macs")), None)
        line = [file_id, _mb(first["size_bytes"]) + (" ★" if file_id in fronts_by["file size"] else ""),
                "–" if macs is None else f"{macs / 1e6:.2f}",
                f"{first['top1']:.3f}", f"{drop(first, ref_top1):.1f}",
                {True: "all", False: "partial"}.get(first["fully_delegated"], "–")]
        for target in targets:
            found = _row(rows, file_id, target, threads)
            value = cost(found) if found else None
            text = "–" if value is None else (f"{value / 1e6:.3f}" if found["emulated"] else f"{value:.3g}")
            line.append(text + (" ★" if file_id in fronts_by.get(target, []) else ""))
        table.append(line)
    blocks.append(("table", headers, table))
    blocks.append(("p", "★: on the Pareto front of top-1 against that column (no other file is at most as "
                        "costly and at least as accurate, one of them strictly). Drop: points of top-1 below the "
                        "float reference (negative: higher)."))
    blocks.extend(breakdown_sections(document))
    blocks.append(("h2", "Plots"))
    for name, alt in (("top1_vs_arm_instructions", "top-1 against guest instructions per invoke, per ARM64 target"),
                      ("top1_vs_host_latency", "top-1 against host p50 latency"),
                      ("top1_vs_file_size", "top-1 against file size"),
                      ("int8_sensitivity", "int8 sensitivity: each layer's logit error when only it is rounded, "
                                           "and its share of MACs"),
                      ("int8_numerics", "int8 numerics per block: SQNR against float of the Q/DQ graph and of each "
                                        "runtime, and where a runtime departs from the graph"),
                      ("instructions_per_block", "guest instructions per invoke of each network block")):
        if name in document.get("plots", []):
            blocks.append(("img", name, alt))
    blocks.append(("h2", "Variants"))
    blocks.append(("table", ["variant", "what", "export settings", "status", "seconds"],
                   [[v["name"], v["description"], json.dumps(v["overrides"]),
                     v["status"] + (f": {v['error']}" if v.get("error") else "")
                     + (f" ({v['export_note']})" if v.get("export_note") else ""), f"{v['seconds']:.0f}"]
                    for v in document["variants"]]))
    return blocks


def _row(rows: list[dict[str, Any]], file_id: str, target: str, threads: int) -> dict[str, Any] | None:
    for r in rows:
        if r["id"] == file_id and r["target"] == target and (r["emulated"] or r["threads"] == threads):
            return r
    return None


def render_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        tag = block[0]
        if tag in ("h1", "h2"):
            out.append(f"{'#' * int(tag[1])} {block[1]}\n")
        elif tag == "p":
            out.append(f"{block[1]}\n")
        elif tag == "ul":
            out.append("".join(f"- {item}\n" for item in block[1]))
        elif tag == "table":
            cells = [[str(c).replace("|", "\\|") for c in line] for line in block[2]]
            out.append(f"| {' | '.join(block[1])} |\n|{'---|' * len(block[1])}\n"
                       + "".join(f"| {' | '.join(line)} |\n" for line in cells))
        elif tag == "img":
            out.append(f"![{block[2]}](plots/{block[1]}.png)\n")
    return "\n".join(out)


def _inline(text: str) -> str:
    """HTML-escape, then turn the one Markdown emphasis the blocks use (**x**) into <strong>."""
    parts = html.escape(str(text)).split("**")
    return "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))


def render_html(blocks: list[Block], images: dict[str, bytes]) -> str:
    """One file, no external resources: styles inline, plots as base64 data URIs."""
    body: list[str] = []
    for block in blocks:
        tag = block[0]
        if tag in ("h1", "h2", "p"):
            body.append(f"<{tag}>{_inline(block[1])}</{tag}>")
        elif tag == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block[1]) + "</ul>")
        elif tag == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
            lines = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in line) + "</tr>" for line in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>")
        elif tag == "img" and block[1] in images:
            data = base64.b64encode(images[block[1]]).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
             "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
             "th{background:#f3f3f3}img{max-width:100%}figure{margin:1em 0}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>edgetl sweep report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(folder: Path, document: dict[str, Any]) -> dict[str, Any]:
    """Analyse, plot and write sweep.json, plots/*.png, report.md and report.html (each atomically)."""
    from edgetl.paths import atomic_write_bytes

    folder = Path(folder)
    reference = document["reference"]["top1"]
    document["analysis"] = analyse(document["rows"], document["config"]["max_drop"], reference,
                                   document["conditions"].get("host_threads"))
    for r in document["rows"]:
        r["drop_points"] = drop(r, reference)
    images = plots(document)
    per_block = breakdown_plot(document)
    if per_block is not None:
        images["instructions_per_block"] = per_block
    document["plots"] = sorted(images)
    (folder / "plots").mkdir(exist_ok=True)
    for name, payload in images.items():
        atomic_write_bytes(folder / "plots" / f"{name}.png", payload)
    blocks = sections(document)
    atomic_write_bytes(folder / SWEEP_JSON, (json.dumps(document, indent=2, default=str) + "\n").encode())
    atomic_write_bytes(folder / REPORT_MD, render_markdown(blocks).encode())
    atomic_write_bytes(folder / REPORT_HTML, render_html(blocks, images).encode())
    document["report"] = {"markdown": str(folder / REPORT_MD), "html": str(folder / REPORT_HTML),
                          "json": str(folder / SWEEP_JSON)}
    return document


def print_summary(document: dict[str, Any]) -> None:
    """Recommendations and alarms on the terminal; the full tables are in the report."""
    from rich.markup import escape

    from edgetl.ui import stdout

    analysis = document["analysis"]
    for rec in analysis["recommendations"]:
        stdout.print(f"recommended for {rec['target']}: [bold]{escape(rec['id'])}[/] — {escape(rec['reason'])}")
    for alarm in analysis["alarms"]:
        stdout.print(f"[yellow]ALARM {alarm['kind']}[/]: {escape(alarm['message'])}")
    for failure in document["failures"]:
        stdout.print(f"[red]failed[/] {escape(failure['variant'])} ({failure['stage']}): {escape(failure['error'])}")
    report = document.get("report", {})
    stdout.print(f"sweep report: {report.get('html')} (also {report.get('markdown')}, {report.get('json')})")
