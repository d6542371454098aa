"""Torch graphs for `edgetl export`: the float model behind an NHWC input, its PT2E int8 graph, and the two
converters (ExecuTorch with the XNNPACK delegate, litert-torch to TFLite).

Both formats start from one graph per precision: the float model behind an NHWC input (what camera frames
are on a phone) and, for int8, the one PT2E-quantized version of it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import pickle
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetl.backends.torch.hardswish import native_hardswish
from edgetl.backends.torch.models import build_model, to_int8_form
from edgetl.backends.torch.quantize import bias_correct, fold_batchnorm, quantize_ptq, quantize_ptq_observers
from edgetl.backends.torch.xnnpack_graph import partitions
from edgetl.errors import UserError
from edgetl.ui import quiet_native

# Nodes that move, view or re-stride data only; anything else left outside the XNNPACK delegate runs on
# slow portable kernels. (EfficientNet's pooled [1, C, 1, 1] → [1, C] re-stride lands outside: C floats.)
LAYOUT_OPS = ("getitem", "view_copy", "squeeze_copy", "unsqueeze_copy", "as_strided_copy", "clone", "_assert",
              "permute_copy", "expand_copy", "to_dim_order_copy", "alloc")


class ChannelsLastInput(nn.Module):
    """Takes NHWC images (as apps and the TFLite convention feed them) and runs the NCHW model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.permute(0, 3, 1, 2))


def load_model(checkpoint: Path, manifest) -> nn.Module:
    """The fine-tuned float model in eval mode, from the checkpoint's own weights file (`manifest`: a
    contracts.CheckpointManifest)."""
    spec = manifest.model
    model = build_model(spec.backbone, spec.width, spec.num_classes)
    path = Path(checkpoint) / manifest.weights_file
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:  # damaged or foreign file
        raise UserError(f"checkpoint weights {str(path)!r} cannot be loaded into a {spec.backbone} "
                        f"({type(error).__name__}); valid: the weights file edgetl finetune wrote beside this "
                        f"manifest") from None
    return model.eval()


def logits(module: nn.Module, x: np.ndarray, batch: int = 100) -> np.ndarray:
    """Run a torch module over NHWC float32 images in batches; float32 logits. A Q/DQ graph runs in its evaluation
    form (`qdq_simulation`: the same logits, bit for bit, in well under half the time at 224 px)."""
    from edgetl.backends.torch.qdq_simulation import has_activation_quantization, simulation

    if has_activation_quantization(module):
        module = simulation(module)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(x), batch):
            outputs.append(module(torch.from_numpy(np.ascontiguousarray(x[start : start + batch]))).float())
    return torch.cat(outputs).numpy()


# How each activation observer of quantize.ACTIVATION_OBSERVERS is described in the manifest
OBSERVED_AS = {"histogram": "HistogramObserver",
               "per-image": "running mean of each image's min/max (MovingAverageMinMaxObserver, one image per batch)",
               "percentile": "0.01% to 99.99% quantiles of all calibration values (PercentileObserver)"}


