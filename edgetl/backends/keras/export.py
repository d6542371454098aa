"""Keras checkpoint → verified .tflite files: TFLiteConverter fp32, fp16, dynamic-range and full int8.

Optional steps before conversion, each a short fine-tune on the checkpoint's training split:
- `prune`: tfmot magnitude pruning (PolynomialDecay from 0 to the target sparsity), then `strip_pruning`.
  tfmot prunes Conv2D and Dense kernels only: DepthwiseConv2D has no pruning support in tfmot, so those
  layers stay dense and the per-layer table says so. Sparsity shows in gzip size, not in file size.
- `qat`: quantization-aware training (tfmot's default 8-bit scheme) before the int8 conversion; after
  pruning, the prune-preserving scheme, since the plain scheme would re-densify the pruned kernels.
BatchNorm stays frozen in both, as in stage 2 of fine-tuning. The export folder, file names, sidecars and
verification are the stage's (edgetl.export); `backend.KerasBackend` calls these functions.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from edgetl import data
from edgetl.backends.base import Tune
from edgetl.backends.keras import models
from edgetl.errors import UserError
from edgetl.ui import quiet_native

PRUNABLE = (keras.layers.Conv2D, keras.layers.Dense)  # what tfmot's registry prunes in these models
NOT_PRUNED_NOTE = (
    "tfmot prunes Conv2D and Dense kernels only; DepthwiseConv2D kernels (and BatchNorm, biases) stay dense"
)


def load_model(checkpoint: Path, manifest) -> keras.Model:
    """Rebuild the checkpoint's architecture from its manifest (a contracts.CheckpointManifest) and load the
    saved weights."""
    spec = manifest.model
    model = models.build_classifier(spec.backbone, float(spec.width), int(spec.image_size), int(spec.num_classes))
    try:
        model.load_weights(str(Path(checkpoint) / manifest.weights_file))
    except Exception as error:  # h5py / layer-count errors: the folder does not hold what its manifest says
        raise UserError(f"checkpoint weights do not match its manifest ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:160]})") from None
    return model


def logits(model: keras.Model, x: np.ndarray, batch: int = 100) -> np.ndarray:
    forward = models.inference_fn(model)
    outputs = [forward(x[start : start + batch]).numpy() for start in range(0, len(x), batch)]
    return np.concatenate(outputs).astype(np.float32)


def training_set(listing: data.DatasetListing, manifest, tune: Tune) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's training split (or a seeded subset of `tune.images`), decoded with its own
    preprocessing (undecodable files skipped)."""
    records = listing.splits["train"]
    if tune.images is not None and tune.images < len(records):
        order = np.random.default_rng(tune.seed).permutation(len(records))[: tune.images]
        records = [records[i] for i in sorted(order)]
    x, y = data.decode_kept(listing.root, records, manifest.preprocess.with_layout("NHWC"))
    if not len(x):
        raise UserError(f"no training image of the checkpoint could be decoded under {str(listing.root)!r}")
    return x, y


def _freeze_batchnorm(model: keras.Model) -> None:
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def _fit(model: keras.Model, x: np.ndarray, y: np.ndarray, tune: Tune, num_classes: int, callbacks=()) -> list[dict]:
    """A few epochs of label-smoothed cross-entropy with Adam; returns the loss/accuracy per epoch."""
    keras.utils.set_random_seed(tune.seed)
    model.compile(
        optimizer=keras.optimizers.Adam(tune.lr),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=tune.label_smoothing),
        metrics=["accuracy"],
    )
    history = model.fit(x, keras.utils.to_categorical(y, num_classes), batch_size=tune.batch_size, epochs=tune.epochs,
                        shuffle=True, callbacks=list(callbacks), verbose=0)
    return [{"epoch": i + 1, "loss": round(float(loss), 5), "train_top1": round(float(acc), 5)}
            for i, (loss, acc) in enumerate(zip(history.history["loss"], history.history["accuracy"], strict=True))]


