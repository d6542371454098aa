"""The torch export backend: own model definitions, torch-pruning, PT2E int8 (PTQ or QAT), ExecuTorch and
litert-torch. Its policy: prune first when asked (the pruned float model is what every file is made from),
then int8 by QAT when asked (it learns its ranges in training, so no calibration set), else by post-training
quantization on the calibration images, with the activation observer whose logits lie closer to the float
model's (unless it changes clearly more of their top-1 classes than the other). Each label-free remedy
(equalization, per-tensor ranges, learned rounding, float fallback) builds on what the earlier ones chose by that
same criterion, which the instance keeps between calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgetl.backends.base import CAPABILITIES, Backend, Converted, Graphs
from edgetl.backends.torch import export as graphs_of
from edgetl.backends.torch.quantize import ACTIVATION_OBSERVERS
from edgetl.backends.torch.ranges import CRITERION, choose_observer
from edgetl.ui import console, quiet_native

RANGES_IMAGES = 64  # calibration images the label-free choices of the ranges and equalize remedies are made on


class TorchBackend(Backend):
    capabilities = CAPABILITIES["torch"]
    _rounded = None  # the learned rounding of this export (BN-folded model and record), reused by float fallback
    _activations = "histogram"  # the activation observer later remedies build on (PTQ chooses it)
    _choice: dict[int, str] | None = None  # activation groups that take the other observer's range ("ranges")
    _choice_base = "histogram"
    _equalize = False  # whether later remedies build on cross-layer equalization ("equalize")
    _error: float | None = None  # the calibration logit error of the graph later remedies build on
    _made: dict | None = None  # PTQ's graph and record for each activation observer (no equalization)

    def needs_calibration(self, config) -> bool:
        return "int8" in config.quantization.quant  # post-training, and the sensitivity table of every int8 export

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
        if config.policy.qat:
            from edgetl.backends.torch import compress

            graphs.int8, graphs.quantization = compress.qat_int8(checkpoint, manifest, listing, graphs.float_model,
                                                                 graphs.example, config)
            return
        console.print(f"int8: PT2E post-training quantization on {len(calibration)} calibration images, activation "
                      f"ranges by histogram, by each image's own min/max and by percentile…")
        images = calibration[:RANGES_IMAGES]
        with quiet_native():
            asked = config.quantization
            made = graphs_of.quantize_ptq_graphs(graphs.float_model, graphs.example, calibration,
                                                 ACTIVATION_OBSERVERS, asked.bias_correction, asked.fuse_clamp)
            reference = graphs_of.logits(graphs.float_model, images)
            self._activations, why, errors, changed = self._observer(made, images, reference)
        self._error, self._made = errors[self._activations], made
        graphs.int8, graphs.quantization = made[self._activations][0], dict(made[self._activations][1])
        graphs.quantization["activation_choice"] = {
            "criterion": CRITERION + "; set aside when it changes clearly more top-1 classes than the other",
            "errors": {name: round(value, 6) for name, value in errors.items()},
            "changed_top1": changed, "chosen": self._activations, "why": why, "images": int(len(images))}
        console.print(f"int8: activation ranges: {self._activations} (calibration logit error "
                      + ", ".join(f"{name} {value:.4g}" for name, value in errors.items()) + "; top-1 changed "
                      + ", ".join(f"{name} {count}/{len(images)}" for name, count in changed.items()) + ")")

    def quantized_layer_names(self, checkpoint: Path, manifest) -> list[str]:
        from edgetl.backends.torch.models import build_model
        from edgetl.backends.torch.sensitivity import quantized_layers

        spec = manifest.model  # names only: the architecture, no weights (channel pruning keeps the names)
        model = graphs_of.ChannelsLastInput(build_model(spec.backbone, spec.width, spec.num_classes))
        return [name for name, _ in quantized_layers(model)]

    def sensitivity(self, graphs: Graphs, calibration: np.ndarray, config) -> dict | None:
        if config.policy.sensitivity_seconds <= 0 or not len(calibration):
            return None
        console.print(f"int8: per-layer sensitivity on {min(len(calibration), 64)} calibration images "
                      f"(at most {config.policy.sensitivity_seconds:g} s)…")
        with quiet_native():
            return graphs_of.layer_sensitivity(graphs.float_model, graphs.example, calibration,
                                               config.policy.sensitivity_seconds)

    def remedy(self, name: str, graphs: Graphs, checkpoint: Path, manifest, listing, calibration: np.ndarray,
               config) -> None:
        if name == "float-fallback":
            return self._float_fallback(graphs, calibration, config)
        if name == "ranges":
            return self._ranges(graphs, calibration, config)
        if name == "equalize":
            return self._equalization(graphs, calibration, config)
        if name != "adaround":
            return super().remedy(name, graphs, checkpoint, manifest, listing, calibration, config)
        from edgetl.backends.torch.sensitivity import complete, most_sensitive

        if not complete(graphs.sensitivity):  # every layer ranked, however busy the machine was
            unmeasured = "" if graphs.sensitivity is None else \
                f" ({graphs.sensitivity['layers'] - graphs.sensitivity['measured']} layers the table did not reach)"
            console.print(f"int8: sensitivity of every layer for learned rounding{unmeasured}…")
            with quiet_native():
                graphs.sensitivity = graphs_of.layer_sensitivity(graphs.float_model, graphs.example, calibration,
                                                                 float("inf"), known=graphs.sensitivity)
        layers = most_sensitive(graphs.sensitivity, config.policy.rounding_layers)
        if not layers:
            raise ValueError("learned rounding has no layer to optimise (--rounding-layers 0 or no sensitivity)")
        console.print(f"int8: learned rounding of the {len(layers)} most sensitive layers "
                      f"({', '.join(layers[:3])}{', …' if len(layers) > 3 else ''})…")
        with quiet_native():
            graphs.int8, graphs.quantization = self._quantize(graphs, calibration, config, rounded_layers=layers)
        self._rounded = graphs.quantization.pop("_rounded", None)

    def _quantize(self, graphs: Graphs, calibration: np.ndarray, config, **options) -> tuple:
        """The int8 graph with the activation ranges and equalization that earlier remedies chose, plus `options`
        (quantize_ptq_graphs'). Ranges chosen per tensor are re-applied to this graph's own calibrations, one per
        observer."""
        common = {"bias_correction": config.quantization.bias_correction, "fuse_clamp": config.quantization.fuse_clamp,
                  "equalization": self._equalize, **options}
        if self._choice is None:
            return graphs_of.quantize_ptq_graph(graphs.float_model, graphs.example, calibration,
                                                activations=self._activations, **common)
        from edgetl.backends.torch.ranges import apply_choice

        made = graphs_of.quantize_ptq_graphs(graphs.float_model, graphs.example, calibration, ACTIVATION_OBSERVERS,
                                             **common)
        graph = apply_choice({name: g for name, (g, _) in made.items()}, self._choice_base, self._choice)
        return graph, self._mixed_info(made[self._choice_base][1], graph)

    def _mixed_info(self, info: dict, graph) -> dict:
        taken = ", ".join(f"{sum(1 for name in self._choice.values() if name == other)} {other}"
                          for other in ACTIVATION_OBSERVERS if other != self._choice_base)
        return {**info, "activations": f"int8, per tensor, affine, {self._choice_base} ranges with {len(self._choice)} "
                f"tensor(s) taking another observer's range ({taken}; chosen by output error, no labels)",
                "input_quantization": graphs_of.first_input_qparams(graph)}

    @staticmethod
    def _observer(made: dict, images: np.ndarray, reference: np.ndarray) -> tuple[str, str, dict, dict]:
        """Which whole-graph calibration (observer name → (graph, info)) to build on, why, and each one's logit
        error and count of changed top-1 classes on `images` (`ranges.choose_observer`)."""
        outputs = {name: graphs_of.logits(graph, images).reshape(reference.shape) for name, (graph, _) in made.items()}
        errors = {name: float(np.mean((out - reference) ** 2)) for name, out in outputs.items()}
        changed = {name: int(np.sum(out.argmax(1) != reference.argmax(1))) for name, out in outputs.items()}
        chosen, why = choose_observer(errors, changed, len(images))
        return chosen, why, errors, changed

    def _calibration_error(self, graph, calibration: np.ndarray, reference: np.ndarray) -> float:
        return float(np.mean((graphs_of.logits(graph, calibration) - reference) ** 2))

    def _ranges(self, graphs: Graphs, calibration: np.ndarray, config) -> None:
        """Activation ranges chosen per tensor between the histogram observer and the running mean of each
        calibration image's own min/max (`ranges.py`), starting from the observer PTQ chose for the whole graph.
        The histogram fits one range to all values at once, so a few images whose activations run 100x larger than
        the rest set it for all of them; per-image ranges clip those. The choice uses no label: the logits' mean
        squared error against the float model's on (at most RANGES_IMAGES of) the calibration images. Later
        remedies build on the ranges chosen here."""
        from edgetl.backends.torch.ranges import choose_per_tensor, describe_search, tensors_for

        console.print("int8: activation ranges per tensor — one histogram over all images, each image's own "
                      "min/max, or percentiles of all values — chosen by output error…")
        images = calibration[:RANGES_IMAGES]
        with quiet_native():
            made = self._made if self._made is not None and not self._equalize else \
                graphs_of.quantize_ptq_graphs(graphs.float_model, graphs.example, calibration, ACTIVATION_OBSERVERS,
                                              config.quantization.bias_correction, config.quantization.fuse_clamp,
                                              equalization=self._equalize)
            reference = graphs_of.logits(graphs.float_model, images)
            base, _, errors, _ = self._observer(made, images, reference)  # the search starts from PTQ's choice
            mixed, choice, record = choose_per_tensor({name: g for name, (g, _) in made.items()},
                                                      lambda g: self._calibration_error(g, images, reference),
                                                      tensors_for(int(graphs.example.shape[1])), base=base,
                                                      errors=errors)
        self._choice, self._choice_base, self._activations = choice or None, record["base"], record["base"]
        self._error = record["error"]
        graphs.int8 = mixed
        graphs.quantization = self._mixed_info(made[record["base"]][1], mixed) if choice else made[record["base"]][1]
        graphs.quantization["activation_choice"] = {**record, "images": int(len(images))}
        console.print(f"int8: ranges: {describe_search(record)}")

    def _equalization(self, graphs: Graphs, calibration: np.ndarray, config) -> None:
        """Cross-layer equalization and bias absorption (`equalize.py`), on the ranges chosen so far. Later
        remedies build on it when its logits on the calibration images lie closer to the float model's."""
        from edgetl.backends.torch.equalize import describe

        console.print("int8: cross-layer equalization and bias absorption…")
        images = calibration[:RANGES_IMAGES]
        with quiet_native():
            reference = graphs_of.logits(graphs.float_model, images)
            before = self._error if self._error is not None else self._calibration_error(graphs.int8, images,
                                                                                          reference)
            self._equalize = True
            graph, info = self._quantize(graphs, calibration, config)
            after = self._calibration_error(graph, images, reference)
        console.print(f"int8: equalization: {describe(info.get('equalization', {}))}")
        self._equalize = after < before
        if self._equalize:
            self._error = after
        graphs.int8, graphs.quantization = graph, info
        graphs.quantization["equalization_choice"] = {
            "criterion": CRITERION,
            "errors": {"without": round(before, 6), "with": round(after, 6)}, "kept": self._equalize}

    def _float_fallback(self, graphs: Graphs, calibration: np.ndarray, config) -> None:
        """The allowed layers keep float weights, on top of the learned rounding when that remedy ran."""
        layers = tuple(config.policy.float_layers)
        if not layers:
            raise ValueError("float fallback has no layer to keep float (--float-layers names none)")
        console.print(f"int8: float fallback of {', '.join(layers)}…")
        with quiet_native():
            graphs.int8, graphs.quantization = self._quantize(graphs, calibration, config, float_layers=layers,
                                                              rounded=self._rounded)
        graphs.quantization.pop("_rounded", None)
        if graphs.sensitivity is not None:
            share = sum(r["macs_share"] for r in graphs.sensitivity["rows"] if r["layer"] in layers)
            graphs.quantization["float_macs_share"] = round(share, 5)

    def logits(self, model, x: np.ndarray) -> np.ndarray:
        return graphs_of.logits(model, x)

    def convert(self, graphs: Graphs, quant: str, fmt: str) -> Converted:
        module = graphs.int8 if quant == "int8" else graphs.float_model
        if fmt in CONVERTERS:
            return CONVERTERS[fmt](module, graphs, quant)
        from edgetl import formats  # a format that brings its own converter (the module, its example input)

        if quant == "int8":  # the weights as int8 constants, as the other formats store them
            module = graphs_of._fold_weight_quantization(module)
        with quiet_native():
            return Converted(formats.convert(fmt, "torch", module, graphs.example))

    def pte_parts(self, graphs: Graphs, quant: str) -> list[dict]:
        module = graphs.int8 if quant == "int8" else graphs.float_model
        with quiet_native():
            return graphs_of.pte_parts(module, graphs.example)

    def block_signals(self, graphs: Graphs, images: np.ndarray, lower_pte: bool,
                      selected: tuple[str, ...] = ()) -> list:
        from edgetl.backends.torch.numerics import block_signals

        with quiet_native():
            return block_signals(graphs.float_model, graphs.int8, images, lower=lower_pte, selected=selected)

    def block_names(self, checkpoint: Path, manifest) -> list[str]:
        from edgetl.backends.torch.models import build_model
        from edgetl.backends.torch.numerics import block_names

        spec = manifest.model  # names only: the architecture, no weights
        model = graphs_of.ChannelsLastInput(build_model(spec.backbone, spec.width, spec.num_classes)).eval()
        with quiet_native():
            return block_names(model, torch.zeros(1, spec.image_size, spec.image_size, 3))

    def save_extras(self, graphs: Graphs, folder: Path) -> None:
        if graphs.pruning is not None:
            from edgetl.backends.torch import compress

            graphs.pruning["model_file"] = compress.save(graphs.float_model.model, folder)

    def pruning_summary(self, pruning: dict) -> str:
        from edgetl.backends.torch import compress

        return compress.summary(pruning)


def _to_pte(module: torch.nn.Module, graphs: Graphs, quant: str) -> Converted:
    payload, delegation = graphs_of.lower_pte(module, graphs.example)
    return Converted(payload, {"delegation": delegation})


def _to_tflite(module: torch.nn.Module, graphs: Graphs, quant: str) -> Converted:
    strict = quant == "int8" and bool(graphs.quantization.get("float_layers"))  # float layers chosen: kept float
    return Converted(graphs_of.convert_tflite(module, graphs.example, quantized=quant == "int8", strict_qdq=strict))


# format → the converter this backend has of its own for it; any other format brings its own
# (edgetl.formats.convert), which is given the module with its weights folded to int8 constants
CONVERTERS = {"pte": _to_pte, "tflite": _to_tflite}


Backend = TorchBackend
