"""Keras scale-out: two MultiWorkerMirroredStrategy workers from TF_CONFIG on localhost CPU train one model,
reduce their metrics, and only the chief writes the checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_distributed import free_port, make_folder

pytestmark = pytest.mark.keras
pytest.importorskip("tf_keras")


def test_two_tf_config_workers_train_together_and_the_chief_writes(tmp_path: Path) -> None:
    data = make_folder(tmp_path / "data")
    ports = [free_port(), free_port()]
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    out = tmp_path / "run"
    args = ["finetune", "--framework", "keras", "--data", str(data), "--out", str(out), "--backbone", "mobilenet_v2",
            "--width", "0.35", "--image-size", "32", "--weights", "none", "--epochs-finetune",
            "1", "--unfreeze", "1", "--batch-size", "16", "--device", "cpu"]
    workers = [
        subprocess.Popen([sys.executable, "-m", "edgetl.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "TF_CONFIG": json.dumps(
                             {"cluster": cluster, "task": {"type": "worker", "index": index}})})
        for index in (0, 1)
    ]
    results = [worker.communicate(timeout=600) for worker in workers]
    for worker, (_, stderr) in zip(workers, results, strict=True):
        assert worker.returncode == 0, stderr[-3000:]
    assert "fine-tuned mobilenet_v2" in results[0][0] and results[1][0] == ""  # the chief reports, worker 1 is quiet
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    assert manifest["training"]["device"]["distributed"] == {"strategy": "CollectiveAllReduceStrategy",
                                                             "workers": 2, "replicas": 2}
    assert manifest["metrics"]["test"]["images"] == 4  # both workers' shards, summed
    assert sum(map(sum, manifest["metrics"]["test"]["confusion_matrix"])) == 4
    history = json.loads((out / "checkpoint" / "history.json").read_text())
    assert [h["stage"] for h in history] == [1, 2]  # the probe, then one stage-2 epoch
    assert all(h["train_images_per_s"] > 0 for h in history)
    seen = sum(manifest["data"]["counts"]["train"].values())  # 36: the carved validation images train too
    assert history[-1]["train_top1"] * seen == pytest.approx(round(history[-1]["train_top1"] * seen), abs=1e-3)


def test_keras_devices_beyond_the_gpus_present_exit_2(tmp_path: Path) -> None:
    done = run_cli("finetune", "--framework", "keras", "--data", "builtin:shapes", "--out", str(tmp_path / "r"),
                   "--backbone", "mobilenet_v2", "--width", "0.35", "--image-size", "32", "--weights", "none",
                   "--devices", "2")
    assert done.returncode == 2 and "--devices 2 asks for 2 GPUs but TensorFlow sees none" in done.stderr, done.stderr


MIRRORED_STEP = """
import json, sys
import numpy as np
import edgetl.backends.keras  # noqa: F401 - legacy Keras switch before TensorFlow loads
import tensorflow as tf
import tf_keras as keras
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from edgetl.backends.keras.distributed import KerasWorld
from edgetl.backends.keras.finetune import Trainer
from edgetl.config import FinetuneConfig
from edgetl.data import DatasetListing

config = FinetuneConfig.of(data="x", framework="keras", batch_size=10, label_smoothing=0.1)
listing = DatasetListing(root=None, source="x", classes=["a", "b", "c"], splits={}, split_origin="")
rng = np.random.default_rng(0)
x, y = rng.normal(size=(10, 6)).astype(np.float32), rng.integers(0, 3, 10)
weights = []
for strategy in (tf.distribute.OneDeviceStrategy("/cpu:0"), tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])):
    with strategy.scope():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, kernel_initializer="ones")])
        trainer = Trainer(config, listing, {}, world=KerasWorld(strategy))
        step = trainer._step_fn(model, trainer._optimizer(0.1, 10))
        loss_sum, correct, seen = step(x, y)
        weights.append([w.tolist() for w in model.get_weights()])
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "seen": seen, "weights": weights}))
"""


def test_mirrored_replicas_take_the_single_device_step() -> None:
    """MirroredStrategy over 2 logical CPUs splits the batch over replicas; the step equals one device's."""
    import numpy as np

    done = subprocess.run([sys.executable, "-c", MIRRORED_STEP], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2 and result["seen"] == 10
    one, two = result["weights"]
    for a, b in zip(one, two, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(one[0]), 1.0)  # the step did move the weights