def prune(model: keras.Model, sparsity: float, x: np.ndarray, y: np.ndarray, tune: Tune) -> tuple[keras.Model, dict]:
    """Magnitude-prune Conv2D/Dense kernels to `sparsity` during a short fine-tune; returns the stripped model."""
    steps = max(1, int(np.ceil(len(x) / tune.batch_size)) * tune.epochs)
    # Reach the target at ~80% of the steps, then keep the mask while the rest of the fine-tune recovers.
    end = max(1, int(0.8 * steps))
    frequency = max(1, end // 10)
    end = frequency * max(1, end // frequency)  # tfmot prunes only on multiples of `frequency`
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=sparsity, begin_step=0, end_step=end, frequency=frequency
    )
    _freeze_batchnorm(model)

    def wrap(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, PRUNABLE) and not isinstance(layer, keras.layers.DepthwiseConv2D):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, pruning_schedule=schedule)
        return layer

    started = time.perf_counter()
    wrapped = keras.models.clone_model(model, clone_function=wrap)
    _copy_by_name(model, wrapped)  # clone_model builds fresh layers: bring the fine-tuned weights over
    history = _fit(wrapped, x, y, tune, model.output.shape[-1], [tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    info = {
        "method": "tfmot prune_low_magnitude, PolynomialDecay",
        "target_sparsity": sparsity,
        "schedule": {"initial_sparsity": 0.0, "final_sparsity": sparsity, "begin_step": 0, "end_step": end,
                     "frequency": frequency, "total_steps": steps},
        "fine_tune": {**tune.to_json(), "train_images": int(len(x)), "history": history},
        "seconds": round(time.perf_counter() - started, 1),
        "note": NOT_PRUNED_NOTE,
        **layer_sparsity(stripped),
    }
    return stripped, info


def _copy_by_name(source: keras.Model, target: keras.Model) -> None:
    """Copy weights layer by layer (a pruning wrapper adds mask/threshold variables after the kernel)."""
    for layer in target.layers:
        inner = getattr(layer, "layer", layer)
        original = source.get_layer(inner.name)
        inner.set_weights(original.get_weights())


def layer_sparsity(model: keras.Model) -> dict:
    """Measured fraction of exact zeros in every kernel, per layer and overall."""
    rows = []
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, keras.layers.DepthwiseConv2D):
            kernel = inner.depthwise_kernel
        elif isinstance(inner, PRUNABLE):
            kernel = inner.kernel
        else:
            continue
        values = kernel.numpy()
        zeros = int(np.sum(values == 0))
        rows.append({"layer": inner.name, "type": type(inner).__name__, "weights": int(values.size), "zeros": zeros,
                     "sparsity": round(zeros / values.size, 4),
                     "prunable": not isinstance(inner, keras.layers.DepthwiseConv2D)})
    prunable = [r for r in rows if r["prunable"]]

    def overall(selected: list[dict]) -> float:
        total = sum(r["weights"] for r in selected)
        return round(sum(r["zeros"] for r in selected) / total, 4) if total else 0.0

    return {"sparsity_prunable_kernels": overall(prunable), "sparsity_all_kernels": overall(rows), "layers": rows}


def quantization_aware(model: keras.Model, x: np.ndarray, y: np.ndarray, tune: Tune,
                       preserve_sparsity: bool) -> tuple[keras.Model, dict]:
    """QAT with tfmot's 8-bit scheme (prune-preserving after pruning); BatchNorm frozen."""
    _freeze_batchnorm(model)
    started = time.perf_counter()
    try:
        annotated = tfmot.quantization.keras.quantize_annotate_model(model)
        if preserve_sparsity:
            scheme = tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
            quantized = tfmot.quantization.keras.quantize_apply(annotated, scheme)
        else:
            quantized = tfmot.quantization.keras.quantize_apply(annotated)
    except Exception as error:  # tfmot rejects layers it has no quantize config for (TFOpLambda in MobileNetV3)
        raise UserError(
            f"tfmot cannot make this model quantization-aware ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:120]}); --qat works for mobilenet_v2 (MobileNetV3's hard-swish is "
            f"built from TFOpLambda layers tfmot does not quantize); drop --qat for post-training int8"
        ) from None
    history = _fit(quantized, x, y, tune, model.output.shape[-1])
    info = {
        "method": "tfmot QAT, " + ("Default8BitPrunePreserveQuantizeScheme (sparsity kept)" if preserve_sparsity
                                   else "default 8-bit scheme"),
        "fine_tune": {**tune.to_json(), "train_images": int(len(x)), "history": history},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return quantized, info


def convert_tflite(model: keras.Model, quant: str, representative: np.ndarray | None = None) -> bytes:
    """One TFLiteConverter run: fp32, fp16 weights, dynamic-range int8 weights, or full int8 with int8 I/O."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if quant == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quant == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quant == "int8":
        if representative is None or not len(representative):
            raise UserError("full int8 conversion needs representative images; none could be decoded")
        images = representative.astype(np.float32)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([images[i : i + 1]] for i in range(len(images)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif quant != "fp32":
        raise ValueError(f"unknown quantization {quant!r}; valid: fp32, fp16, dynamic, int8")
    with quiet_native((1, 2)):
        return converter.convert()
