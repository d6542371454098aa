"""Scale-out: torchrun data parallelism (2 gloo processes on CPU give the single-process weights), the
launcher environment and its bad values, device checks, and images streamed through worker processes."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl.config import FinetuneConfig
from edgetl.distributed import check_world, parse_master, tf_config_workers, wait_for_master, world_from_env
from edgetl.errors import UserError
from tests.conftest import run_cli

TINY = ["--backbone", "mobilenet_v2", "--width", "0.35", "--image-size", "32", "--weights", "none"]


def make_folder(root: Path, per_class: int = 20, size: int = 36) -> Path:
    """Two classes of small PNGs that differ in colour and texture (a listing of 2 × per_class files)."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("dark", "light")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = 60 + 120 * label
            pixels = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:04d}.png")
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------ launcher environment and flags


def test_world_from_env_reads_torchrun_variables() -> None:
    world = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                            "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (world.rank, world.size, world.local_rank, world.local_size, world.launched) == (3, 4, 1, 2, True)
    assert not world.is_main
    assert world_from_env({}).launched is False


@pytest.mark.parametrize(("env", "message"), [
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "RANK=2 WORLD_SIZE=2 is inconsistent"),
    ({"RANK": "0"}, "sets RANK but not WORLD_SIZE"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR/MASTER_PORT are not both set"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
      "MASTER_PORT": "1"}, "LOCAL_RANK=2 LOCAL_WORLD_SIZE=2"),
])
def test_inconsistent_launcher_environment_is_one_clear_error(env: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        world_from_env(env)


def test_command_line_must_agree_with_the_launcher() -> None:
    world = world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h",
                            "MASTER_PORT": "1"})
    check_world(world, 2, 1, 0)  # agrees
    check_world(world, 1, 1, 0)  # flags left out: the launcher decides
    with pytest.raises(UserError, match="WORLD_SIZE=2 but --devices 4"):
        check_world(world, 4, 1, 0)


