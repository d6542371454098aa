"""Keras checkpoint → verified .tflite files: TFLiteConverter fp32, fp16, dynamic-range and full int8.

Optional steps before conversion, each a short fine-tune on the checkpoint's training split:
- `prune`: tfmot magnitude pruning (PolynomialDecay from 0 to the target sparsity), then `strip_pruning`.
  tfmot prunes Conv2D and Dense kernels only: DepthwiseConv2D has no pruning support in tfmot, so those
  layers stay dense and the per-layer table says so. Sparsity shows in gzip size, not in file size.
- `qat`: quantization-aware training (tfmot's default 8-bit scheme) before the int8 conversion; after
  pruning, the prune-preserving scheme, since the plain scheme would re-densify the pruned kernels.
BatchNorm stays frozen in both, as in stage 2 of fine-tuning. The export folder, file names, sidecars and
verification are the torch backend's (edgetl.export, edgetl.verify); only the graphs differ.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from edgetl import data
from edgetl.backends.keras import models
from edgetl.errors import UserError
from edgetl.runtimes import tflite as litert
from edgetl.ui import quiet_native

QUANTS = ("fp32", "fp16", "dynamic", "int8")
LIBRARIES = ("tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert", "numpy", "pillow")
PRUNABLE = (keras.layers.Conv2D, keras.layers.Dense)  # what tfmot's registry prunes in these models
NOT_PRUNED_NOTE = (
    "tfmot prunes Conv2D and Dense kernels only; DepthwiseConv2D kernels (and BatchNorm, biases) stay dense"
)


@dataclass(frozen=True)
class Tune:
    """The short fine-tune that pruning and QAT run on the training split."""

    epochs: int = 2
    lr: float = 1e-4
    batch_size: int = 64
    images: int | None = None  # None: the whole training split
    seed: int = 0
    label_smoothing: float = 0.1


@dataclass
class Graphs:
    """The Keras models one export converts, plus what was measured making them."""

    float_model: keras.Model
    example: np.ndarray  # representative images for int8 (NHWC, preprocessed)
    int8: keras.Model | None = None  # the QAT model when asked, else None (post-training quantization)
    quantization: dict = field(default_factory=dict)
    pruning: dict | None = None


def load_model(checkpoint: Path, manifest: dict) -> keras.Model:
    """Rebuild the checkpoint's architecture from its manifest and load the saved weights."""
    spec = manifest["model"]
    model = models.build_classifier(spec["backbone"], float(spec["width"]), int(spec["image_size"]),
                                    int(spec["num_classes"]))
    try:
        model.load_weights(str(Path(checkpoint) / manifest["weights_file"]))
    except Exception as error:  # h5py / layer-count errors: the folder does not hold what its manifest says
        raise UserError(f"checkpoint weights do not match its manifest ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:160]})") from None
    return model


def logits(model: keras.Model, x: np.ndarray, batch: int = 100) -> np.ndarray:
    forward = models.inference_fn(model)
    outputs = [forward(x[start : start + batch]).numpy() for start in range(0, len(x), batch)]
    return np.concatenate(outputs).astype(np.float32)


def training_set(checkpoint: Path, manifest: dict, tune: Tune) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's training split, decoded with its own preprocessing (undecodable files skipped)."""
    splits = json.loads((Path(checkpoint) / manifest["data"]["splits_file"]).read_text())
    listing = data.DatasetListing.from_json(splits)
    records = listing.splits["train"]
    if tune.images is not None and tune.images < len(records):
        order = np.random.default_rng(tune.seed).permutation(len(records))[: tune.images]
        records = [records[i] for i in sorted(order)]
    spec = dict(manifest["preprocess"], layout="NHWC")
    x, y = data.decode_kept(listing.root, records, spec)
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
        "fine_tune": {**tune.__dict__, "train_images": int(len(x)), "history": history},
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
        "fine_tune": {**tune.__dict__, "train_images": int(len(x)), "history": history},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return quantized, info


def build_graphs(checkpoint: Path, manifest: dict, calibration: np.ndarray, want_int8: bool,
                 prune_to: float | None = None, qat: bool = False, tune: Tune | None = None) -> Graphs:
    """The float model (pruned and stripped when asked) and, with `qat`, its quantization-aware twin."""
    tune = tune or Tune(seed=int(manifest.get("config", {}).get("seed", 0)),
                        label_smoothing=float(manifest.get("config", {}).get("label_smoothing", 0.1)))
    keras.utils.set_random_seed(tune.seed)
    model = load_model(checkpoint, manifest)
    graphs = Graphs(float_model=model, example=calibration)
    x = y = None
    if prune_to is not None or (qat and want_int8):
        x, y = training_set(checkpoint, manifest, tune)
    if prune_to is not None:
        graphs.float_model, graphs.pruning = prune(model, prune_to, x, y, tune)
    if want_int8:
        if qat:
            preserve = prune_to is not None
            graphs.int8, info = quantization_aware(graphs.float_model, x, y, tune, preserve_sparsity=preserve)
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
    return graphs


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
        raise UserError(f"unknown quantization {quant!r}; valid: {', '.join(QUANTS)}")
    with quiet_native((1, 2)):
        return converter.convert()


