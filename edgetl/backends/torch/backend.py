"""The torch export backend: own model definitions, torch-pruning, PT2E int8 (PTQ or QAT), ExecuTorch and
litert-torch. Its policy: prune first when asked (the pruned float model is what every file is made from),
then int8 by QAT when asked (it learns its ranges in training, so no calibration set), else by post-training
quantization on the calibration images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgetl.backends.base import CAPABILITIES, Backend, Converted, Graphs
from edgetl.backends.torch import export as graphs_of
from edgetl.ui import console, quiet_native


class TorchBackend(Backend):
    capabilities = CAPABILITIES["torch"]
    _rounded = None  # the learned rounding of this export (BN-folded model and record), reused by float fallback
    _activations = "histogram"  # the activation observer later remedies build on (the "ranges" remedy may change it)

    def needs_calibration(self, config) -> bool:
        return "int8" in config.quant  # post-training, and the sensitivity table of every int8 export

    def load_float(self, checkpoint: Path, manifest, listing, config) -> Graphs:
        size = manifest.model.image_size
        example = torch.zeros(1, size, size, 3)
        if config.prune_spec is None:
            with quiet_native():
                model = graphs_of.load_model(checkpoint, manifest)
            return Graphs(float_model=graphs_of.ChannelsLastInput(model).eval(), example=example)
        from edgetl.backends.torch import compress

        # not silenced: the recovery fine-tune reports its epochs (it runs for minutes)
        pruned, pruning = compress.prune_model(checkpoint, manifest, listing, config.prune_spec, config)
        return Graphs(float_model=graphs_of.ChannelsLastInput(pruned).eval(), example=example, pruning=pruning,
                      float_label=f"pruned ({pruning['method']})")

    def quantize(self, graphs: Graphs, checkpoint: Path, manifest, listing, calibration: np.ndarray, config) -> None:
        if config.qat:
            from edgetl.backends.torch import compress

            graphs.int8, graphs.quantization = compress.qat_int8(checkpoint, manifest, listing, graphs.float_model,
                                                                 graphs.example, config)
            return
        console.print(f"int8: PT2E post-training quantization on {len(calibration)} calibration images…")
        with quiet_native():
            graphs.int8, graphs.quantization = graphs_of.quantize_ptq_graph(
                graphs.float_model, graphs.example, calibration, config.bias_correction, config.fuse_clamp)

    def quantized_layer_names(self, checkpoint: Path, manifest) -> list[str]:
        from edgetl.backends.torch.models import build_model
        from edgetl.backends.torch.sensitivity import quantized_layers

        spec = manifest.model  # names only: the architecture, no weights (channel pruning keeps the names)
        model = graphs_of.ChannelsLastInput(build_model(spec.backbone, spec.width, spec.num_classes))
        return [name for name, _ in quantized_layers(model)]

    def sensitivity(self, graphs: Graphs, calibration: np.ndarray, config) -> dict | None:
        if config.sensitivity_seconds <= 0 or not len(calibration):
            return None
        console.print(f"int8: per-layer sensitivity on {min(len(calibration), 64)} calibration images "
                      f"(at most {config.sensitivity_seconds:g} s)…")
        with quiet_native():
            return graphs_of.layer_sensitivity(graphs.float_model, graphs.example, calibration,
                                               config.sensitivity_seconds)

    def remedy(self, name: str, graphs: Graphs, checkpoint: Path, manifest, listing, calibration: np.ndarray,
               config) -> None:
        if name == "float-fallback":
            return self._float_fallback(graphs, calibration, config)
        if name == "ranges":
            return self._per_image_ranges(graphs, calibration, config)
        if name != "adaround":
            return super().remedy(name, graphs, checkpoint, manifest, listing, calibration, config)
        from edgetl.backends.torch.sensitivity import most_sensitive

        if graphs.sensitivity is None:
            graphs.sensitivity = graphs_of.layer_sensitivity(graphs.float_model, graphs.example, calibration, 60.0)
        layers = most_sensitive(graphs.sensitivity, config.rounding_layers)
        if not layers:
            raise ValueError("learned rounding has no layer to optimise (--rounding-layers 0 or no sensitivity)")
        console.print(f"int8: learned rounding of the {len(layers)} most sensitive layers "
                      f"({', '.join(layers[:3])}{', …' if len(layers) > 3 else ''})…")
        with quiet_native():
            graphs.int8, graphs.quantization = graphs_of.quantize_ptq_graph(
                graphs.float_model, graphs.example, calibration, config.bias_correction, config.fuse_clamp,
                rounded_layers=layers, activations=self._activations)
        self._rounded = graphs.quantization.pop("_rounded", None)

    def _per_image_ranges(self, graphs: Graphs, calibration: np.ndarray, config) -> None:
        """Activation ranges from the running mean of each calibration image's own min/max. The histogram observer
        fits one range to all values at once, so a few images whose activations run 100x larger than the rest set
        it for all of them. Which observer later remedies build on is chosen without labels: the one whose graph's
        logits on the calibration images lie closer (mean squared error) to the float model's."""
        console.print("int8: activation ranges from each calibration image's own min/max…")
        first = graphs.int8
        with quiet_native():
            graphs.int8, graphs.quantization = graphs_of.quantize_ptq_graph(
                graphs.float_model, graphs.example, calibration, config.bias_correction, config.fuse_clamp,
                activations="per-image")
            reference = graphs_of.logits(graphs.float_model, calibration)
            errors = {name: float(np.mean((graphs_of.logits(graph, calibration) - reference) ** 2))
                      for name, graph in (("histogram", first), ("per-image", graphs.int8)) if graph is not None}
        self._activations = min(errors, key=errors.get)
        graphs.quantization["activation_choice"] = {
            "criterion": "mean squared error of the calibration images' logits against the float model's (no labels)",
            "errors": {name: round(value, 6) for name, value in errors.items()}, "chosen": self._activations}

    def _float_fallback(self, graphs: Graphs, calibration: np.ndarray, config) -> None:
        """The allowed layers keep float weights, on top of the learned rounding when that remedy ran."""
        layers = tuple(config.float_layers)
        if not layers:
            raise ValueError("float fallback has no layer to keep float (--float-layers names none)")
        console.print(f"int8: float fallback of {', '.join(layers)}…")
        with quiet_native():
            graphs.int8, graphs.quantization = graphs_of.quantize_ptq_graph(
                graphs.float_model, graphs.example, calibration, config.bias_correction, config.fuse_clamp,
                float_layers=layers, rounded=self._rounded, activations=self._activations)
        graphs.quantization.pop("_rounded", None)
        if graphs.sensitivity is not None:
            share = sum(r["macs_share"] for r in graphs.sensitivity["rows"] if r["layer"] in layers)
            graphs.quantization["float_macs_share"] = round(share, 5)

    def logits(self, model, x: np.ndarray) -> np.ndarray:
        return graphs_of.logits(model, x)

    def convert(self, graphs: Graphs, quant: str, fmt: str) -> Converted:
        module = graphs.int8 if quant == "int8" else graphs.float_model
        if fmt == "pte":
            payload, delegation = graphs_of.lower_pte(module, graphs.example)
            return Converted(payload, {"delegation": delegation})
        strict = quant == "int8" and bool(graphs.quantization.get("float_layers"))
        return Converted(graphs_of.convert_tflite(module, graphs.example, quantized=quant == "int8", strict_qdq=strict))

    def pte_parts(self, graphs: Graphs, quant: str) -> list[dict]:
        module = graphs.int8 if quant == "int8" else graphs.float_model
        with quiet_native():
            return graphs_of.pte_parts(module, graphs.example)

    def block_signals(self, graphs: Graphs, images: np.ndarray, lower_pte: bool) -> list:
        from edgetl.backends.torch.numerics import block_signals

        with quiet_native():
            return block_signals(graphs.float_model, graphs.int8, images, lower=lower_pte)

    def save_extras(self, graphs: Graphs, folder: Path) -> None:
        if graphs.pruning is not None:
            from edgetl.backends.torch import compress

            graphs.pruning["model_file"] = compress.save(graphs.float_model.model, folder)

    def pruning_summary(self, pruning: dict) -> str:
        from edgetl.backends.torch import compress

        return compress.summary(pruning)


Backend = TorchBackend
