"""int8 input and output for a .tflite converted in litert-torch's strict Q/DQ mode.

Float fallback of a layer needs the converter's strict Q/DQ mode: without it the converter quantizes every
float weight that sits between int8 activations, so the fallback would silently be int8 again (measured with
litert-torch 0.10.0 on MobileNetV2: the stem's float filter came out int8 with per-channel scales). Strict mode
keeps exactly the graph's Q/DQ pairs but leaves the model's own input float (a QUANTIZE right after it) and its
output float (a DEQUANTIZE right before it). Apps and `edgetl verify` expect the int8 interface every other
int8 export has, so this module moves the interface onto those int8 tensors and drops the two conversions —
what TensorFlow's `modify_model_interface` does, which litert-torch and ai-edge-litert do not ship.
"""

from __future__ import annotations

from typing import Any


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def _opcode(model: Any, op: Any) -> int:
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def int8_interface(payload: bytes) -> bytes:
    """The same model with each float input that only feeds a QUANTIZE to int8, and each float output made by a
    DEQUANTIZE of an int8 tensor, replaced by that int8 tensor (its scale and zero-point are the Q/DQ's)."""
    import flatbuffers

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(payload, 0)
    if len(model.subgraphs) != 1:
        raise ValueError(f"expected one subgraph, the model has {len(model.subgraphs)}")
    graph = model.subgraphs[0]
    quantize, dequantize = schema.BuiltinOperator.QUANTIZE, schema.BuiltinOperator.DEQUANTIZE
    float32, int8 = schema.TensorType.FLOAT32, schema.TensorType.INT8
    readers: dict[int, list[int]] = {}
    for index, op in enumerate(graph.operators):
        for tensor in op.inputs:
            readers.setdefault(tensor, []).append(index)
    producer = {tensor: index for index, op in enumerate(graph.operators) for tensor in op.outputs}
    dropped: set[int] = set()
    moved: dict[int, int] = {}  # interface tensor: the int8 tensor that replaces it
    for tensor in graph.inputs:
        users = readers.get(tensor, [])
        if graph.tensors[tensor].type != float32 or len(users) != 1:
            continue
        op = graph.operators[users[0]]
        if _opcode(model, op) == quantize and graph.tensors[op.outputs[0]].type == int8:
            dropped.add(users[0])
            moved[tensor] = op.outputs[0]
    for tensor in graph.outputs:
        index = producer.get(tensor)
        if index is None or graph.tensors[tensor].type != float32:
            continue
        op = graph.operators[index]
        source = op.inputs[0]
        if _opcode(model, op) == dequantize and graph.tensors[source].type == int8 and source not in graph.outputs:
            dropped.add(index)
            moved[tensor] = source
    if not moved:
        return payload
    for old, new in moved.items():  # the int8 tensor takes the interface's name; the float one is left unused
        graph.tensors[new].name, graph.tensors[old].name = graph.tensors[old].name, graph.tensors[new].name
    graph.inputs = [moved.get(t, t) for t in graph.inputs]
    graph.outputs = [moved.get(t, t) for t in graph.outputs]
    graph.operators = [op for index, op in enumerate(graph.operators) if index not in dropped]
    for signature in model.signatureDefs or []:
        for entry in (*(signature.inputs or []), *(signature.outputs or [])):
            entry.tensorIndex = moved.get(entry.tensorIndex, entry.tensorIndex)
    builder = flatbuffers.Builder(len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
