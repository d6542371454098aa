"""LiteRT (ai-edge-litert's Interpreter) for .tflite files: run, describe, read weight sparsity.

The Interpreter applies its default XNNPACK delegate when it is built, as on a phone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgetl.errors import UserError
from edgetl.formats.base import AppTemplates, Format
from edgetl.ui import quiet_native

if TYPE_CHECKING:
    import numpy as np


def interpreter(path: Path, threads: int | None = None):
    """An allocated Interpreter for `path`; a missing ai-edge-litert is one UserError line."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as error:
        raise UserError(f"ai-edge-litert is not installed ({error}); pip install 'edgetl[torch]'") from None
    with quiet_native():  # the delegate's banner and cpuinfo warnings come from C++
        model = Interpreter(model_path=str(path), num_threads=threads)
        model.allocate_tensors()
    return model


def run(path: Path, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    import numpy as np

    from edgetl.formats.tensors import dequantize, quantize

    model = interpreter(path, threads)
    source, target = model.get_input_details()[0], model.get_output_details()[0]
    in_dtype, out_dtype = np.dtype(source["dtype"]), np.dtype(target["dtype"])
    (in_scale, in_zero), (out_scale, out_zero) = source["quantization"], target["quantization"]
    outputs = []
    for index in range(len(x)):
        image = x[index : index + 1]
        image = quantize(image, in_scale, int(in_zero), in_dtype) if in_dtype.kind in "iu" else image.astype(in_dtype)
        model.set_tensor(source["index"], np.ascontiguousarray(image))
        model.invoke()
        result = model.get_tensor(target["index"]).reshape(-1)
        outputs.append(dequantize(result, out_scale, int(out_zero)) if out_dtype.kind in "iu" else result)
    return np.stack(outputs).astype(np.float32)


def _tensor(detail: dict) -> dict:
    import numpy as np

    from edgetl.formats.tensors import tensor_info

    scale, zero_point = detail["quantization"]
    return tensor_info(detail["name"], np.dtype(detail["dtype"]).name, detail["shape"], scale, zero_point)


def describe(path: Path) -> dict:
    """Tensors, op counts and how much of the graph LiteRT's XNNPACK delegate took."""
    model = interpreter(path)
    details = model._get_ops_details()
    ops: dict[str, int] = {}
    for op in details:
        ops[op["op_name"]] = ops.get(op["op_name"], 0) + 1
    # The delegate replaces the nodes it takes by DELEGATE nodes: one DELEGATE from the model's input to its
    # output means the whole graph runs in XNNPACK.
    inputs = {int(d["index"]) for d in model.get_input_details()}
    outputs = {int(d["index"]) for d in model.get_output_details()}
    delegates = [op for op in details if op["op_name"] == "DELEGATE"]
    whole = len(delegates) == 1 and inputs <= {int(i) for i in delegates[0]["inputs"]} and outputs == {
        int(i) for i in delegates[0]["outputs"]
    }
    return {
        "inputs": [_tensor(d) for d in model.get_input_details()],
        "outputs": [_tensor(d) for d in model.get_output_details()],
        "ops": dict(sorted(ops.items())),
        "delegation": {
            "delegate": "XNNPACK (LiteRT default CPU delegate)",
            "delegate_nodes": len(delegates),
            "graph_ops": len(details) - len(delegates),
            "whole_graph_delegated": bool(whole),
        },
    }


def weight_sparsity(path: Path) -> dict:
    """Exact-zero fraction of the weight tensors of conv / fully-connected ops, per op type."""
    import numpy as np

    model = interpreter(path)
    ops = model._get_ops_details()
    producers = {out: op for op in ops for out in op["outputs"]}
    totals: dict[str, list[int]] = {}
    for op in ops:
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") or len(op["inputs"]) < 2:
            continue
        index = int(op["inputs"][1])
        source = producers.get(index)
        if source is not None and source["op_name"] == "DEQUANTIZE":  # fp16 weights are dequantized at load
            index = int(source["inputs"][0])
        try:
            values = model.get_tensor(index)
        except ValueError:
            continue
        entry = totals.setdefault(op["op_name"], [0, 0])
        entry[0] += int(values.size)
        entry[1] += int(np.sum(values == 0))
    return {name: {"weights": n, "zeros": z, "sparsity": round(z / n, 4) if n else 0.0}
            for name, (n, z) in sorted(totals.items())}


def app_metadata(source: Path, target: Path, sidecar: dict, labels_file: Path, float_io: bool) -> dict:
    """`edgetl bundle`: `target` = `source` with standard TFLite metadata (labels, normalisation), float32 I/O
    around int8 when asked; what was written (edgetl.tflite_metadata)."""
    from edgetl.tflite_metadata import write_metadata

    return write_metadata(source, target, sidecar, labels_file, float_io=float_io)


def app_classify(model: Path, images: list[Path], top_k: int) -> list[list[dict]]:
    """`edgetl bundle`: top-k per image from MediaPipe Tasks' ImageClassifier, which reads that metadata as an
    app would."""
    from edgetl.tflite_metadata import mediapipe_classify

    return mediapipe_classify(model, images, top_k)


def facts(path: Path) -> dict:
    """What an export records about the file beyond its tensors: the weight sparsity of its kernels."""
    return {"weight_sparsity": weight_sparsity(path)}


APPS = AppTemplates(
    android_dependency="com.google.ai.edge.litert:litert:2.3.0",
    android_note="LiteRT (the runtime edgetl verified with: ai-edge-litert 2.3.0); Interpreter API",
    ios_manifest="{package}.podspec",
    ios_readme=(
        "## iOS (`ios/{package}`, TensorFlowLiteSwift through CocoaPods)",
        "",
        "TensorFlowLiteSwift is published only as a CocoaPod (there is no Swift package for it), so this "
        "folder is a CocoaPods development pod with the model, labels and preprocess.json as resources.",
        "",
        "1. Copy `ios/{package}/` into your repository.",
        "2. In your `Podfile`: `pod '{package}', :path => '{package}', :testspecs => ['Tests']`.",
        "3. `pod install`, then open the `.xcworkspace`.",
        "4. In code: `import {package}` and `let top = try ImageClassifier().classify(cgImage, k: 3)`.",
        "5. Product → Test on the `{package}-Unit-Tests` scheme runs the golden-image self-test.",
        "",
    ),
)

FORMAT = Format(
    name="tflite", suffix=".tflite", runtime="LiteRT (ai-edge-litert Interpreter)",
    converters={"torch": "litert-torch", "keras": "tf.lite.TFLiteConverter.from_keras_model"},
    blocks="cut", arm64="python", guest=("ai-edge-litert==2.3.0", "ai_edge_litert.interpreter"), bundle=APPS,
    alternatives=("tflite-runtime",),
    wheel_machines=("x86_64", "aarch64", "arm64"),  # ai-edge-litert: manylinux x86_64/aarch64, macOS arm64
    libraries=("ai-edge-litert",), style=("tab:blue", "s"))
