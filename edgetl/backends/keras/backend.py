"""The keras export backend: tf_keras models, tfmot magnitude pruning and QAT, TFLiteConverter.

Its policy: magnitude-prune first when asked (stripped, so the converter sees plain layers), then for int8
either tfmot QAT (prune-preserving after pruning, which would otherwise re-densify the kernels) or the
converter's post-training full-integer quantization on the calibration images. Both QAT and PTQ convert
with the calibration images as the representative dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgetl.backends.base import CAPABILITIES, Backend, Converted, Graphs, TuneDefaults, trained_settings, tune_for
from edgetl.backends.keras import export as keras_export
from edgetl.backends.keras import models
from edgetl.ui import quiet_native

keras = models.keras

# Measured (docs/BENCHMARKS.md, "Keras backend"): at 50% sparsity 2 pruning epochs cost 8.6 points, 6 epochs
# 1.4; QAT alone needs 2; QAT after pruning runs as long as the pruning fine-tune (the "+6 epochs" row).
DEFAULTS = TuneDefaults(epochs={"magnitude": 6, "qat": 2}, lr={"magnitude": 1e-4, "qat": 1e-4}, weight_decay=0.0)


class KerasBackend(Backend):
    capabilities = CAPABILITIES["keras"]

    def __init__(self) -> None:
        self._train: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # decoded once for pruning and QAT

    def needs_calibration(self, config) -> bool:
        return "int8" in config.quantization.quant

    def _training_set(self, listing, manifest, tune) -> tuple[np.ndarray, np.ndarray]:
        key = (tune.images, tune.seed)
        if key not in self._train:
            self._train[key] = keras_export.training_set(listing, manifest, tune)
        return self._train[key]

    def load_float(self, checkpoint: Path, manifest, listing, config) -> Graphs:
        keras.utils.set_random_seed(int(trained_settings(manifest.config).get("seed", config.seed)))
        with quiet_native():
            model = keras_export.load_model(checkpoint, manifest)
        graphs = Graphs(float_model=model, example=None)
        spec = config.prune_spec
        if spec is not None:
            tune = tune_for(manifest.config, config, "magnitude", DEFAULTS)
            x, y = self._training_set(listing, manifest, tune)
            graphs.float_model, graphs.pruning = keras_export.prune(model, spec[1], x, y, tune)
            graphs.float_label = "pruned and stripped"
        return graphs

    def quantize(self, graphs: Graphs, checkpoint: Path, manifest, listing, calibration: np.ndarray, config) -> None:
        graphs.example = calibration
        if config.policy.qat:
            pruned = graphs.pruning is not None
            tune = tune_for(manifest.config, config, "qat", DEFAULTS,
                            epochs=DEFAULTS.epochs["magnitude"] if pruned else None)
            x, y = self._training_set(listing, manifest, tune)
            graphs.int8, info = keras_export.quantization_aware(graphs.float_model, x, y, tune,
                                                               preserve_sparsity=pruned)
            graphs.quantization = {**info, "weights": "int8, symmetric, per output channel",
                                   "activations": "int8, per tensor, affine (ranges learnt in QAT)"}
        else:
            graphs.quantization = {
                "method": "TFLiteConverter post-training full-integer quantization",
                "weights": "int8, symmetric, per output channel",
                "activations": "int8, per tensor, affine (ranges from the representative dataset)",
                "calibration_images": int(len(calibration)),
            }
        graphs.quantization["io"] = "int8 input and output tensors (quantize with the tensor's scale/zero-point)"

    def logits(self, model, x: np.ndarray) -> np.ndarray:
        return keras_export.logits(model, x)

    def convert(self, graphs: Graphs, quant: str, fmt: str) -> Converted:
        source = graphs.int8 if quant == "int8" and graphs.int8 is not None else graphs.float_model
        return Converted(keras_export.convert_tflite(source, quant, graphs.example))

    def pruning_summary(self, pruning: dict) -> str:
        return (f"pruning: {pruning['sparsity_prunable_kernels']:.1%} of Conv2D/Dense weights are zero "
                f"({pruning['sparsity_all_kernels']:.1%} of all kernels); {keras_export.NOT_PRUNED_NOTE}")

    def train_backbone_from_scratch(self, config, listing, epochs: int, path: Path) -> dict:
        from edgetl.backends.keras.pretrain import train_backbone_from_scratch

        return train_backbone_from_scratch(config, listing, epochs, path)


Backend = KerasBackend
