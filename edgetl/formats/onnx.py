"""ONNX, run in ONNX Runtime (its CPU execution provider): the format every other runtime imports.

fp32 is the float model exported by `torch.onnx.export` (the dynamo exporter); int8 is the same PT2E Q/DQ graph
the .tflite and the .pte are made from, exported as QuantizeLinear/DequantizeLinear pairs around float
operators, which ONNX Runtime fuses into int8 kernels. So the int8 policy (observer choice, remedies, budget)
holds for all three formats at once. Its runtime is imported only when a file of it runs or is made.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetl.errors import UserError
from edgetl.formats.base import Format
from edgetl.ui import quiet_native

if TYPE_CHECKING:
    import numpy as np

# ONNX tensor element types an image classifier takes or gives (onnx.TensorProto codes, as ORT names them).
DTYPES = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int64)": "int64"}


def session(path: Path, threads: int | None = None):
    """An ONNX Runtime session on the CPU. A missing onnxruntime is one UserError line; a file it refuses raises
    RuntimeError, which the stages record as that file's failure."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise UserError(f"onnxruntime is not installed ({error}); pip install 'edgetl[torch]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers are not the user's business
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's own exception types: the file's fault, so a failed row, not exit 2
        raise RuntimeError(f"ONNX Runtime refuses {Path(path).name} ({' '.join(str(error).split())[:200]})") \
            from None


def run(path: Path, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Float outputs, image by image. edgetl's .onnx files take and give float tensors (an int8 file quantizes
    inside, with the scale its graph holds), so nothing is (de)quantized here."""
    import numpy as np

    model = session(path, threads)
    source, target = model.get_inputs()[0], model.get_outputs()[0]
    outputs = [model.run([target.name], {source.name: np.ascontiguousarray(x[index : index + 1], np.float32)})[0]
               .reshape(-1) for index in range(len(x))]
    return np.stack(outputs).astype(np.float32)


def describe(path: Path) -> dict:
    """Input and output tensors as the graph declares them, and its operators by type."""
    from edgetl.formats.tensors import tensor_info

    model = session(path)

    def tensor(info: Any) -> dict:
        return tensor_info(info.name, DTYPES.get(info.type, info.type), [int(d) for d in info.shape])

    return {"inputs": [tensor(i) for i in model.get_inputs()], "outputs": [tensor(o) for o in model.get_outputs()],
            "ops": operators(path)}


def operators(path: Path) -> dict[str, int]:
    """How many nodes of each operator type the graph holds (QuantizeLinear/DequantizeLinear say what is int8)."""
    try:
        import onnx
    except ImportError:
        return {}
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def facts(path: Path) -> dict:
    """Nothing beyond its tensors and operators."""
    return {}


def convert_torch(module: Any, example: Any) -> bytes:
    """The ONNX file of a torch module (the float model, or the PT2E Q/DQ graph) on its example input, by the
    dynamo exporter, its graph optimised, weights inside the file."""
    import torch

    with quiet_native():
        program = torch.onnx.export(module, (example,), dynamo=True, optimize=True, verbose=False)
        buffer = io.BytesIO()
        program.save(buffer)
    return buffer.getvalue()


CONVERT = {"torch": convert_torch}

FORMAT = Format(
    name="onnx", suffix=".onnx", runtime="ONNX Runtime (CPUExecutionProvider)",
    converters={"torch": "torch.onnx.export (dynamo)"},
    blocks=None, arm64="python", guest=("onnxruntime==1.32.0", "onnxruntime"), quantizes_inside=True,
    bundle=False, default=False, libraries=("onnxruntime", "onnx", "onnxscript"), style=("tab:green", "D"))
