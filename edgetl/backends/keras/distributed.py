"""Data-parallel fine-tuning on tf.distribute: MirroredStrategy over this machine's GPUs, and
MultiWorkerMirroredStrategy across machines (or processes) described by TF_CONFIG.

One Python process per machine (TensorFlow's model, unlike torchrun's one per GPU). Every worker walks
the same seeded permutation of the training split and takes rows w, w+W, ... of each global batch; inside
a step the replicas all-reduce the global sample count and the summed gradients, so the step is the mean
over the global batch. The strategy's scope is held for the whole run so every variable is mirrored.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from edgetl.config import FinetuneConfig
from edgetl.distributed import tf_config_workers
from edgetl.errors import UserError
from edgetl.ui import console


def strategy_for(config: FinetuneConfig) -> tuple[tf.distribute.Strategy, int, int, str]:
    """(strategy, worker count, this worker's index, device type) for the config and the environment."""
    cluster = tf_config_workers()
    gpus = tf.config.list_physical_devices("GPU")
    if config.scale_out.nnodes > 1 and cluster is None:
        raise UserError(f"--nnodes {config.scale_out.nnodes} with --framework keras: TensorFlow takes its cluster from "
                        "TF_CONFIG (one process per machine); set TF_CONFIG on each machine instead")
    if config.scale_out.device in ("cuda", "mps") and not gpus:
        raise UserError(
            f"--device {config.scale_out.device} is not available to TensorFlow on this machine; valid here: auto, cpu"
        )
    use_gpu = bool(gpus) and config.scale_out.device != "cpu"
    if config.scale_out.devices > 1 and not use_gpu:
        devices = config.scale_out.devices
        raise UserError(f"--devices {devices} asks for {devices} GPUs but TensorFlow sees none; "
                        "valid here: 1 (several CPU workers run through TF_CONFIG)")
    if config.scale_out.devices > len(gpus) and use_gpu:
        raise UserError(f"--devices {config.scale_out.devices} but this machine has {len(gpus)} GPU(s); valid: 1 to "
                        f"{len(gpus)}")
    if cluster is not None:
        workers, index = cluster
        if config.train.batch_size is not None and config.train.batch_size % workers:
            raise UserError(f"--batch-size {config.train.batch_size} is the global batch and must divide evenly over "
                            f"the {workers} workers of TF_CONFIG; valid: a multiple of {workers}")
        if not use_gpu:
            tf.config.set_visible_devices([], "GPU")
        return tf.distribute.MultiWorkerMirroredStrategy(), workers, index, "gpu" if use_gpu else "cpu"
    if config.scale_out.devices > 1:
        names = [f"/gpu:{i}" for i in range(config.scale_out.devices)]
        return tf.distribute.MirroredStrategy(devices=names), 1, 0, "gpu"
    device = "/GPU:0" if use_gpu else "/CPU:0"
    return tf.distribute.OneDeviceStrategy(device), 1, 0, "gpu" if use_gpu else "cpu"


@dataclass
class KerasWorld:
    """This worker in the strategy (or a lone process): reductions over workers, the chief's role."""

    strategy: tf.distribute.Strategy
    workers: int = 1
    index: int = 0
    device: str = "cpu"

    save_on_every_worker = True  # Keras saving under MultiWorkerMirroredStrategy runs collectives

    @property
    def size(self) -> int:
        return self.workers

    @property
    def rank(self) -> int:
        return self.index

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def local_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync // self.workers

    def from_main(self, make):
        """Every worker lists the (shared) folder itself: the listing is deterministic for a seed."""
        return make()

    def _cross_worker(self, value: np.ndarray, op: str) -> np.ndarray:
        """All-reduce (sum) or all-gather a per-worker array over workers through the strategy's collectives."""
        local = self.local_replicas
        original = value.dtype
        if original not in (np.float32, np.float64, np.int32, np.int64):
            value = value.astype(np.int32)  # collectives carry no bool / uint8
        tensor = tf.constant(value)

        def replica_fn() -> tf.Tensor:
            ctx = tf.distribute.get_replica_context()
            first = tf.equal(ctx.replica_id_in_sync_group % local, 0)
            if op == "sum":
                return ctx.all_reduce("sum", tf.where(first, tensor, tf.zeros_like(tensor)))
            return ctx.all_gather(tensor[tf.newaxis], axis=0)

        result = self.strategy.experimental_local_results(self.strategy.run(replica_fn))[0].numpy()
        return (result if op == "sum" else result[::local]).astype(original)

    def sum(self, values: list[float]) -> list[float]:
        if self.workers == 1:
            return list(values)
        return self._cross_worker(np.asarray(values, np.float64), "sum").tolist()

    def sum_array(self, array: np.ndarray) -> np.ndarray:
        return array if self.workers == 1 else self._cross_worker(array, "sum")

    def shard(self, count: int) -> np.ndarray:
        return np.arange(self.index, count, self.workers)

    def gather_strided(self, local: np.ndarray, count: int) -> np.ndarray:
        """Reassemble rows that workers computed for their `shard(count)` into the full, original order."""
        if self.workers == 1:
            return local
        rows = -(-count // self.workers)
        padded = np.zeros((rows, *local.shape[1:]), local.dtype)
        padded[: len(local)] = local
        parts = self._cross_worker(padded, "gather")
        full = np.empty((count, *local.shape[1:]), local.dtype)
        for worker, part in enumerate(parts):
            full[worker :: self.workers] = part[: len(range(worker, count, self.workers))]
        return full

    def merge(self, mapping: dict) -> dict:
        """Union of per-worker decode failures (paths and reasons travel as padded byte rows)."""
        if self.workers == 1:
            return dict(mapping)
        encoded = "\n".join(f"{k}\t{v}" for k, v in sorted(mapping.items())).encode()
        lengths = np.zeros(self.workers)
        lengths[self.index] = len(encoded)
        length = int(self.sum_array(lengths).max())
        row = np.zeros(max(1, length), np.uint8)
        row[: len(encoded)] = np.frombuffer(encoded, np.uint8)
        merged: dict = {}
        for part in self._cross_worker(row, "gather"):
            for line in bytes(part).rstrip(b"\0").decode().splitlines():
                key, _, reason = line.partition("\t")
                merged[key] = reason
        return merged

    def barrier(self) -> None:
        self.sum([0.0])

    def distribute(self, *arrays: np.ndarray):
        """This worker's batch split over its local replicas (rows i, i+L, ...); plain tensors for one replica."""
        local = self.local_replicas
        if local == 1:
            return tuple(tf.constant(a) for a in arrays)

        def value_fn(ctx: tf.distribute.ValueContext):
            i = ctx.replica_id_in_sync_group % local
            return tuple(tf.constant(a[i::local]) for a in arrays)

        return self.strategy.experimental_distribute_values_from_function(value_fn)

    def describe(self) -> dict:
        return {"strategy": type(self.strategy).__name__, "workers": self.workers,
                "replicas": self.strategy.num_replicas_in_sync}


@contextlib.contextmanager
def session(config: FinetuneConfig) -> Iterator[KerasWorld]:
    """Create the strategy before any model exists and hold its scope for the whole run."""
    if os.environ.get("EDGETL_DEBUG") != "1":
        tf.get_logger().setLevel("ERROR")  # eager-collective and retracing notices are not for users
    strategy, workers, index, device = strategy_for(config)
    if index != 0:
        console.quiet = True  # progress and tables come from the chief only
    world = KerasWorld(strategy, workers, index, device)
    with strategy.scope():
        yield world
