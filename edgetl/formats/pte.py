"""The ExecuTorch runtime for .pte files (its Python bindings take torch tensors, so torch is imported here,
only when a .pte is run or described)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgetl.errors import UserError
from edgetl.formats.base import AppTemplates, Format

if TYPE_CHECKING:
    import numpy as np

# ExecuTorch ScalarType codes (c10 numbering) of the dtypes an image classifier takes or gives.
DTYPES = {0: "uint8", 1: "int8", 3: "int32", 4: "int64", 6: "float32"}


def _program(path: Path):
    try:
        from executorch.runtime import Runtime
    except ImportError as error:
        raise UserError(f"the ExecuTorch runtime is not installed ({error}); pip install 'edgetl[torch]'") from None
    return Runtime.get().load_program(Path(path))


def run(path: Path, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    import numpy as np
    import torch

    if threads:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)
    method = _program(path).load_method("forward")
    outputs = []
    for index in range(len(x)):
        result = method.execute([torch.from_numpy(np.ascontiguousarray(x[index : index + 1]))])
        outputs.append(result[0].detach().numpy().reshape(-1))
    return np.stack(outputs).astype(np.float32)


def run_inputs(path: Path, inputs: list[np.ndarray]) -> np.ndarray:
    """A program of several inputs (a block of a network, `--debug-numerics`): image i of every array in `inputs`
    goes in together; the last output of each call, stacked in its own shape."""
    import numpy as np
    import torch

    method = _program(path).load_method("forward")
    outputs = []
    for index in range(len(inputs[0])):
        tensors = [torch.from_numpy(np.ascontiguousarray(values[index : index + 1])) for values in inputs]
        outputs.append(method.execute(tensors)[-1].detach().float().numpy())
    return np.concatenate(outputs).astype(np.float32)


def describe(path: Path) -> dict:
    """Input and output tensors of `forward`, as the program's own metadata gives them (no names in a .pte)."""
    from edgetl.formats.tensors import tensor_info

    meta = _program(path).metadata("forward")

    def tensor(info, name: str) -> dict:
        code = int(info.dtype())
        return tensor_info(name, DTYPES.get(code, f"scalar type {code}"), list(info.sizes()))

    return {"inputs": [tensor(meta.input_tensor_meta(i), f"input {i}") for i in range(meta.num_inputs())],
            "outputs": [tensor(meta.output_tensor_meta(i), f"output {i}") for i in range(meta.num_outputs())]}


def facts(path: Path) -> dict:
    """Nothing beyond its tensors: the delegation is what the converter reported."""
    return {}


APPS = AppTemplates(
    android_dependency="org.pytorch:executorch-android:{executorch}",
    android_note="ExecuTorch AAR; keep it at the version that wrote the .pte",
    ios_manifest="Package.swift",
    ios_readme=(
        "## iOS (Swift package `ios/{package}`, ExecuTorch through SwiftPM)",
        "",
        "1. Copy `ios/{package}/` into your repository.",
        "2. Xcode → File → Add Package Dependencies… → Add Local… → choose that folder (it pulls ExecuTorch "
        "from its `swiftpm-{executorch}` branch).",
        "3. Add the `{package}` library to your app target.",
        "4. In code: `let top = try ImageClassifier().classify(cgImage, k: 3)`.",
        "5. `swift test` is not possible for iOS-only binaries; run the `{package}Tests` scheme "
        "(Product → Test) on a device or simulator for the golden-image self-test.",
        "",
    ),
    device_bench_readme=("- .pte on a phone: the ExecuTorch Python runtime needs torch; use device_bench's `--runner` "
                         "with the native runner that `edgetl bench --setup arm64` builds.",),
)

FORMAT = Format(
    name="pte", suffix=".pte", runtime="ExecuTorch (XNNPACK delegate)",
    converters={"torch": "ExecuTorch to_edge_transform_and_lower (XnnpackPartitioner)"},
    blocks="lowered", arm64="runner", python_runtime=("executorch", "torch"),
    python_runtime_index="https://download.pytorch.org/whl/cpu", quantizes_inside=True, bundle=APPS,
    libraries=("executorch",),
    style=("tab:orange", "^"))