def quantize_ptq_graphs(float_model: nn.Module, example: torch.Tensor, calibration: np.ndarray,
                        observers: Iterable[str] = ("histogram",), bias_correction: bool = True,
                        fuse_clamp: bool = True, rounded_layers: list[str] | None = None,
                        rounding_iterations: int = 400, float_layers: tuple[str, ...] = (),
                        rounded: tuple[nn.Module, dict, dict | None] | None = None,
                        equalization: bool = False) -> dict[str, tuple[torch.fx.GraphModule, dict]]:
    """The PT2E int8 (Q/DQ) graph of the NHWC `float_model` for each activation observer in `observers`,
    calibrated on `calibration` (NHWC), and what the manifest records about it. The observers share the work:
    BatchNorm folding, equalization, learned rounding, bias correction (26 s of each observer's 60 when each was
    made alone, EfficientNet-Lite0 at 224 px, one thread) and, for the batch-fed observers, the calibration pass
    (`quantize_ptq_observers`). `rounded_layers`: layers (names in the BN-folded model) whose int8 rounding is
    learned (`adaround`) instead of nearest; the graph stays the same. `rounded`: an earlier call's learned
    rounding (`info["_rounded"]`), reused instead of learning it again. `float_layers`: layers whose weights stay
    float (a float kernel between int8 activations). `equalization`: cross-layer equalization and bias absorption
    (`equalize.py`) before rounding, where they are exact on the calibration images."""
    started = time.perf_counter()
    calib = torch.from_numpy(np.ascontiguousarray(calibration))
    learned, equalized = None, None
    if rounded is not None:
        prepared, learned, equalized = copy.deepcopy(rounded[0]), rounded[1], rounded[2]
    else:
        prepared = to_int8_form(fold_batchnorm(float_model, example))
        if equalization:
            from edgetl.backends.torch.equalize import equalize

            prepared, equalized = equalize(prepared, calib)
        if rounded_layers:
            from edgetl.backends.torch.adaround import adaround

            prepared, learned = adaround(prepared, calib, rounded_layers, iterations=rounding_iterations)
            rounded = (copy.deepcopy(prepared), learned, equalized)
    if bias_correction:
        prepared = bias_correct(prepared, calib, float_layers)
    observers = tuple(observers)
    if len(observers) == 1:
        calibrated = {observers[0]: quantize_ptq(prepared, example, torch.split(calib, 64), fuse_clamp=fuse_clamp,
                                                 float_layers=float_layers, activations=observers[0])}
    else:
        calibrated = quantize_ptq_observers(prepared, example, torch.split(calib, 64), observers,
                                            fuse_clamp=fuse_clamp, float_layers=float_layers)
    seconds = round(time.perf_counter() - started, 1)
    made = {}
    for activations, graph in calibrated.items():
        info = {
            "method": "pt2e-ptq" + ("+equalization" if equalized else "") + ("+adaround" if learned else "")
            + ("+float-fallback" if float_layers else ""),
            "quantizer": "XNNPACKQuantizer (executorch), ReLU6 outputs observed after the clamp, each mean on its "
                         "own range" if fuse_clamp
            else "XNNPACKQuantizer (executorch)",
            "weights": "int8, symmetric, per output channel (BatchNorm folded first)"
            + (f"; learned rounding on {len(learned['layers'])} layer(s)" if learned else ""),
            "activations": "int8, per tensor, affine, " + OBSERVED_AS[activations],
            "calibration_images": int(len(calibration)),
            "bias_correction": bool(bias_correction),
            "fuse_clamp": bool(fuse_clamp),
            "seconds": seconds,  # for all of `observers` together: they share every step
            "input_quantization": first_input_qparams(graph),
        }
        if equalized is not None:
            info["equalization"] = equalized
        if learned:
            info["learned_rounding"] = learned
            info["_rounded"] = rounded  # not JSON: the backend keeps it for a later remedy, drops it from the record
        if float_layers:
            info["float_layers"] = list(float_layers)
            info["weights"] += f"; {len(float_layers)} layer(s) kept float: {', '.join(float_layers)}"
        made[activations] = (graph, info)
    return made


def quantize_ptq_graph(float_model: nn.Module, example: torch.Tensor, calibration: np.ndarray,
                       activations: str = "histogram", **options) -> tuple[torch.fx.GraphModule, dict]:
    """`quantize_ptq_graphs` for one activation observer: its graph and record."""
    return quantize_ptq_graphs(float_model, example, calibration, observers=(activations,), **options)[activations]


def layer_sensitivity(float_model: nn.Module, example: torch.Tensor, calibration: np.ndarray,
                      seconds: float, images: int = 64, known: dict | None = None) -> dict:
    """Per-layer int8 weight-rounding cost of the NHWC `float_model` on calibration images (`sensitivity`);
    `known`: an earlier, time-bounded table of the same model to complete."""
    from edgetl.backends.torch.sensitivity import layer_sensitivity as measure

    folded = fold_batchnorm(float_model, example)
    return measure(folded, torch.from_numpy(np.ascontiguousarray(calibration)), seconds=seconds,
                   images=known["images"] if known else images, known=known)