def gzip_size(payload: bytes) -> int:
    """Size after gzip -9: what sparsity saves in a download (the .tflite itself stays dense)."""
    return len(gzip.compress(payload, compresslevel=9, mtime=0))


# ---------------------------------------------------------------- the export folder


def variant_name(manifest: dict, quant: str, prune_to: float | None, qat: bool) -> str:
    """edgetl.export's file name, with `-pruned50` / `-qat` when those steps shaped the file."""
    from edgetl.export import artifact_name

    tag = quant + (f"-pruned{round(100 * prune_to)}" if prune_to is not None else "")
    tag += "-qat" if qat and quant == "int8" else ""
    return artifact_name(manifest, tag, "tflite")


def export_checkpoint(checkpoint: Path, manifest: dict, config, out: Path) -> Path:
    """The keras path of `edgetl export`: same folder, sidecars and verification as the torch path."""
    from edgetl import export as stage
    from edgetl.manifest import SCHEMA_VERSION, library_versions, now_utc, sha256_file, write_json, write_labels
    from edgetl.paths import atomic_dir, atomic_write_bytes
    from edgetl.ui import console
    from edgetl.verify import FLOAT_REFERENCE, TEST_INPUTS, check_drop, print_record, store, verify_artifacts

    checkpoint = Path(checkpoint)
    prune_to, qat = getattr(config, "prune", None), bool(getattr(config, "qat", False))
    if "tflite" not in config.formats:
        raise UserError(
            "--formats pte: a keras checkpoint exports to .tflite only (ExecuTorch needs a torch model; edgetl "
            "does not port keras weights into torch); use --formats tflite, or fine-tune with --framework torch"
        )
    if "pte" in config.formats:
        console.print("[yellow].pte skipped: this checkpoint's framework is keras, which exports .tflite only[/]")
    listing = stage.load_listing(checkpoint, manifest)
    spec = dict(manifest["preprocess"], layout="NHWC")
    x_test, y_test, skipped = stage._load_split(listing, listing.splits["test"], spec, "test images")
    want_int8 = "int8" in config.quant
    calibration = None
    if want_int8:
        train = listing.splits["train"]
        order = np.random.default_rng(config.seed).permutation(len(train))[: config.calib]
        calibration, _, bad = stage._load_split(listing, [train[i] for i in order], spec, "calibration images")
        skipped += bad
    console.print(f"export (keras): {checkpoint} → {out} (tflite × {', '.join(config.quant)}"
                  + (f", pruned to {prune_to:.0%}" if prune_to is not None else "") + (", QAT" if qat else "") + ")")
    started = time.perf_counter()
    graphs = build_graphs(checkpoint, manifest, calibration, want_int8, prune_to, qat,
                          tune=_tune(manifest, config))
    reference = logits(graphs.float_model, x_test)
    parent = {"checkpoint": str(Path(checkpoint).resolve()),
              "manifest_sha256": sha256_file(checkpoint / "manifest.json"),
              "weights_sha256": manifest["weights_sha256"]}
    versions = library_versions(LIBRARIES)
    artifacts: list[dict] = []
    with atomic_dir(out) as tmp:
        write_labels(tmp / "labels.txt", manifest["labels"])
        np.savez(tmp / TEST_INPUTS, x=x_test, y=y_test)
        np.savez(tmp / FLOAT_REFERENCE, logits=reference, labels=y_test)
        for quant in config.quant:
            name = variant_name(manifest, quant, prune_to, qat)
            entry = {"file": name, "format": "tflite", "quant": quant, "status": "failed"}
            began = time.perf_counter()
            with console.status(f"{name}: converting with TFLiteConverter"):
                try:
                    source = graphs.int8 if quant == "int8" and graphs.int8 is not None else graphs.float_model
                    payload = convert_tflite(source, quant, graphs.example)
                    atomic_write_bytes(tmp / name, payload)
                except UserError:
                    raise
                except Exception as error:  # isolate this variant: record why, keep going with the others
                    entry["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                    console.print(f"[red]{name}: failed[/] — {entry['error']}")
                    artifacts.append(entry)
                    continue
            seconds = round(time.perf_counter() - began, 1)
            sidecar = _sidecar(manifest, quant, name, tmp, parent, versions, spec, graphs, seconds, payload)
            write_json(tmp / f"{name}.json", sidecar)
            entry.update(status="ok", bytes=sidecar["bytes"], gzip_bytes=sidecar["gzip_bytes"],
                         sha256=sidecar["sha256"], export_seconds=seconds, manifest=f"{name}.json")
            console.print(f"{name}: {sidecar['bytes'] / 1e6:.2f} MB (gzip {sidecar['gzip_bytes'] / 1e6:.2f} MB) "
                          f"in {seconds:.0f} s")
            artifacts.append(entry)
        record = verify_artifacts(tmp, [a for a in artifacts if a["status"] == "ok"], config.threads)
        record["float_top1_manifest"] = manifest["metrics"]["test"]["top1"]
        for row in record["rows"]:
            stage._attach_verification(tmp, row)
        store(tmp, record)
        write_json(tmp / "manifest.json", {
            "kind": stage.EXPORT_KIND,
            "schema_version": SCHEMA_VERSION,
            "created": now_utc(),
            "framework": "keras",
            "parent": parent,
            "model": manifest["model"],
            "labels": manifest["labels"],
            "preprocess": spec,
            "config": config.to_json(),
            "test_inputs": {"file": TEST_INPUTS, "images": int(len(y_test)), "layout": "NHWC", "dtype": "float32",
                            "skipped": skipped},
            "float_reference": {"file": FLOAT_REFERENCE, "top1": float((reference.argmax(1) == y_test).mean()),
                                "model": "pruned and stripped" if prune_to is not None else "checkpoint"},
            "quantization": graphs.quantization or None,
            "pruning": graphs.pruning,
            "artifacts": artifacts,
            "verification": record,
            "seconds": round(time.perf_counter() - started, 1),
            "versions": versions,
        })
    print_record(record)
    if graphs.pruning:
        console.print(f"pruning: {graphs.pruning['sparsity_prunable_kernels']:.1%} of Conv2D/Dense weights are zero "
                      f"({graphs.pruning['sparsity_all_kernels']:.1%} of all kernels); {NOT_PRUNED_NOTE}")
    console.print(f"export folder: {out}")
    failed = [a for a in artifacts if a["status"] != "ok"] + [r for r in record["rows"] if r["status"] != "ok"]
    if failed:
        names = ", ".join(sorted({f["file"] for f in failed}))
        raise stage.ExportFailed(f"{len(failed)} export(s) failed: {names}; the others are in {str(out)!r}")
    check_drop(record, config.max_drop)
    return out


PRUNE_EPOCHS = 6  # measured (docs/BENCHMARKS.md): 2 epochs cost 8.6 points at 50% sparsity, 6 epochs 1.4


def _tune(manifest: dict, config) -> Tune:
    """The short fine-tune: 6 epochs when pruning (the schedule needs time to recover), else 2 (QAT alone)."""
    trained = manifest.get("config", {})
    default = PRUNE_EPOCHS if getattr(config, "prune", None) is not None else Tune.epochs
    return Tune(
        epochs=int(getattr(config, "tune_epochs", None) or default),
        batch_size=int(trained.get("batch_size", Tune.batch_size)),
        images=getattr(config, "tune_images", None),
        seed=int(trained.get("seed", 0)),
        label_smoothing=float(trained.get("label_smoothing", 0.1)),
    )


def _sidecar(manifest: dict, quant: str, name: str, folder: Path, parent: dict, versions: dict, spec: dict,
             graphs: Graphs, seconds: float, payload: bytes) -> dict:
    """What an app, `edgetl bench` or a person needs to use this one file (as the torch path writes it)."""
    from edgetl import export as stage
    from edgetl.manifest import SCHEMA_VERSION, now_utc, sha256_file
    path = folder / name
    io_info = litert.describe(path)
    for tensor in io_info["inputs"]:
        tensor["layout"] = "NHWC"
    for tensor in io_info["outputs"]:
        tensor["meaning"] = "logits (apply softmax for probabilities), one per label in labels.txt"
    return {
        "kind": stage.ARTIFACT_KIND,
        "schema_version": SCHEMA_VERSION,
        "created": now_utc(),
        "file": name,
        "format": "tflite",
        "runtime": stage.RUNTIMES["tflite"],
        "framework": "keras",
        "quant": quant,
        "converter": "tf.lite.TFLiteConverter.from_keras_model",
        "bytes": path.stat().st_size,
        "gzip_bytes": gzip_size(payload),
        "sha256": sha256_file(path),
        "labels_file": "labels.txt",
        "labels": manifest["labels"],
        "model": manifest["model"],
        "preprocess": spec,
        "input": io_info["inputs"][0],
        "output": io_info["outputs"][0],
        "quantization": graphs.quantization if quant == "int8" else None,
        "pruning": graphs.pruning,
        "weight_sparsity": litert.weight_sparsity(path),
        "parent": parent,
        "export_seconds": seconds,
        "ops": io_info["ops"],
        "versions": versions,
    }
