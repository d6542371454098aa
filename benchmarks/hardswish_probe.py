"""Which operators an `nn.Hardswish` becomes in edgetl's .tflite, float and int8, with the hardswish left to the
quantizer or annotated for int8 at its input and output.

    python benchmarks/hardswish_probe.py
    python benchmarks/hardswish_probe.py --backbone mobilenet_v3_small --out DIR   # then: edgetl bench each file
        --target arm64-a76 --arm-iters 2 --arm-samples 2 --allow-modified

Prints one JSON line per case: the operators of the converted file, and how many DELEGATE nodes LiteRT's default
XNNPACK delegate makes of them. The question it answers: can the int8 graph reach LiteRT's native int8 HARD_SWISH (one
operator) instead of the ADD, MUL, MUL that MobileNetV3's int8 files hold (docs/BENCHMARKS.md, "MobileNetV3 all
int8")? No weights or data are read: a seeded two-conv network on seeded random inputs.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

HARDSWISH = (torch.ops.aten.hardswish.default, torch.ops.aten.hardswish_.default)


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.Hardswish()
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.act2 = nn.Hardswish()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.depthwise(self.act(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def _annotating(quantize_module, annotate_hardswish: bool):  # noqa: ANN001, ANN202
    """The clamp-fusing quantizer, with hardswish nodes given int8 input and output specs when asked."""
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    base = quantize_module.ClampFusingQuantizer.annotate

    def annotate(self, model):  # noqa: ANN001, ANN202
        model = base(self, model)
        if annotate_hardswish:
            spec = self.global_config.output_activation
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target in HARDSWISH:
                    node.meta[quantize_module.ANNOTATION_KEY] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: spec}, output_qspec=spec, _annotated=True)
        return model

    return base, annotate


def operators(payload: bytes) -> dict:
    """The file's operators, and how many DELEGATE nodes LiteRT's default XNNPACK delegate adds once allocated."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=payload)
    listed = [op["op_name"] for op in interpreter._get_ops_details()]
    interpreter.allocate_tensors()
    delegates = [op["op_name"] for op in interpreter._get_ops_details()].count("DELEGATE")
    return {"operators": listed, "delegate_nodes": delegates}


def backbone_files(name: str, out: Path, size: int = 128) -> None:
    """A seeded `name` (10 classes) as two int8 .tflite files in `out`: edgetl's int8 form, and the same network
    with its squeeze-excite gates rewritten but every nn.Hardswish kept and annotated int8 (LiteRT's own
    HARD_SWISH). The a76 instruction counts of the two say which one the .tflite should hold."""
    from edgetl.backends.torch import export as graphs_of
    from edgetl.backends.torch import quantize
    from edgetl.backends.torch.models import InvertedResidualV3, build_model

    torch.manual_seed(0)
    net = build_model(name, 1.0, num_classes=10).eval()
    example = torch.randn(1, 3, size, size)
    calibration = np.random.default_rng(0).standard_normal((32, 3, size, size)).astype(np.float32)
    graph, _ = graphs_of.quantize_ptq_graph(net, example, calibration, bias_correction=False)
    out.mkdir(parents=True, exist_ok=True)
    files = {"int8form": graphs_of.convert_tflite(graph, example, quantized=True)}
    kept = quantize.fold_batchnorm(net, example)
    for module in kept.modules():
        if isinstance(module, InvertedResidualV3):
            module.to_int8_form()  # the gates only: to_int8_form() of the whole model would rewrite the hardswish
    base, annotate = _annotating(quantize, True)
    quantize.ClampFusingQuantizer.annotate = annotate
    try:
        graph = quantize.quantize_ptq(kept, example, [torch.from_numpy(calibration)])
    finally:
        quantize.ClampFusingQuantizer.annotate = base
    files["nativehs"] = graphs_of.convert_tflite(graph, example, quantized=True)
    for variant, payload in files.items():
        path = out / f"{name}-{size}-{variant}.tflite"
        path.write_bytes(payload)
        listed = operators(payload)
        print(json.dumps({"file": str(path), "delegate_nodes": listed["delegate_nodes"],
                          "operators": dict(Counter(listed["operators"]))}))


def main() -> None:
    from edgetl.backends.torch import export as graphs_of
    from edgetl.backends.torch import quantize

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", help="also write a backbone's two int8 files (e.g. mobilenet_v3_small)")
    parser.add_argument("--out", type=Path, default=Path("hardswish-probe"))
    args = parser.parse_args()
    if args.backbone:
        backbone_files(args.backbone, args.out)
        return

    torch.manual_seed(0)
    net = TwoConvs().eval()
    example = torch.randn(1, 3, 32, 32)
    calibration = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    print(json.dumps({"case": "fp32", **operators(graphs_of.convert_tflite(net, example, quantized=False))}))
    graph, _ = graphs_of.quantize_ptq_graph(net, example, calibration, bias_correction=False)
    print(json.dumps({"case": "int8, edgetl's int8 form (x * relu6(x + 3) / 6)",
                      **operators(graphs_of.convert_tflite(graph, example, quantized=True))}))
    batches = [torch.from_numpy(calibration)]
    for annotate_hardswish in (False, True):  # nn.Hardswish kept: straight to PT2E, without the int8 form
        base, annotate = _annotating(quantize, annotate_hardswish)
        quantize.ClampFusingQuantizer.annotate = annotate
        try:
            graph = quantize.quantize_ptq(net, example, batches)
        finally:
            quantize.ClampFusingQuantizer.annotate = base
        nodes = sum(n.target in HARDSWISH for n in graph.graph.nodes if n.op == "call_function")
        case = "int8, nn.Hardswish " + ("annotated int8 in and out" if annotate_hardswish else "left to the quantizer")
        print(json.dumps({"case": case, "hardswish_nodes_in_the_qdq_graph": nodes,
                          **operators(graphs_of.convert_tflite(graph, example, quantized=True))}))


if __name__ == "__main__":
    main()