def first_input_qparams(graph: torch.fx.GraphModule) -> dict | None:
    """Scale/zero-point the int8 graph applies to its float input (the .pte quantizes inside XNNPACK)."""
    for node in graph.graph.nodes:
        if node.op == "call_function" and "quantize_per_tensor" in str(node.target) and "dequant" not in str(
            node.target
        ):
            scale, zero_point = node.args[1], node.args[2]
            if isinstance(scale, float | int) and isinstance(zero_point, int):
                return {"scale": float(scale), "zero_point": int(zero_point)}
            return None
    return None


def xnnpack_partitioner():
    """ExecuTorch's XNNPACK partitioner, told that an int8 add may end in a clamp and that XNNPACK runs an int8
    hardswish (see `hardswish.native_hardswish`).

    Its add config looks past a fused ReLU for the quantize that makes an add int8, but not past a hardtanh, which
    its own activation-fusion pass does fuse into an add. So each hardswish's `relu6(x + 3)` (`Int8Hardswish`) was
    delegated as a float add between two conversions: three passes over the feature map instead of one, and a
    float island inside the partition (MobileNetV3-Large at 128 px: 21 such adds, 65 conversions).
    """
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import AddConfig, HardswishConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class ClampedAddConfig(AddConfig):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.fused_acts = [*self.fused_acts, "hardtanh.default"]

    class Int8HardswishConfig(HardswishConfig):
        """XNNPACK runs hardswish in int8 (a lookup table); the stock config offers it in fp32 only."""

        def supported_precision_types(self) -> list:
            return [ConfigPrecisionType.FP32, ConfigPrecisionType.STATIC_QUANT]

    replaced = {AddConfig: ClampedAddConfig, HardswishConfig: Int8HardswishConfig}
    return XnnpackPartitioner(configs=[replaced.get(config, config) for config in ALL_PARTITIONER_CONFIGS])


def pte_graph(graph: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """The Q/DQ graph as `lower_pte` lowers it (the debugger computes its reference from the same): weights folded to
    int8 constants, each written-out hardswish as one int8 operator; and how many hardswishes were rewritten."""
    folded = _fold_weight_quantization(graph)
    return folded, native_hardswish(folded)


def lower_pte(module: nn.Module, example: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[bytes, dict]:
    """ExecuTorch program with everything XNNPACK takes delegated; returns bytes and delegation counts.
    `example`: the input, or a tuple of inputs (a block of the network on its own may read several)."""
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    rewritten = 0
    if isinstance(module, torch.fx.GraphModule):
        module, rewritten = pte_graph(module)
    with quiet_native():
        program = torch.export.export(module, example if isinstance(example, tuple) else (example,))
        edge = to_edge_transform_and_lower(program, partitioner=[xnnpack_partitioner()])
        info = get_delegation_info(edge.exported_program().graph_module)
        try:
            inside, unread = partitions(edge.exported_program().graph_module), None
        except (OSError, subprocess.SubprocessError, ValueError) as error:  # the file is fine; only the reading failed
            inside, unread = [], f"{type(error).__name__}: {error}".splitlines()[0][:300]
        buffer = edge.to_executorch().buffer
    by_op = {
        name: {"delegated": int(b.delegated), "outside": int(b.non_delegated)}
        for name, b in sorted(info.delegation_by_operator.items())
    }
    outside = sorted(name for name, b in by_op.items() if b["outside"] and not any(op in name for op in LAYOUT_OPS))
    delegation = {
        "delegate": "XnnpackBackend",
        "subgraphs": int(info.num_delegated_subgraphs),
        "delegated_nodes": int(info.num_delegated_nodes),
        "outside_nodes": int(info.num_non_delegated_nodes),
        "compute_ops_outside": outside,
        "by_operator": by_op,
        # what XNNPACK runs, read back from each partition's serialized graph (after its fusion passes)
        "xnnpack_nodes": _sum_counts(part["nodes"] for part in inside),
        "xnnpack_conversions": sum(part["conversions"] for part in inside),
        "xnnpack_float_compute": _sum_counts(part["float_compute"] for part in inside),
        "int8_hardswish": rewritten,  # written-out hardswishes of the shared graph lowered as XNNPACK's int8 one
    }
    if unread is not None:
        delegation.update(xnnpack_nodes=None, xnnpack_conversions=None, xnnpack_float_compute=None,
                          xnnpack_unread=unread)
    return bytes(buffer), delegation


def _sum_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for count in counts:
        total.update(count)
    return dict(sorted(total.items()))


def pte_parts(module: nn.Module, example: torch.Tensor) -> list[dict]:
    """Each block of the network (stem, every inverted-residual block, head) lowered to a .pte of its own from the
    graph `module` (the float model or its PT2E int8 graph) that the whole .pte was lowered from (`parts`)."""
    from edgetl.backends.torch.parts import build

    graph = module if isinstance(module, torch.fx.GraphModule) else torch.export.export(module, (example,)).module()
    sample = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, tuple(example.shape)).astype(np.float32))
    made = []
    for part in build(graph, sample):
        payload, delegation = lower_pte(part.module, part.inputs)
        made.append({"name": part.name, "role": part.role, "macs": part.macs, "payload": payload,
                     "delegated_nodes": delegation["delegated_nodes"],
                     "compute_ops_outside": delegation["compute_ops_outside"]})
    return made


