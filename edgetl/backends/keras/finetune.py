"""The two-stage transfer-learning recipe on tf_keras, step for step the torch backend's.

Stage 1 trains a new head on the frozen backbone from pooled features computed once (one decode and one
forward per image). Stage 2 unfreezes the top K stages at a lower learning rate with BatchNorm frozen and
light augmentation (`edgetl.data.augment`, keyed by seed, epoch and index as in torch). Both stages use
AdamW, linear warm-up then cosine decay, label smoothing, early stopping on validation top-1 and keep the
best weights. Seeds are set and TensorFlow's op determinism is on, so a CPU run repeats.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from edgetl import data
from edgetl.backends.keras import models
from edgetl.config import FinetuneConfig
from edgetl.errors import UserError
from edgetl.ui import console, progress

WEIGHTS_FILE = "model.weights.h5"
LIBRARIES = ("tensorflow", "tf-keras", "tensorflow-model-optimization", "numpy", "pillow")
MEAN = STD = (0.5, 0.5, 0.5)  # keras.applications MobileNets take x/127.5 - 1


def preprocess_spec(config: FinetuneConfig) -> dict:
    """NHWC float input in [-1, 1], what keras.applications' MobileNets were trained with."""
    return data.preprocess_spec(config.image_size, MEAN, STD, layout="NHWC")


def describe(model: keras.Model) -> dict:
    return {
        "feature_dim": int(model.get_layer("pool").output.shape[-1]),
        "parameters": models.count_parameters(model),
        "keras_model": str(model.name),
        "input_range": "[-1, 1] (x/127.5 - 1, keras.applications MobileNet preprocessing)",
    }


@dataclass
class Result:
    """What the backend hands back to the stage: weights live in `model`, figures in the rest."""

    model: keras.Model
    history: list[dict] = field(default_factory=list)
    decode_failures: dict[str, str] = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)
    device: dict = field(default_factory=dict)
    init: dict = field(default_factory=dict)


def pick_device(requested: str) -> str:
    """auto → a TensorFlow GPU when there is one, else CPU; an explicit request that cannot be met is a user error."""
    gpus = tf.config.list_physical_devices("GPU")
    if requested == "auto":
        return "gpu" if gpus else "cpu"
    if requested == "cpu":
        return "cpu"
    if not gpus:
        raise UserError(f"--device {requested} is not available to TensorFlow on this machine; valid here: auto, cpu")
    return "gpu"


