"""Where an invoke's instructions go: each network block of an exported .tflite, counted on its own.

Why cut the exported file instead of attributing the plugin's counts to kernel symbols: on these
machines qemu-user's plugin API resolves symbols only for what its own loader mapped (the executable
and ld.so), and the runtimes' kernels live in shared libraries that ld.so maps later; LiteRT's aarch64
libraries carry no XNNPACK symbols at all, and ExecuTorch's export only some. Even resolved, a kernel
serves many blocks. So each block (stem, every inverted-residual block, head) is cut out of the very
file that was exported: the same operators, the same tensors and therefore the same quantization
(scales and zero-points), the same kernels. Each part then runs as a model of its own, so each pays
the runtime's per-invoke overhead (interpreter invoke, delegate dispatch, input/output copies) once:
the parts' sum exceeds the whole by about (parts - 1) × that overhead, which the result states.

A .pte holds its graph inside an opaque XNNPACK delegate payload that cannot be cut this way. So `edgetl export
--parts` cuts the graph the .pte was lowered from (backends/torch/parts.py) and lowers each block on its own
into `FILE.pte.parts/`; bench counts those parts like the .tflite's. Without them a .pte's breakdown is reported
as unavailable (an honest gap, not an estimate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetl.backbones import is_block_class
from edgetl.errors import UserError

CUT_METHOD = ("each block cut out of the exported .tflite (same operators, tensors and quantization) and counted "
              "on its own under qemu, like the whole")
CUT_GAP_REASON = ("each part is invoked as a model of its own, so it pays the runtime's per-invoke overhead "
                  "(interpreter invoke, delegate dispatch, input/output copies) once: the sum counts that "
                  "overhead once per part, the whole once")
PTE_UNAVAILABLE = ("a .pte keeps its graph inside one XNNPACK delegate payload, which cannot be cut into blocks "
                   "(and its kernels sit in shared libraries whose symbols qemu's plugin API does not resolve); "
                   "export with --parts to lower each block on its own")
LOWERED_METHOD = ("each block of the graph the .pte was lowered from (same operators, weights and quantization) "
                  "lowered on its own by `edgetl export --parts` and counted under qemu, like the whole")
LOWERED_GAP_REASON = ("each part is a program of its own: it pays ExecuTorch's per-invoke overhead (method execute, "
                      "XNNPACK delegate dispatch, input/output copies) once, and an int8 part also quantizes its "
                      "float input and dequantizes its output, as the whole does once: the sum counts that once per "
                      "part")
# Format.blocks → how its blocks were counted, and why their sum differs from the whole
COUNTED = {"cut": (CUT_METHOD, CUT_GAP_REASON), "lowered": (LOWERED_METHOD, LOWERED_GAP_REASON)}
PARTS_KIND = "edgetl.pte-parts"


def parts_folder(folder: Path, name: str) -> Path:
    """Where `edgetl export --parts` puts the blocks of the .pte `name`, and bench --breakdown finds them."""
    return folder / f"{name}.parts"


def pte_parts(model: Path, sha256: str) -> list[dict[str, Any]]:
    """The parts `--parts` lowered for this .pte, in network order, each with its file's path; a UserError line
    when there are none or they belong to another version of the file."""
    import json

    index = parts_folder(model.parent, model.name) / "parts.json"
    if not index.is_file():
        raise UserError(f"{model.name}: {PTE_UNAVAILABLE}")
    record = json.loads(index.read_text())
    if record.get("kind") != PARTS_KIND or not isinstance(record.get("parts"), list):
        raise UserError(f"{index}: not a parts index edgetl wrote (valid: kind {PARTS_KIND})")
    if record.get("sha256") != sha256:
        raise UserError(f"{model.name}: its parts were lowered for another version of the file (sha256 differs); "
                        "export it again with --parts")
    return [{**part, "path": index.parent / part["file"]} for part in record["parts"]]

@dataclass(frozen=True)
class Part:
    """One block of the network: its name, its role and the operators (a contiguous run) it holds."""

    name: str
    role: str  # stem, block or head
    first_op: int
    last_op: int  # inclusive

    @property
    def ops(self) -> int:
        return self.last_op - self.first_op + 1


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        raise UserError("--breakdown needs ai-edge-litert on the host (pip install ai-edge-litert==2.3.0)") from None
    return schema_py_generated


def _load(model: Path) -> Any:
    return _schema().ModelT.InitFromPackedBuf(model.read_bytes(), 0)


def _module_path(name: str) -> list[tuple[str, str]]:
    """(class, attribute) of each module in a tensor name as litert-torch writes it, from the network down:
    `.../edgetl...MobileNetV4_model/torch...Sequential_blocks/torch...Sequential_2/...UniversalInvertedResidual_0/...`
    → [("Sequential", "blocks"), ("Sequential", "2"), ("UniversalInvertedResidual", "0"), ...]."""
    modules = [part.rsplit(".", 1)[-1].partition("_")[::2] for part in name.split("/")]
    roots = [i for i, (_, attribute) in enumerate(modules) if attribute == "model"]  # the network inside its wrapper
    return modules[roots[0] + 1:] if roots else modules[1:]


def _block_of(names: list[str]) -> tuple[str, str] | None:
    """(module path, class) of the block an operator's output tensor comes from: the outermost module of a block
    class (`blocks.2.0`, `features.3`, `_blocks.3`), else the first numbered child (`features.0`, `classifier.3`),
    else None (a module of the network itself, such as a stem conv, or no module)."""
    for name in names:
        for segment in name.split(";"):
            path = _module_path(segment)
            attributes = [attribute for _, attribute in path]
            for depth, (cls, _) in enumerate(path):
                if is_block_class(cls):
                    return ".".join(attributes[:depth + 1]), cls
            numbered = next((depth for depth, value in enumerate(attributes) if value.isdigit()), None)
            if numbered is not None and numbered > 0:
                return ".".join(attributes[:numbered + 1]), path[numbered][0]
    return None


def tflite_parts(model: Path) -> list[Part]:
    """The blocks of a single-subgraph .tflite, from the module paths its tensors are named after.

    Every block (a module of a class `edgetl.backbones.BLOCK_CLASS_WORDS` names) is a part; everything before the
    first one is the stem, everything after the last one (final 1×1 convolution, pooling, classifier) the head. An
    operator whose output names no module (pooling, the output) stays with the operators around it.
    """
    graph = _load(model).subgraphs
    if len(graph) != 1:
        raise UserError(f"{model.name}: --breakdown needs a single-subgraph .tflite, this one has {len(graph)}")
    sub = graph[0]
    owners = [_block_of([sub.tensors[t].name.decode(errors="replace") for t in op.outputs]) for op in sub.operators]
    finished: set[str] = set()  # modules whose operators have ended: a later operator named after one of them carries
    current = None  # a name the converter reused (the head's MEAN named after a squeeze-excite's), so it names none
    for i, owner in enumerate(owners):
        if owner is None:
            continue
        if owner[0] in finished:
            owners[i] = None
        elif owner[0] != current:
            if current is not None:
                finished.add(current)
            current = owner[0]
    blocks = [i for i, owner in enumerate(owners) if owner is not None and is_block_class(owner[1])]
    if not blocks:
        raise UserError(f"{model.name}: its tensor names name no inverted-residual block (valid: a .tflite exported "
                        "by edgetl's torch backend, whose tensors carry the module path)")
    first, last = blocks[0], blocks[-1]
    runs: list[list[Any]] = []  # [module, first op, last op]
    for i in range(first, last + 1):
        module = owners[i][0] if owners[i] is not None else runs[-1][0]
        if runs and runs[-1][0] == module:
            runs[-1][2] = i
        else:
            runs.append([module, i, i])
    parts = [Part(module, "block", a, b) for module, a, b in runs]
    if first > 0:
        parts.insert(0, Part(_joined(owners[:first], "stem"), "stem", 0, first - 1))
    if last + 1 < len(owners):
        parts.append(Part(_joined(owners[last + 1 :], "head"), "head", last + 1, len(owners) - 1))
    return parts


def _joined(owners: list[tuple[str, str] | None], role: str) -> str:
    """`features.18+head`: the modules a stem or head part holds, with its role when some operators name none."""
    names = list(dict.fromkeys(owner[0] for owner in owners if owner is not None))
    if None in owners or not names:
        names = [role, *names] if role == "stem" else [*names, role]
    return "+".join(names)


def write_part(model: Path, part: Part, out: Path) -> Path:
    """A .tflite holding only `part`'s operators: inputs are the tensors it reads that nothing in it makes and that
    carry no data; outputs the tensors it makes that a later operator or the model's output reads."""
    import flatbuffers

    whole = _load(model)
    sub = whole.subgraphs[0]
    ops = sub.operators[part.first_op : part.last_op + 1]
    later = sub.operators[part.last_op + 1 :]
    made = {t for op in ops for t in op.outputs}
    read_later = {t for op in later for t in op.inputs if t >= 0} | set(sub.outputs)

    def constant(t: int) -> bool:
        data = whole.buffers[sub.tensors[t].buffer].data
        return data is not None and len(data) > 0

    inputs = list(dict.fromkeys(t for op in ops for t in op.inputs if t >= 0 and t not in made and not constant(t)))
    outputs = [t for t in dict.fromkeys(t for op in ops for t in op.outputs) if t in read_later]
    used = sorted({t for op in ops for t in (*op.inputs, *op.outputs) if t >= 0}
                  | {t for op in ops for t in (op.intermediates if op.intermediates is not None else []) if t >= 0})
    renumber = {old: new for new, old in enumerate(used)}
    for op in ops:
        op.inputs = [renumber[t] if t >= 0 else t for t in op.inputs]
        op.outputs = [renumber[t] for t in op.outputs]
        if op.intermediates is not None:
            op.intermediates = [renumber[t] for t in op.intermediates if t >= 0]
    sub.tensors = [sub.tensors[t] for t in used]
    sub.operators = ops
    sub.inputs = [renumber[t] for t in inputs]
    sub.outputs = [renumber[t] for t in outputs]
    whole.signatureDefs = None  # the whole model's signature names tensors this part does not have
    builder = flatbuffers.Builder(1024)
    builder.Finish(whole.Pack(builder), file_identifier=b"TFL3")
    out.write_bytes(bytes(builder.Output()))
    return out