def _fold_weight_quantization(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Pre-compute int8 weights (quantize of a constant) in a copy: ExecuTorch has no runtime kernel for
    a per-channel quantize, while litert-torch wants the unfolded form. Same scales, same int8 values."""
    from torchao.quantization.pt2e.constant_fold import constant_fold

    quantize_ops = {
        torch.ops.quantized_decomposed.quantize_per_tensor.default,
        torch.ops.quantized_decomposed.quantize_per_tensor.tensor,
        torch.ops.quantized_decomposed.quantize_per_channel.default,
    }
    graph = copy.deepcopy(graph)
    constant_fold(graph, lambda node: node.op == "call_function" and node.target in quantize_ops)
    graph.recompile()
    return graph


@contextlib.contextmanager
def _strict_qdq() -> Iterator[None]:
    """litert-torch's converter in strict Q/DQ mode, which it has but does not expose (see tflite_interface)."""
    from litert_torch._convert import litert_converter

    api = litert_converter.converter_api_ext
    original = api.ConvertToTFLConfig
    if not hasattr(original(), "strict_qdq_mode"):
        raise RuntimeError("this litert-torch's converter has no strict Q/DQ mode, so float layers would be "
                           "quantized in the .tflite; export without --float-layers")

    def strict() -> object:
        config = original()
        config.strict_qdq_mode = True
        return config

    api.ConvertToTFLConfig = strict
    try:
        yield
    finally:
        api.ConvertToTFLConfig = original


def convert_tflite(module: nn.Module, example: torch.Tensor, quantized: bool, strict_qdq: bool = False) -> bytes:
    """TFLite flatbuffer via litert-torch; a Q/DQ graph becomes int8 kernels with int8 input/output.
    `strict_qdq`: only the graph's own Q/DQ pairs are quantized (float fallback of layers needs it)."""
    import litert_torch

    quant_config = None
    if quantized:
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig

        # Only tells the converter the Q/DQ pairs are static int8; the graph is already quantized.
        static = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
        quant_config = QuantConfig(pt2e_quantizer=PT2EQuantizer().set_global(static))
    with quiet_native(), _strict_qdq() if strict_qdq else contextlib.nullcontext():
        edge_model = litert_torch.convert(module, (example,), quant_config=quant_config)
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"edgetl-{os.getpid()}-{time.monotonic_ns()}.tflite"
        try:
            edge_model.export(str(path))
            payload = path.read_bytes()
        finally:
            path.unlink(missing_ok=True)
    if strict_qdq:
        from edgetl.backends.torch.tflite_interface import int8_interface

        payload = int8_interface(payload)
    return payload
