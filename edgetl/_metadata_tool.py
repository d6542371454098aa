"""Standalone helper run by `edgetl.tflite_metadata` inside its own small venv (mediapipe + numpy).

Why a separate script: the TFLite model and metadata flatbuffer schemas come generated inside the
mediapipe wheel, and mediapipe cannot share edgetl's main environment (absl-py conflict). This file
imports only the standard library, numpy, flatbuffers and those two generated modules (loaded by file
path, so mediapipe's heavy package init never runs), plus mediapipe itself for `classify`.
It never imports edgetl. Commands (one JSON request file as argument, JSON answer on stdout):

  write     attach standard TFLite metadata (labels as an associated file, NormalizationOptions,
            ImageProperties) and, on request, float32 input/output around an int8 model and
            per-channel normalisation inside the graph
  read      report the metadata and the input/output tensors of a .tflite
  classify  run MediaPipe Tasks' ImageClassifier on image files and report top-k
  task_classify  the same with the TFLite Task Library (run in a tflite-support venv instead)
"""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path
from types import ModuleType

METADATA_NAME = "TFLITE_METADATA"
TYPES = {0: "float32", 3: "uint8", 9: "int8"}


def _schemas() -> tuple[ModuleType, ModuleType]:
    """The model schema and the metadata schema, from the mediapipe wheel, without importing mediapipe."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mediapipe is not installed in this environment")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "metadata"
    loaded = []
    for stem in ("schema_py_generated", "metadata_schema_py_generated"):
        module_spec = importlib.util.spec_from_file_location(f"_edgetl_{stem}", folder / f"{stem}.py")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        loaded.append(module)
    return loaded[0], loaded[1]


def _load_model(schema: ModuleType, payload: bytes):
    model = schema.ModelT.InitFromPackedBuf(payload, 0)
    for buffer in model.buffers or []:
        if buffer.offset > 1:
            raise SystemExit("this .tflite keeps weights outside the flatbuffer (over 2 GB); not supported")
    return model


def _opcode(schema: ModuleType, model, code: int, version: int) -> int:
    """Index of a builtin operator code in the model, added when missing."""
    for index, entry in enumerate(model.operatorCodes):
        if max(entry.builtinCode, entry.deprecatedBuiltinCode) == code and not entry.customCode:
            entry.version = max(entry.version, version)
            return index
    entry = schema.OperatorCodeT()
    entry.builtinCode, entry.deprecatedBuiltinCode, entry.version = code, min(code, 127), version
    model.operatorCodes.append(entry)
    return len(model.operatorCodes) - 1


def _tensor(schema: ModuleType, model, shape: list[int], name: str, data: bytes | None = None) -> int:
    """A new float32 tensor in subgraph 0 (a constant when `data` is given); returns its index."""
    import numpy as np

    buffer = schema.BufferT()
    if data is not None:
        buffer.data = np.frombuffer(data, dtype=np.uint8)
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.shape, tensor.type, tensor.name = list(shape), schema.TensorType.FLOAT32, name
    tensor.buffer = len(model.buffers) - 1
    graph = model.subgraphs[0]
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def _op(schema: ModuleType, model, code: int, version: int, inputs: list[int], outputs: list[int],
        options: tuple[int, object] | None = None):
    op = schema.OperatorT()
    op.opcodeIndex = _opcode(schema, model, code, version)
    op.inputs, op.outputs = inputs, outputs
    if options is not None:
        op.builtinOptionsType, op.builtinOptions = options
    return op


def _affine(schema: ModuleType, kind: str):
    options = schema.MulOptionsT() if kind == "mul" else schema.AddOptionsT()
    options.fusedActivationFunction = schema.ActivationFunctionType.NONE
    return (schema.BuiltinOptions.MulOptions if kind == "mul" else schema.BuiltinOptions.AddOptions), options


def _wrap_io(schema: ModuleType, model, float_io: bool, pixel_affine: tuple[list[float], list[float]] | None,
             softmax: bool = False) -> None:
    """Edit the graph's edges only, never its int8 core:
    - `pixel_affine` (multiplier, offset per channel): the model takes float pixels (0..255) and
      normalises them itself (MUL, ADD), for per-channel mean/std that MediaPipe cannot express;
    - `float_io`: QUANTIZE before an int8/uint8 input and DEQUANTIZE after an int8/uint8 output (MediaPipe
      wants float32 or uint8 tensors, and feeds a uint8 one raw pixels, which a quantized input is not);
    - `softmax`: SOFTMAX after a float output, so MediaPipe and the Task Library report probabilities."""
    import numpy as np

    graph = model.subgraphs[0]
    graph.inputs, graph.outputs = [int(v) for v in graph.inputs], [int(v) for v in graph.outputs]
    old_in, old_out = graph.inputs[0], graph.outputs[0]
    shape = [int(v) for v in graph.tensors[old_in].shape]
    front = []
    head = old_in
    quantized = (schema.TensorType.INT8, schema.TensorType.UINT8)
    if float_io and graph.tensors[old_in].type in quantized:
        head = _tensor(schema, model, shape, "image")
        front.append(_op(schema, model, schema.BuiltinOperator.QUANTIZE, 2, [head], [old_in]))
    if pixel_affine is not None:
        if graph.tensors[head].type != schema.TensorType.FLOAT32:
            raise SystemExit("in-graph normalisation needs a float32 input (drop --int8-io)")
        scale, offset = (np.asarray(v, dtype="<f4").tobytes() for v in pixel_affine)
        pixels = _tensor(schema, model, shape, "pixels")
        scaled = _tensor(schema, model, shape, "pixels_scaled")
        multiplier = _tensor(schema, model, [len(pixel_affine[0])], "pixel_multiplier", scale)
        shift = _tensor(schema, model, [len(pixel_affine[1])], "pixel_offset", offset)
        front = [_op(schema, model, schema.BuiltinOperator.MUL, 1, [pixels, multiplier], [scaled],
                     _affine(schema, "mul")),
                 _op(schema, model, schema.BuiltinOperator.ADD, 1, [scaled, shift], [head], _affine(schema, "add")),
                 *front]
        head = pixels
    graph.operators[0:0] = front
    graph.inputs[0] = head
    if float_io and graph.tensors[old_out].type in quantized:
        new_out = _tensor(schema, model, [int(v) for v in graph.tensors[old_out].shape], "logits")
        graph.operators.append(_op(schema, model, schema.BuiltinOperator.DEQUANTIZE, 2, [old_out], [new_out]))
        graph.outputs[0] = new_out
    last = graph.outputs[0]
    if softmax and graph.tensors[last].type == schema.TensorType.FLOAT32:
        probabilities = _tensor(schema, model, [int(v) for v in graph.tensors[last].shape], "probabilities")
        options = schema.SoftmaxOptionsT()
        options.beta = 1.0
        graph.operators.append(_op(schema, model, schema.BuiltinOperator.SOFTMAX, 1, [last], [probabilities],
                                   (schema.BuiltinOptions.SoftmaxOptions, options)))
        graph.outputs[0] = probabilities
    for signature in model.signatureDefs or []:
        for entry in signature.inputs or []:
            if entry.tensorIndex == old_in:
                entry.tensorIndex = graph.inputs[0]
        for entry in signature.outputs or []:
            if entry.tensorIndex == old_out:
                entry.tensorIndex = graph.outputs[0]


def _metadata_bytes(meta: ModuleType, request: dict) -> bytes:
    import flatbuffers

    image = meta.TensorMetadataT()
    image.name, image.description = "image", request["input_description"]
    image.content = meta.ContentT()
    image.content.contentPropertiesType = meta.ContentProperties.ImageProperties
    image.content.contentProperties = meta.ImagePropertiesT()
    image.content.contentProperties.colorSpace = meta.ColorSpaceType.RGB
    norm = meta.NormalizationOptionsT()
    norm.mean, norm.std = [float(v) for v in request["mean"]], [float(v) for v in request["std"]]
    unit = meta.ProcessUnitT()
    unit.optionsType, unit.options = meta.ProcessUnitOptions.NormalizationOptions, norm
    image.processUnits = [unit]
    image.stats = meta.StatsT()
    image.stats.min, image.stats.max = list(request["input_min"]), list(request["input_max"])

    labels = meta.AssociatedFileT()
    labels.name, labels.description = Path(request["labels_file"]).name, "One label per output class."
    labels.type = meta.AssociatedFileType.TENSOR_AXIS_LABELS
    scores = meta.TensorMetadataT()
    scores.name, scores.description = request.get("output_name", "logits"), request["output_description"]
    scores.content = meta.ContentT()
    scores.content.contentPropertiesType = meta.ContentProperties.FeatureProperties
    scores.content.contentProperties = meta.FeaturePropertiesT()
    scores.stats = meta.StatsT()
    scores.associatedFiles = [labels]

    graph = meta.SubGraphMetadataT()
    graph.name = "image_classifier"
    graph.inputTensorMetadata, graph.outputTensorMetadata = [image], [scores]
    model = meta.ModelMetadataT()
    model.name, model.description = request["name"], request["description"]
    model.version, model.author, model.license = request["version"], request["author"], request.get("license")
    model.subgraphMetadata = [graph]
    model.minParserVersion = "1.0.0"
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), b"M001")
    return bytes(builder.Output())


def write(request: dict) -> dict:
    """Model bytes + metadata buffer + labels zipped onto the end, as the TFLite metadata convention has it."""
    import flatbuffers
    import numpy as np

    schema, meta = _schemas()
    model = _load_model(schema, Path(request["model_in"]).read_bytes())
    affine = request.get("pixel_affine")
    if request.get("float_io") or affine or request.get("softmax"):
        _wrap_io(schema, model, bool(request.get("float_io")), tuple(affine) if affine else None,
                 bool(request.get("softmax")))
    kept = [m for m in (model.metadata or []) if _text(m.name) != METADATA_NAME]
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(_metadata_bytes(meta, request), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [*kept, entry]
    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), b"TFL3")
    out = Path(request["model_out"])
    out.write_bytes(bytes(builder.Output()))
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as archive:
        archive.write(request["labels_file"], Path(request["labels_file"]).name)
    return read({"model": str(out)})


def read(request: dict) -> dict:
    """Metadata (as plain values) and the I/O tensors of subgraph 0, for tests and the bundle record."""
    schema, meta = _schemas()
    payload = Path(request["model"]).read_bytes()
    model = _load_model(schema, payload)
    graph = model.subgraphs[0]

    def tensor(index: int) -> dict:
        t = graph.tensors[index]
        q = t.quantization
        scale = list(q.scale) if q is not None and q.scale is not None else []
        zero = list(q.zeroPoint) if q is not None and q.zeroPoint is not None else []
        return {"dtype": TYPES.get(t.type, str(t.type)), "shape": [int(v) for v in t.shape],
                "quantization": {"scale": float(scale[0]), "zero_point": int(zero[0])} if scale else None}

    result: dict = {"input": tensor(graph.inputs[0]), "output": tensor(graph.outputs[0]), "metadata": None,
                    "associated_files": []}
    for entry in model.metadata or []:
        if _text(entry.name) != METADATA_NAME:
            continue
        data = bytes(bytearray(model.buffers[entry.buffer].data))
        assert meta.ModelMetadata.ModelMetadataBufferHasIdentifier(data, 0)
        parsed = meta.ModelMetadataT.InitFromPackedBuf(data, 0)
        sub = parsed.subgraphMetadata[0]
        image, scores = sub.inputTensorMetadata[0], sub.outputTensorMetadata[0]
        norm = image.processUnits[0].options
        result["metadata"] = {
            "name": _text(parsed.name), "version": _text(parsed.version),
            "min_parser_version": _text(parsed.minParserVersion),
            "mean": [float(v) for v in norm.mean], "std": [float(v) for v in norm.std],
            "color_space": image.content.contentProperties.colorSpace,
            "labels_file": _text(scores.associatedFiles[0].name),
            "labels_type": scores.associatedFiles[0].type,
        }
    try:
        with zipfile.ZipFile(request["model"]) as archive:
            result["associated_files"] = {n: archive.read(n).decode() for n in archive.namelist()}
    except zipfile.BadZipFile:
        pass
    return result


def _text(value: object) -> str | None:
    return value.decode() if isinstance(value, bytes) else value  # type: ignore[return-value]


def classify(request: dict) -> dict:
    """MediaPipe Tasks' ImageClassifier on each image file: the model as an app would take it."""
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core.base_options import BaseOptions

    options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_path=request["model"]),
                                            max_results=int(request.get("top_k", 3)))
    rows = []
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for path in request["images"]:
            result = classifier.classify(mp.Image.create_from_file(path))
            categories = result.classifications[0].categories
            rows.append([{"label": c.category_name, "index": c.index, "score": float(c.score)} for c in categories])
    return {"results": rows}


def task_classify(request: dict) -> dict:
    """The TFLite Task Library's ImageClassifier (tflite-support) on each image file."""
    from tflite_support.task import core, processor, vision

    options = vision.ImageClassifierOptions(
        base_options=core.BaseOptions(file_name=request["model"]),
        classification_options=processor.ClassificationOptions(max_results=int(request.get("top_k", 3))))
    classifier = vision.ImageClassifier.create_from_options(options)
    rows = []
    for path in request["images"]:
        categories = classifier.classify(vision.TensorImage.create_from_file(path)).classifications[0].categories
        rows.append([{"label": c.category_name, "index": c.index, "score": float(c.score)} for c in categories])
    return {"results": rows}


def main() -> None:
    command, request_file = sys.argv[1], sys.argv[2]
    request = json.loads(Path(request_file).read_text())
    handlers = {"write": write, "read": read, "classify": classify, "task_classify": task_classify}
    json.dump(handlers[command](request), sys.stdout)


if __name__ == "__main__":
    main()