def _owner(layer: str, parts: list[dict[str, Any]]) -> int | None:
    """Index of the part whose module paths hold `layer` (a sensitivity-table name such as
    `model.features.3.conv.0.0`, or `model._blocks.3._expand_conv`), or None."""
    path = layer.removeprefix("model.")
    for index, part in enumerate(parts):
        if any(path == module or path.startswith(module + ".") for module in part["name"].split("+")):
            return index
    return None


def attribute_int8_loss(record: dict[str, Any], sensitivity: dict[str, Any]) -> None:
    """Fill each part's `int8_loss_share` from the export's per-layer sensitivity table: the part's share of the
    summed |Δlogit| of its layers, each layer's weights rounded alone. A layer under no named module (an
    EfficientNet stem conv, a head) goes to the stem part when it comes before the first block, else to the head."""
    parts = record["parts"]
    rows = [r for r in sensitivity.get("rows", []) if r.get("measured")]
    total = sum(r["logit_error"] for r in rows)
    if not rows or total <= 0:
        return
    owners = [_owner(r["layer"], parts) for r in rows]
    blocks = [i for i, p in enumerate(parts) if p.get("role") == "block"]
    first_block = next((n for n, o in enumerate(owners) if o is not None and o in blocks), len(rows))
    roles = {p.get("role"): i for i, p in enumerate(parts) if p.get("role") in ("stem", "head")}
    shares = [0.0] * len(parts)
    unplaced = 0
    for n, (row, owner) in enumerate(zip(rows, owners, strict=True)):
        owner = owner if owner is not None else roles.get("stem" if n < first_block else "head")
        if owner is None:
            unplaced += 1
            continue
        shares[owner] += row["logit_error"] / total
    for part, share in zip(parts, shares, strict=True):
        part["int8_loss_share"] = round(share, 4)
    unmeasured = sensitivity.get("layers", len(rows)) - len(rows)
    record["int8_loss_share_source"] = (
        f"the export's int8 sensitivity table: each block's share of the summed mean |Δlogit| of its layers, each "
        f"layer's weights rounded to int8 alone on {sensitivity.get('images')} calibration images (errors of layers "
        f"rounded together do not add exactly)"
        + (f"; {unmeasured} layer(s) not measured within its time budget" if unmeasured else "")
        + (f"; {unplaced} layer(s) matched no block" if unplaced else ""))