def device_info(device: str) -> dict:
    return {
        "type": device,
        "mixed_precision": False,
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
    }


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up over the first steps, then cosine decay to zero (the torch backend's schedule)."""

    def __init__(self, peak: float, total_steps: int, warmup_fraction: float) -> None:
        self.peak = peak
        self.total = max(1, total_steps)
        self.warmup = max(1, int(total_steps * warmup_fraction))

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        warm = (step + 1.0) / self.warmup
        done = tf.minimum(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        cosine = 0.5 * (1.0 + tf.cos(math.pi * done))
        return self.peak * tf.where(step < self.warmup, warm, cosine)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total, "warmup_fraction": self.warmup / self.total}


def decode_batch(
    root: Path, records: list[tuple[str, int]], spec: dict, augment_seed: int | None = None, epoch: int = 0,
    indices: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode and preprocess records (NHWC); a file that fails yields zeros and its error text."""
    size = spec["resize"]
    indices = np.arange(len(records)) if indices is None else indices
    batch = np.zeros((len(indices), size["height"], size["width"], 3), np.float32)
    labels = np.zeros(len(indices), np.int64)
    errors = []
    for row, index in enumerate(indices):
        rel, label = records[int(index)]
        labels[row] = label
        try:
            image = data.load_rgb(root / rel)
        except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
            errors.append(f"{type(error).__name__}: {error}"[:200] or "decode failed")
            continue
        if augment_seed is not None:
            image = data.augment(image, np.random.default_rng([augment_seed, epoch, int(index)]))
        batch[row] = data.to_array(image, spec)
        errors.append("")
    return batch, labels, errors


def build_initial_model(config: FinetuneConfig) -> tuple[keras.Model, dict]:
    """The no-top backbone with its initial weights (the head is added in `train`, once classes are known).

    Called before the data is listed, so a weights file that does not fit fails before any work.
    """
    return models.initial_backbone(config.backbone, config.width, config.image_size, config.weights, config.seed)


def _smoothed_loss(labels: np.ndarray, probs: np.ndarray, smoothing: float) -> float:
    log_probs = np.log(np.clip(probs, 1e-12, 1.0))
    nll = -log_probs[np.arange(len(labels)), labels]
    return float(np.mean((1 - smoothing) * nll - smoothing * log_probs.mean(1)))


class Trainer:
    """Runs the recipe for one config; keeps the best weights seen on validation across both stages."""

    def __init__(self, config: FinetuneConfig, listing: data.DatasetListing, spec: dict) -> None:
        self.config = config
        self.listing = listing
        self.spec = spec
        self.num_classes = len(listing.classes)
        self.loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)
        self.history: list[dict] = []
        self.best_top1 = -1.0
        self.best_weights: list[np.ndarray] | None = None
        self.best_where: dict = {}
        self.failures: dict[str, str] = {}
        self.throughput: dict = {}

    def _remember(self, model: keras.Model, top1: float, stage: int, epoch: int) -> bool:
        if top1 > self.best_top1:
            self.best_top1 = top1
            self.best_weights = [w.copy() for w in model.get_weights()]
            self.best_where = {"stage": stage, "epoch": epoch, "val_top1": top1}
            return True
        return False

    def _step_fn(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, shape: tuple[int, ...]):
        """One compiled training step for `model`'s current trainable variables."""
        signature = [tf.TensorSpec((None, *shape), tf.float32), tf.TensorSpec((None,), tf.int64)]

        @tf.function(input_signature=signature)
        def step(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = self.loss(tf.one_hot(y, self.num_classes), logits)
            variables = model.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
            return loss, tf.argmax(logits, axis=1)

        return step

    def _optimizer(self, peak: float, total_steps: int) -> keras.optimizers.Optimizer:
        schedule = WarmupCosine(peak, total_steps, self.config.warmup_fraction)
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=self.config.weight_decay, epsilon=1e-8)
        optimizer.schedule = schedule  # logged per epoch: the rate of the next step, as torch's get_last_lr()
        return optimizer

    # ------------------------------------------------------------ stage 1

    def extract_features(self, model: keras.Model, split: str, bar) -> tuple[np.ndarray, np.ndarray]:
        """One decode + backbone forward per image of a split; failed files are dropped and recorded."""
        records = self.listing.splits[split]
        features_of = models.inference_fn(models.feature_model(model))
        task = bar.add_task(f"features ({split})", total=len(records), status="")
        features, labels, keep = [], [], []
        for start in range(0, len(records), self.config.batch_size):
            indices = np.arange(start, min(start + self.config.batch_size, len(records)))
            x, y, errors = decode_batch(self.listing.root, records, self.spec, indices=indices)
            features.append(features_of(x).numpy())
            labels.append(y)
            for index, error in zip(indices, errors, strict=True):
                if error:
                    self.failures[records[int(index)][0]] = error
                keep.append(not error)
            bar.advance(task, len(indices))
        bar.remove_task(task)
        mask = np.asarray(keep, bool)
        return np.concatenate(features)[mask], np.concatenate(labels)[mask]

    def train_head(self, model: keras.Model, cached: dict[str, tuple[np.ndarray, np.ndarray]], bar) -> None:
        config = self.config
        head = models.head_model(model)
        features, labels = cached["train"]
        val_features, val_labels = cached["val"]
        steps_per_epoch = math.ceil(len(labels) / config.batch_size)
        optimizer = self._optimizer(config.lr_head, steps_per_epoch * config.epochs_head)
        step = self._step_fn(head, optimizer, features.shape[1:])
        rng = np.random.default_rng(config.seed)
        task = bar.add_task("stage 1: head", total=config.epochs_head, status="")
        stale = 0
        for epoch in range(1, config.epochs_head + 1):
            start = time.perf_counter()
            order = rng.permutation(len(labels))
            loss_sum, correct = 0.0, 0
            for index in range(steps_per_epoch):
                chosen = order[index * config.batch_size : (index + 1) * config.batch_size]
                loss, predicted = step(features[chosen], labels[chosen])
                loss_sum += float(loss) * len(chosen)
                correct += int(np.sum(predicted.numpy() == labels[chosen]))
            probs = tf.nn.softmax(head(val_features, training=False)).numpy()
            val_loss = _smoothed_loss(val_labels, probs, config.label_smoothing)
            val_top1 = float(np.mean(probs.argmax(1) == val_labels))
            improved = self._remember(model, val_top1, 1, epoch)
            stale = 0 if improved else stale + 1
            lr = float(optimizer.schedule(optimizer.iterations))
            self._log(1, epoch, loss_sum / len(labels), correct / len(labels), val_loss, val_top1, lr,
                      time.perf_counter() - start, len(labels))
            bar.update(task, advance=1, status=f"val top-1 {val_top1:.3f}")
            if stale >= config.patience:
                console.print(f"stage 1: early stop after epoch {epoch} (no val gain for {stale} epochs)")
                break
        bar.remove_task(task)

    def train_head_uncached(self, model: keras.Model, bar) -> None:
        """Stage 1 without the feature cache (decode + backbone forward every epoch), for the benchmark."""
        config = self.config
        models.set_trainable(model, 0)
        records = self.listing.splits["train"]
        steps_per_epoch = math.ceil(len(records) / config.batch_size)
        optimizer = self._optimizer(config.lr_head, steps_per_epoch * config.epochs_head)
        self._run_epochs(model, optimizer, 1, config.epochs_head, None, "stage 1: head (no cache)", bar,
                         early_stop=False)

    # ------------------------------------------------------------ stage 2

    def finetune_top(self, model: keras.Model, bar) -> None:
        config = self.config
        k = models.set_trainable(model, config.unfreeze)
        records = self.listing.splits["train"]
        steps_per_epoch = math.ceil(len(records) / config.batch_size)
        optimizer = self._optimizer(config.lr_finetune, steps_per_epoch * config.epochs_finetune)
        self._run_epochs(model, optimizer, 2, config.epochs_finetune, config.seed, f"stage 2: top {k} blocks", bar)

    def _run_epochs(self, model: keras.Model, optimizer, stage: int, epochs: int, augment_seed: int | None,
                    title: str, bar, early_stop: bool = True) -> None:
        """Full-model epochs over decoded images (stage 2, or stage 1 without the cache)."""
        config = self.config
        records = self.listing.splits["train"]
        step = self._step_fn(model, optimizer, tuple(model.input.shape[1:]))
        rng = np.random.default_rng(config.seed + stage - 1)
        task = bar.add_task(title, total=epochs, status="")
        stale = 0
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            order = rng.permutation(len(records))
            batches = bar.add_task(f"  epoch {epoch}", total=len(records), status="")
            seen, loss_sum, correct = 0, 0.0, 0
            for first in range(0, len(records), config.batch_size):
                indices = order[first : first + config.batch_size]
                x, y, errors = decode_batch(self.listing.root, records, self.spec, augment_seed, epoch, indices)
                ok = np.asarray([not e for e in errors], bool)
                for index, error in zip(indices, errors, strict=True):
                    if error:
                        self.failures[records[int(index)][0]] = error
                if ok.any():
                    loss, predicted = step(x[ok], y[ok])
                    seen += int(ok.sum())
                    loss_sum += float(loss) * int(ok.sum())
                    correct += int(np.sum(predicted.numpy() == y[ok]))
                    bar.update(batches, advance=len(indices), status=f"loss {float(loss):.3f}")
            bar.remove_task(batches)
            train_seconds = time.perf_counter() - start
            val_loss, val_top1 = self.evaluate_split(model, "val")
            improved = self._remember(model, val_top1, stage, epoch)
            stale = 0 if improved else stale + 1
            lr = float(optimizer.schedule(optimizer.iterations))
            self._log(stage, epoch, loss_sum / max(1, seen), correct / max(1, seen), val_loss, val_top1, lr,
                      time.perf_counter() - start, seen, train_seconds)
            bar.update(task, advance=1, status=f"val top-1 {val_top1:.3f}")
            if early_stop and stale >= config.patience:
                console.print(f"stage {stage}: early stop after epoch {epoch} (no val gain for {stale} epochs)")
                break
        bar.remove_task(task)

    # ------------------------------------------------------------ evaluation

    def predict(self, model: keras.Model, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels, predicted labels and softmax probabilities of a split (full model, no augmentation)."""
        records = self.listing.splits[split]
        forward = models.inference_fn(model)
        labels, probabilities = [], []
        for start in range(0, len(records), self.config.batch_size):
            indices = np.arange(start, min(start + self.config.batch_size, len(records)))
            x, y, errors = decode_batch(self.listing.root, records, self.spec, indices=indices)
            ok = np.asarray([not e for e in errors], bool)
            for index, error in zip(indices, errors, strict=True):
                if error:
                    self.failures[records[int(index)][0]] = error
            if ok.any():
                probabilities.append(tf.nn.softmax(forward(x[ok])).numpy())
                labels.append(y[ok])
        probs = np.concatenate(probabilities) if probabilities else np.zeros((0, self.num_classes), np.float32)
        labels_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        return labels_all, probs.argmax(1), probs

    def evaluate_split(self, model: keras.Model, split: str) -> tuple[float, float]:
        labels, predicted, probs = self.predict(model, split)
        return _smoothed_loss(labels, probs, self.config.label_smoothing), float(np.mean(predicted == labels))

    def _log(self, stage: int, epoch: int, loss: float, top1: float, val_loss: float, val_top1: float, lr: float,
             seconds: float, images: int, train_seconds: float | None = None) -> None:
        self.history.append({
            "stage": stage,
            "epoch": epoch,
            "train_loss": round(loss, 5),
            "train_top1": round(top1, 5),
            "val_loss": round(val_loss, 5),
            "val_top1": round(val_top1, 5),
            "lr": lr,
            "seconds": round(seconds, 3),
            "train_images_per_s": round(images / (train_seconds or seconds), 1),
        })


def _seed_everything(seed: int) -> None:
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def train(
    config: FinetuneConfig,
    listing: data.DatasetListing,
    spec: dict,
    initial: tuple[keras.Model, dict],
    feature_cache: bool = True,
) -> Result:
    """Run both stages from `build_initial_model`'s output; returns the best validation weights and figures."""
    backbone, init = initial
    device = pick_device(config.device)
    _seed_everything(config.seed)
    with tf.device("/GPU:0" if device == "gpu" else "/CPU:0"):
        model = models.add_head(backbone, len(listing.classes), config.seed)
        models.set_trainable(model, 0)
        trainer = Trainer(config, listing, spec)
        with progress() as bar:
            if config.epochs_head:
                start = time.perf_counter()
                if feature_cache:
                    cached = {split: trainer.extract_features(model, split, bar) for split in ("train", "val")}
                    extract_seconds = time.perf_counter() - start
                    listing.drop(trainer.failures)
                    trainer.failures.clear()
                    trainer.train_head(model, cached, bar)
                    trainer.throughput["stage1"] = {
                        "feature_cache": True,
                        "feature_extraction_seconds": round(extract_seconds, 2),
                        "feature_images_per_s": round(sum(len(v[1]) for v in cached.values()) / extract_seconds, 1),
                        "head_seconds": round(time.perf_counter() - start - extract_seconds, 2),
                    }
                else:
                    trainer.train_head_uncached(model, bar)
                    trainer.throughput["stage1"] = {"feature_cache": False}
                stage1_seconds = time.perf_counter() - start
                epochs_run = sum(1 for h in trainer.history if h["stage"] == 1)
                trainer.throughput["stage1"].update({
                    "seconds": round(stage1_seconds, 2),
                    "epochs": epochs_run,
                    "images_per_s": round(epochs_run * len(listing.splits["train"]) / stage1_seconds, 1),
                })
                model.set_weights(trainer.best_weights)
            if config.epochs_finetune and config.unfreeze:
                start = time.perf_counter()
                trainer.finetune_top(model, bar)
                stage2 = [h for h in trainer.history if h["stage"] == 2]
                trainer.throughput["stage2"] = {
                    "seconds": round(time.perf_counter() - start, 2),
                    "epochs": len(stage2),
                    "images_per_s": round(float(np.median([h["train_images_per_s"] for h in stage2])), 1),
                }
            listing.drop(trainer.failures)
            model.set_weights(trainer.best_weights)
    for layer in model.layers:
        layer.trainable = True
    return Result(
        model=model,
        history=trainer.history,
        decode_failures=dict(trainer.failures),
        best=trainer.best_where,
        throughput=trainer.throughput,
        device=device_info(device),
        init=init,
    )


def evaluate(model: keras.Model, config: FinetuneConfig, listing: data.DatasetListing, spec: dict, split: str) -> dict:
    """Top-1, per-class accuracy and confusion matrix of a split, for the manifest."""
    trainer = Trainer(config, listing, spec)
    labels, predicted, _ = trainer.predict(model, split)
    classes = listing.classes
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {
        name: round(float(confusion[i, i] / confusion[i].sum()), 5) if confusion[i].sum() else None
        for i, name in enumerate(classes)
    }
    return {
        "top1": round(float(np.mean(labels == predicted)), 5),
        "images": int(len(labels)),
        "decode_failures": dict(trainer.failures),
        "per_class_top1": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def save_weights(model: keras.Model, path: Path) -> None:
    model.save_weights(str(path))
