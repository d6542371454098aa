"""The tf_keras side of the transfer-learning recipe, step for step the torch backend's.

Stage 1's pooled features are computed once in inference mode (BatchNorm on its ImageNet statistics); the
stage fits the probe on them and sets the head. Stage 2 unfreezes the top K stages (all by default) with
BatchNorm frozen and light augmentation (`edgetl.data.augment`, keyed by seed, epoch and index as in
torch), AdamW, linear warm-up then cosine decay and label smoothing, and offers the model to the stage's
selector after every epoch. Seeds are set and TensorFlow's op determinism is on, so a CPU run repeats.
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
from edgetl.backends.base import TrainerShared
from edgetl.backends.keras import models
from edgetl.backends.keras.distributed import KerasWorld
from edgetl.backends.keras.distributed import session as session  # the stage opens it around the whole run
from edgetl.config import FinetuneConfig
from edgetl.imagecache import ImageCache
from edgetl.ui import console

WEIGHTS_FILE = "model.weights.h5"
LIBRARIES = ("tensorflow", "tf-keras", "tensorflow-model-optimization", "numpy", "pillow")
FEATURES_AT_ANY_SIZE = False  # keras.applications builds each input size's graph; the size search is torch's
MEAN = STD = (0.5, 0.5, 0.5)  # keras.applications MobileNets take x/127.5 - 1


def preprocess_spec(config: FinetuneConfig) -> dict:
    """NHWC float input in [-1, 1], what keras.applications' MobileNets were trained with."""
    return data.preprocess_spec(config.model.image_size, MEAN, STD, layout="NHWC")


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
    device: dict = field(default_factory=dict)
    init: dict = field(default_factory=dict)


