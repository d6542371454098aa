"""What runs inside each XNNPACK partition of a .pte, read back from the delegate's own serialized graph.

ExecuTorch's delegation counts (`get_delegation_info`) are taken before XNNPACK's passes and say only which
aten nodes went into a partition, not in which precision each one runs there. An int8 op whose pattern the
partitioner does not recognise is delegated all the same, as a float op between two conversions: a float
island inside a partition that no count shows, and that costs three passes over its tensor instead of one.
This module decodes the XNNPACK flatbuffer of each partition with the schema and the `flatc` that ExecuTorch
ships, and counts its nodes by type and by the precision of their outputs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from importlib import resources
from pathlib import Path

import torch

# XNNPACK nodes that move or re-view data and compute nothing; a float one of these is no float island
LAYOUT_NODES = frozenset({"XNNStaticTranspose", "XNNStaticReshape", "XNNCopy", "XNNStaticConstantPad",
                          "XNNStaticSlice", "XNNConcatenate2", "XNNConcatenate3", "XNNConcatenate4",
                          "XNNConcatenate5", "XNNDepthToSpace", "XNNSpaceToDepth"})
FLOAT_TYPES = frozenset({"xnn_datatype_fp32", "xnn_datatype_fp16"})


def _flatc() -> str:
    """The flatc that ExecuTorch ships (it serializes with it), else one on PATH."""
    shipped = resources.files("executorch.data.bin").joinpath("flatc")
    if shipped.is_file() and os.access(str(shipped), os.X_OK):
        return str(shipped)
    found = shutil.which(os.environ.get("FLATC_EXECUTABLE", "flatc"))
    if found is None:
        raise FileNotFoundError("no executable flatc: neither ExecuTorch's nor one on PATH")
    return found


def _payload_graph(processed: bytes, workdir: Path) -> dict:
    """The XNNGraph of one partition's payload (its header, then the flatbuffer), as JSON."""
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader

    header = XNNHeader.from_bytes(processed[: XNNHeader.EXPECTED_LENGTH])
    flatbuffer = processed[header.flatbuffer_offset : header.flatbuffer_offset + header.flatbuffer_size]
    schema = resources.files("executorch.backends.xnnpack.serialization").joinpath("schema.fbs")
    binary = workdir / "graph.bin"
    binary.write_bytes(flatbuffer)
    with resources.as_file(schema) as schema_path:
        subprocess.run([_flatc(), "--json", "--strict-json", "--raw-binary", "-o", str(workdir),
                        str(schema_path), "--", str(binary)], check=True, capture_output=True, timeout=120)
    text = (workdir / "graph.json").read_text()
    # flatc writes an unbounded clamp as a bare inf, which is not JSON
    return json.loads(re.sub(r"(?<=[\s:\[,])(-?)(inf|nan)\b", r'"\1\2"', text))


def _tensor(value: dict) -> dict:
    union = value.get("xvalue_union", {})
    return union.get("tensor_value", union)


def summarize(graph: dict) -> dict:
    """Node counts of one XNNGraph; `float_compute`: the computing nodes whose output is float (conversions
    apart); `conversions`: Convert nodes, of which an all-int8 network needs two (its input and its logits)."""
    datatype = {int(_tensor(v).get("id_out", -1)): _tensor(v).get("datatype", "") for v in graph.get("xvalues", [])}
    nodes: Counter[str] = Counter()
    float_compute: Counter[str] = Counter()
    for node in graph.get("xnodes", []):
        kind = node.get("xnode_union_type", "?")
        nodes[kind] += 1
        output = node.get("xnode_union", {}).get("output_id")
        if kind != "XNNConvert" and kind not in LAYOUT_NODES and datatype.get(output) in FLOAT_TYPES:
            float_compute[kind] += 1
    return {"nodes": dict(sorted(nodes.items())), "conversions": nodes.get("XNNConvert", 0),
            "float_compute": dict(sorted(float_compute.items()))}


def partitions(graph_module: torch.fx.GraphModule) -> list[dict]:
    """One summary per XNNPACK partition of a lowered edge program's graph module, in graph order."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    summaries = []
    for _, module in graph_module.named_children():
        if isinstance(module, LoweredBackendModule) and module.backend_id == "XnnpackBackend":
            with tempfile.TemporaryDirectory(prefix="edgetl-xnnpack-") as workdir:
                summaries.append(summarize(_payload_graph(module.processed_bytes, Path(workdir))))
    return summaries