@pytest.mark.parametrize(("changes", "message"), [
    ({"devices": 0}, "--devices 0"),
    ({"nnodes": 2, "master": "h:1", "node_rank": 2}, "--node-rank 2 does not fit --nnodes 2"),
    ({"nnodes": 2}, "needs --master ADDR:PORT"),
    ({"master": "nohost"}, "is not ADDR:PORT"),
    ({"master": "h:70000"}, "is not ADDR:PORT"),
    ({"devices": 3, "batch_size": 32}, "must divide evenly over 3 processes"),
    ({"devices": 2, "device": "mps"}, "Apple GPUs are one device"),
])
def test_scale_out_flags_are_checked_before_any_work(changes: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        FinetuneConfig.of(data="builtin:shapes", backbone="mobilenet_v2", width=0.35, weights="none",
                          **changes).validate()


def test_parse_master_and_tf_config() -> None:
    assert parse_master("10.1.2.3:29500") == ("10.1.2.3", 29500)
    assert parse_master("[::1]:1234") == ("::1", 1234)
    config = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    assert tf_config_workers({"TF_CONFIG": json.dumps(config)}) == (2, 1)
    assert tf_config_workers({}) is None
    with pytest.raises(UserError, match="task index 5 does not fit"):
        tf_config_workers({"TF_CONFIG": json.dumps({**config, "task": {"type": "worker", "index": 5}})})


def test_unreachable_master_fails_after_a_bounded_wait() -> None:
    port = free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(UserError, match=rf"master 127.0.0.1:{port} did not answer within 1.5 s"):
        wait_for_master("127.0.0.1", port, 1.5)
    assert time.monotonic() - start < 10
    with pytest.raises(UserError, match="does not resolve"):
        wait_for_master("no-such-host.invalid", port, 1.0)
    with socket.socket() as server:  # a listening master is found at once
        server.bind(("127.0.0.1", 0))
        server.listen()
        wait_for_master("127.0.0.1", server.getsockname()[1], 5.0)


# ------------------------------------------------------------ torch device selection and precision switches


def test_devices_beyond_the_gpus_present_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgetl.backends.torch import distributed

    base = FinetuneConfig.of(data="builtin:shapes", backbone="mobilenet_v2", width=0.35, batch_size=32)
    monkeypatch.setattr(distributed, "gpu_count", lambda: 0)
    with pytest.raises(UserError, match="asks for 2 GPUs but this machine has none; give --device cpu"):
        distributed.resolve_device_type(base.with_(devices=2))
    with pytest.raises(UserError, match="--device cuda is not available"):
        distributed.resolve_device_type(base.with_(device="cuda"))
    assert distributed.resolve_device_type(base.with_(devices=2, device="cpu")) == "cpu"
    monkeypatch.setattr(distributed, "gpu_count", lambda: 2)
    assert distributed.resolve_device_type(base.with_(devices=2)) == "cuda"
    with pytest.raises(UserError, match="--devices 4 but this machine has 2 GPU"):
        distributed.resolve_device_type(base.with_(devices=4))


def test_precision_and_memory_format_per_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from edgetl.backends.torch import finetune
    from edgetl.backends.torch.finetune import Trainer, precision_settings

    cuda = precision_settings(torch.device("cuda", 1))
    assert (cuda["mixed_precision"], cuda["grad_scaler"], cuda["channels_last"]) == (True, True, True)
    assert precision_settings(torch.device("mps"))["channels_last"] is False
    cpu = precision_settings(torch.device("cpu"))
    assert (cpu["mixed_precision"], cpu["grad_scaler"], cpu["channels_last"], cpu["precision"]) == (
        False, False, True, "fp32")
    trainer = Trainer(FinetuneConfig.of(data="x", device="cpu"), None, {})
    assert (trainer.amp, trainer.channels_last) == (False, True)
    # bf16 is read from the CPU's own flags, never guessed: here from a fake /proc/cpuinfo
    for flags, found in (("fpu avx512f avx512_bf16", "avx512_bf16"), ("fpu avx2 fma", None),
                         ("fp asimd bf16 i8mm", "bf16")):
        monkeypatch.setattr(finetune.Path, "read_text", lambda self, flags=flags: f"flags\t\t: {flags}\n")
        assert finetune.native_bf16() == found
        assert precision_settings(torch.device("cpu"))["native_bf16"] == found


def test_threads_are_set_deliberately_and_openmp_waits_passively(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    import torch

    from edgetl.backends.torch.finetune import set_threads
    from edgetl.distributed import WorldEnv
    from edgetl.machine import usable_cores

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(WorldEnv()) == usable_cores() == torch.get_num_threads()
        assert set_threads(WorldEnv(rank=1, size=2, local_rank=1, local_size=2)) == max(1, usable_cores() // 2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(WorldEnv()) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    # the backend sets passive waiting before torch loads OpenMP, unless the user chose a policy
    code = "import os, edgetl.backends.torch.finetune; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert shown.stdout.strip() == "PASSIVE"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert shown.stdout.strip() == "ACTIVE"


def test_shared_dropout_gives_each_rank_its_rows_of_the_single_process_mask() -> None:
    """Two ranks holding rows 0,2,4.. and 1,3,5.. of a global batch drop exactly what one process drops."""
    import torch
    from torch import nn

    from edgetl.backends.torch.distributed import TorchWorld, shared_dropout
    from edgetl.distributed import WorldEnv

    x = torch.randn(6, 8) + 3.0
    outputs = []
    for rank, size in ((0, 1), (0, 2), (1, 2)):
        model = nn.Sequential(nn.Dropout(0.5), nn.Identity()).train()
        world = TorchWorld(WorldEnv(rank=rank, size=size), torch.device("cpu"))
        with shared_dropout(model, 7, world) as plan:
            plan.global_rows = 6
            outputs.append(model(x[rank::size]))
        assert type(model[0]) is nn.Dropout  # restored
    single, even, odd = outputs
    assert torch.equal(single[0::2], even) and torch.equal(single[1::2], odd)
    assert 0 < int((single == 0).sum()) < single.numel()


# ------------------------------------------------------------ 2 gloo processes against one


def test_two_gloo_processes_match_one_process_and_only_rank_0_writes(tmp_path: Path) -> None:
    import torch

    from edgetl.finetune import run_finetune

    data = make_folder(tmp_path / "data")  # 2 × 20 images: 36 train (the 4 carved validation images train too)
    # Both start from one weights file, as from pretrained weights: BatchNorm statistics stay frozen, so the ranks
    # normalise alike. (From scratch they train, and without SyncBatchNorm, which has no CPU kernel, each rank
    # normalises by its own shard's batch: the runs then differ by design, as any DDP run with BatchNorm does.)
    # The file: a from-scratch backbone with BatchNorm statistics estimated on the data (the probe-only run).
    start = run_finetune(FinetuneConfig.of(data=str(data), backbone="mobilenet_v2", width=0.35, image_size=32,
                                        weights="none", epochs_finetune=0, seed=3, device="cpu"), tmp_path / "start")
    weights = start / "model.pt"
    flags = {"backbone": "mobilenet_v2", "width": 0.35, "image_size": 32, "weights": str(weights),
             "epochs_finetune": 1, "unfreeze": 1, "batch_size": 32, "seed": 3, "device": "cpu"}
    single = run_finetune(FinetuneConfig.of(data=str(data), **flags), tmp_path / "one")
    tiny = [*TINY[:-1], str(weights)]
    done = run_cli("finetune", "--data", str(data), "--out", str(tmp_path / "two"), *tiny, "--epochs-finetune", "1",
                   "--unfreeze", "1", "--batch-size", "32", "--seed", "3", "--device", "cpu", "--devices", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    double = tmp_path / "two" / "checkpoint"
    manifest = json.loads((double / "manifest.json").read_text())
    assert manifest["training"]["device"]["distributed"] == {"backend": "gloo", "world_size": 2}
    assert manifest["data"]["counts"]["train"] == {"dark": 18, "light": 18}
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoint"]  # one writer, no leftovers
    cache = manifest["training"]["image_cache"]  # one mapped file, each process decoding half of the images
    assert (cache["where"], cache["shared_by_processes"], cache["decoded"]) == ("file", 2, 40)

    first, second = torch.load(single / "model.pt"), torch.load(double / "model.pt")
    assert first.keys() == second.keys()
    # the probe is solved in float64 from features the two processes computed in other batches (equal to float32
    # rounding); Adam's normalised first step turns that rounding into ~1e-4 on weights whose gradient is ~0
    for key in first:
        torch.testing.assert_close(second[key].float(), first[key].float(), rtol=1e-3, atol=3e-4, msg=key)
    histories = [json.loads((c / "history.json").read_text()) for c in (single, double)]
    assert [h["stage"] for h in histories[0]] == [1, 2]
    for one, two in zip(*histories, strict=True):  # per-step figures reduced over ranks equal the single run's
        for key in ("train_loss", "train_top1", "val_loss", "val_top1"):
            assert two[key] == pytest.approx(one[key], abs=2e-4), key
    single_metrics = json.loads((single / "manifest.json").read_text())["metrics"]
    for split in ("val", "test"):
        assert manifest["metrics"][split]["confusion_matrix"] == single_metrics[split]["confusion_matrix"]


@pytest.mark.parametrize(("args", "message"), [
    (["--devices", "2"], "asks for 2 GPUs but this machine has none"),
    (["--devices", "2", "--device", "cpu", "--batch-size", "33"], "must divide evenly over 2 processes"),
    (["--nnodes", "2", "--node-rank", "1", "--device", "cpu", "--master", "127.0.0.1:{port}", "--master-timeout",
      "1"], "did not answer within 1 s"),
])
def test_bad_scale_out_input_exits_2_with_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    port = free_port()
    args = [a.format(port=port) for a in args]
    done = run_cli("finetune", "--data", "builtin:shapes", "--out", str(tmp_path / "run"), *TINY, *args)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("edgetl: error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_inconsistent_launcher_environment_exits_2(tmp_path: Path) -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    done = run_cli("finetune", "--data", "builtin:shapes", "--out", str(tmp_path / "run"), *TINY, "--device", "cpu",
                   "--devices", "4", env=env)
    assert done.returncode == 2 and "WORLD_SIZE=2 but --devices 4" in done.stderr, done.stderr


# ------------------------------------------------------------ streaming decode


def test_batch_stream_decodes_in_worker_processes_in_order(tmp_path: Path) -> None:
    from edgetl.data import BatchStream, preprocess_spec, scan_folder

    listing = scan_folder(make_folder(tmp_path / "data", per_class=10))
    records = listing.splits["train"] + [("dark/missing.png", 0)]
    spec = preprocess_spec(16, (0.5,) * 3, (0.5,) * 3, layout="NHWC")
    batches = [np.arange(i, min(i + 5, len(records))) for i in range(0, len(records), 5)][::-1]
    with BatchStream(listing.root, records, spec, workers=0) as inline, BatchStream(listing.root, records, spec,
                                                                                    workers=2) as pooled:
        expected = list(inline.batches(batches, augment_seed=1, epoch=2))
        got = list(pooled.batches(batches, augment_seed=1, epoch=2))
        assert pooled.pool is not None
    assert len(got) == len(expected) == len(batches)
    for (i1, x1, y1, e1), (i2, x2, y2, e2) in zip(expected, got, strict=True):
        assert np.array_equal(i1, i2) and np.array_equal(y1, y2) and e1 == e2
        np.testing.assert_array_equal(x1, x2)  # augmentation keyed by (seed, epoch, index), not by process
        assert x1.shape[1:] == (16, 16, 3)
    assert sum(1 for _, _, _, errors in got for e in errors if e) == 1  # the missing file, recorded not fatal


def test_a_worker_stopping_on_bad_input_ends_the_launch_with_exit_2_and_one_line(tmp_path: Path) -> None:
    done = run_cli("finetune", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), *TINY,
                   "--device", "cpu", "--devices", "2")
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("edgetl: error")]
    assert len(errors) == 1 and "does not exist" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "checkpoint").exists()