def device_info(world: KerasWorld) -> dict:
    return {
        "type": world.device,
        "mixed_precision": False,
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "distributed": world.describe(),
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


def build_initial_model(config: FinetuneConfig) -> tuple[keras.Model, dict]:
    """The no-top backbone with its initial weights (the head is added in `train`, once classes are known).

    Called before the data is listed (inside the strategy's scope, so its variables are mirrored), so a
    weights file that does not fit fails before any work.
    """
    model = config.model
    return models.initial_backbone(model.backbone, model.width, model.image_size, model.weights, config.train.seed)


def launch_if_needed(config: FinetuneConfig, run_dir: Path) -> Path | None:
    """TensorFlow runs one process per machine: nothing to launch (other machines start from TF_CONFIG)."""
    return None


class Trainer(TrainerShared):
    """The recipe's steps on this worker, for one model, one config and one listing.

    With several workers every epoch walks one seeded permutation; worker w decodes rows w, w+W, ... of each
    global batch (in worker processes with --workers) and the replicas all-reduce the gradients.
    """

    def __init__(self, config: FinetuneConfig, listing: data.DatasetListing, spec: dict,
                 initial: tuple[keras.Model, dict] | None = None, world: KerasWorld | None = None,
                 images: ImageCache | None = None) -> None:
        self.config = config
        self.listing = listing
        self.spec = spec
        self.images = images  # the run's decoded pixels (edgetl.imagecache), read instead of the files
        self.world = world or KerasWorld(tf.distribute.get_strategy())
        self.num_classes = len(listing.classes)
        self.loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.train.label_smoothing,
                                                         reduction=keras.losses.Reduction.NONE)
        counts = np.bincount([label for _, label in listing.splits.get("train", [])], minlength=self.num_classes)
        self.class_weight = (len(listing.splits["train"]) / (self.num_classes * np.maximum(counts, 1))).astype(
            np.float32) if config.dataset.class_weights == "balanced" else None
        self.history: list[dict] = []
        self.failures: dict[str, str] = {}
        self.model: keras.Model | None = None
        self.init: dict = {}
        if initial is not None:
            backbone, self.init = initial
            _seed_everything(config.train.seed)
            self.model = models.add_head(backbone, self.num_classes, config.train.seed)  # inside the session's scope
            models.set_trainable(self.model, 0)

    def _step_fn(self, model: keras.Model, optimizer: keras.optimizers.Optimizer):
        """One compiled training step on the strategy: mean loss over the global batch, gradients summed."""
        strategy, num_classes = self.world.strategy, self.num_classes
        class_weight = None if self.class_weight is None else tf.constant(self.class_weight)

        def replica_step(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            count = tf.distribute.get_replica_context().all_reduce("sum", tf.cast(tf.shape(y)[0], tf.float32))
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                per_sample = self.loss(tf.one_hot(y, num_classes), logits)
                if class_weight is not None:
                    per_sample = per_sample * tf.gather(class_weight, y)
                loss = tf.reduce_sum(per_sample) / tf.maximum(count, 1.0)
            variables = model.trainable_variables
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1), y), tf.float32))
            return tf.reduce_sum(per_sample), correct, tf.cast(tf.shape(y)[0], tf.float32)

        @tf.function(reduce_retracing=True)
        def step(x, y) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            results = strategy.run(replica_step, args=(x, y))
            return tuple(strategy.reduce("SUM", value, axis=None) for value in results)

        def run(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
            return tuple(float(v) for v in step(*self.world.distribute(x, y)))

        return run

    def _optimizer(self, peak: float, total_steps: int) -> keras.optimizers.Optimizer:
        schedule = WarmupCosine(peak, total_steps, self.config.train.warmup_fraction)
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=self.config.train.weight_decay,
                                           epsilon=1e-8)
        optimizer.schedule = schedule  # logged per epoch: the rate of the next step, as torch's get_last_lr()
        return optimizer

    def _stream(self) -> data.BatchStream:
        return data.BatchStream(self.listing.root, self.listing.splits["train"], self.spec, self.config.dataset.workers,
                                self.images)

    def _shard_batches(self, count: int) -> list[np.ndarray]:
        shard = self.world.shard(count)
        return [shard[i : i + self.config.train.batch_size] for i in range(0, len(shard), self.config.train.batch_size)]

    def _record(self, records: list[tuple[str, int]], indices: np.ndarray, errors: list[str]) -> np.ndarray:
        for index, error in zip(indices, errors, strict=True):
            if error:
                self.failures[records[int(index)][0]] = error
        return np.asarray([not e for e in errors], bool)

    # ------------------------------------------------------------ weights

    def snapshot(self) -> list[np.ndarray]:
        return [w.copy() for w in self.model.get_weights()]

    def restore(self, state: list[np.ndarray]) -> None:
        self.model.set_weights(state)

    def batchnorm_buffers(self) -> dict[str, np.ndarray]:
        """Every BatchNorm moving statistic, copied: what "frozen" must leave unchanged."""
        return {f"{layer.name}.{w.name}": w.numpy().copy() for layer in self.model.layers
                if isinstance(layer, keras.layers.BatchNormalization)
                for w in layer.non_trainable_weights}

    # ------------------------------------------------------------ stage 1

    def extract_features(self, split: str, bar) -> tuple[np.ndarray, np.ndarray]:
        """One decode + inference-mode forward per image, each worker on its shard; every worker gets it all."""
        model = self.model
        records = self.listing.splits[split]
        features_of = models.inference_fn(models.feature_model(model))
        task = bar.add_task(f"features ({split})", total=len(records), status="")
        features, keep = [], []
        stream = data.BatchStream(self.listing.root, records, self.spec, self.config.dataset.workers, self.images)
        with stream:
            for indices, x, _, errors in stream.batches(self._shard_batches(len(records))):
                features.append(features_of(x).numpy())
                keep.append(self._record(records, indices, errors))
                bar.advance(task, len(indices) * self.world.size)
        bar.remove_task(task)
        dim = int(model.get_layer("pool").output.shape[-1])
        local = np.concatenate(features) if features else np.zeros((0, dim), np.float32)
        cache = self.world.gather_strided(local, len(records))
        mask = self.world.gather_strided(np.concatenate(keep) if keep else np.zeros(0, bool), len(records))
        self.failures = self.world.merge(self.failures)
        labels = np.asarray([label for _, label in records], np.int64)
        return cache[mask], labels[mask]

    def set_head(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Load the probe's weights into the logits layer (a Dense kernel is features × classes)."""
        self.model.get_layer("logits").set_weights([weight.T.astype(np.float32), bias.astype(np.float32)])

    # ------------------------------------------------------------ stage 2

    def finetune(self, bar, selector) -> int:
        """Stage 2: the top K stages (K < 0: all) and the head train; returns the number of stages unfrozen."""
        config, model = self.config, self.model
        k = models.set_trainable(model, config.train.unfreeze)
        records = self.listing.splits["train"]
        steps_per_epoch = math.ceil(len(records) / config.train.batch_size)
        optimizer = self._optimizer(config.train.lr_finetune, steps_per_epoch * config.train.epochs_finetune)
        title = "stage 2: all blocks" if config.train.unfreeze < 0 else f"stage 2: top {k} blocks"
        self._run_epochs(optimizer, 2, config.train.epochs_finetune, config.train.seed, title, bar, selector)
        for layer in model.layers:
            layer.trainable = True
        return k

    def _run_epochs(self, optimizer, stage: int, epochs: int, augment_seed: int | None, title: str, bar,
                    selector) -> None:
        """Full-model epochs over images streamed from disk; the model is offered to `selector` after each."""
        config, world, model = self.config, self.world, self.model
        records = self.listing.splits["train"]
        step = self._step_fn(model, optimizer)
        rng = np.random.default_rng(config.train.seed + stage - 1)
        task = bar.add_task(title, total=epochs, status="")
        stale, best = 0, -1.0
        with self._stream() as stream:
            for epoch in range(1, epochs + 1):
                start = time.perf_counter()
                order = rng.permutation(len(records))
                mine = [order[first : first + config.train.batch_size][world.rank :: world.size]
                        for first in range(0, len(records), config.train.batch_size)]
                batches = bar.add_task(f"  epoch {epoch}", total=len(records), status="")
                seen, loss_sum, correct = 0.0, 0.0, 0.0
                for indices, x, y, errors in stream.batches(mine, augment_seed, epoch):
                    ok = self._record(records, indices, errors)
                    batch_loss, batch_correct, batch_seen = step(x[ok], y[ok])
                    seen, loss_sum, correct = seen + batch_seen, loss_sum + batch_loss, correct + batch_correct
                    bar.update(batches, advance=len(indices) * world.size,
                               status=f"loss {batch_loss / max(1.0, batch_seen):.3f}")
                bar.remove_task(batches)
                train_seconds = time.perf_counter() - start
                self.failures = world.merge(self.failures)
                val_loss, val_top1 = self.evaluate_split("val")
                selector.offer(stage, epoch, val_loss, val_top1, self.snapshot)
                lr = float(optimizer.schedule(optimizer.iterations))
                self.log(stage, epoch, loss_sum / max(1.0, seen), correct / max(1.0, seen), val_loss, val_top1, lr,
                         time.perf_counter() - start, int(seen), train_seconds)
                bar.update(task, advance=1, status=f"val top-1 {val_top1:.3f}")
                stale = 0 if val_top1 > best else stale + 1
                best = max(best, val_top1)
                if selector.rule == "val_top1" and stale >= config.train.patience:
                    console.print(f"stage {stage}: early stop after epoch {epoch} (no val gain for {stale} epochs)")
                    break
        bar.remove_task(task)

    # ------------------------------------------------------------ evaluation

    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This worker's labels, predicted labels and softmax probabilities of a split (no augmentation)."""
        records = self.listing.splits[split]
        forward = models.inference_fn(self.model)
        labels, probabilities = [], []
        workers = self.config.dataset.workers
        with data.BatchStream(self.listing.root, records, self.spec, workers, self.images) as stream:
            for indices, x, y, errors in stream.batches(self._shard_batches(len(records))):
                ok = self._record(records, indices, errors)
                if ok.any():
                    probabilities.append(tf.nn.softmax(forward(x[ok])).numpy())
                    labels.append(y[ok])
        self.failures = self.world.merge(self.failures)
        probs = np.concatenate(probabilities) if probabilities else np.zeros((0, self.num_classes), np.float32)
        labels_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        return labels_all, probs.argmax(1), probs

    def result(self) -> Result:
        for layer in self.model.layers:
            layer.trainable = True
        return Result(model=self.model, history=self.history, decode_failures=dict(self.failures),
                      device=device_info(self.world), init=self.init)


def _seed_everything(seed: int) -> None:
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def evaluate(model: keras.Model, config: FinetuneConfig, listing: data.DatasetListing, spec: dict, split: str,
             world: KerasWorld | None = None, images: ImageCache | None = None) -> dict:
    """The confusion matrix of a split (each worker its shard, summed) and the files that failed to decode."""
    trainer = Trainer(config, listing, spec, world=world, images=images)
    trainer.model = model
    labels, predicted, _ = trainer.predict(split)
    confusion = np.zeros((trainer.num_classes, trainer.num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    confusion = trainer.world.sum_array(confusion.astype(np.float64)).astype(np.int64)
    return {"confusion_matrix": confusion.tolist(), "decode_failures": dict(trainer.failures)}


def save_weights(model: keras.Model, path: Path) -> None:
    model.save_weights(str(path))