def summarize(parts: list[dict[str, Any]], whole: int, whole_macs: int | None, fmt: str = "tflite") -> dict[str, Any]:
    """The breakdown record: every part's share and instructions per MAC, and how far the sum is from the whole."""
    from edgetl import formats

    method, gap_reason = COUNTED[formats.get(fmt).blocks]
    total = sum(p["instructions_per_invoke"] for p in parts)
    for p in parts:
        p["share_of_whole"] = p["instructions_per_invoke"] / whole if whole else None
        p["instructions_per_mac"] = p["instructions_per_invoke"] / p["macs"] if p.get("macs") else None
        p.setdefault("int8_loss_share", None)
    gap = total - whole
    return {
        "format": fmt,
        "method": method,
        "parts": parts,
        "whole_instructions_per_invoke": whole,
        "whole_macs": whole_macs,
        "sum_of_parts": total,
        "sum_minus_whole": gap,
        "sum_minus_whole_relative": gap / whole if whole else None,
        "overhead_per_extra_part": gap / (len(parts) - 1) if len(parts) > 1 else None,
        "gap_reason": gap_reason,
        "part_inputs": "device_bench's seeded random inputs of each part's own shape and type (the whole fed such "
                       "inputs instead of test images: 19 instructions fewer of 400 k, measured 2026-12-01)",
        "int8_loss_share_source": None,  # filled from the int8 sensitivity table when one exists
    }
