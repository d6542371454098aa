"""Data-parallel fine-tuning on torch.distributed: launching through torchrun, the process group, and the
few collectives the recipe needs.

`edgetl finetune --devices N [--nnodes M ...]` starts torchrun's own launcher (torch.distributed.run) in
this process, which starts one worker per device; a worker (or a process started by any launcher that
sets RANK/WORLD_SIZE/...) joins the group: NCCL on GPUs, gloo on CPU. Every rank sees the same global
batch order (DistributedSampler-style strided shards of one seeded permutation), so the union of the
ranks' batches at a step is the single-process batch, and with the loss scaled by the global count the
averaged gradient is the single-process gradient.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from edgetl.config import FinetuneConfig
from edgetl.distributed import WorldEnv, check_port_free, check_world, parse_master, wait_for_master, world_from_env
from edgetl.errors import EXIT_FAILED, UserError, combined_status
from edgetl.ui import console

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # evaluation and checkpoint writing keep ranks apart a while


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device_type(config: FinetuneConfig) -> str:
    """The device type every process will use; --devices beyond the GPUs present is a user error."""
    gpus = gpu_count()
    if config.scale_out.device in ("auto", "cuda") and gpus:
        if config.scale_out.devices > gpus:
            raise UserError(f"--devices {config.scale_out.devices} but this machine has {gpus} GPU(s); valid: 1 to "
                            f"{gpus}")
        return "cuda"
    if config.scale_out.device == "cuda":
        raise UserError("--device cuda is not available on this machine (no CUDA GPU); valid here: auto, cpu")
    if config.scale_out.devices > 1 and config.scale_out.device == "auto":
        devices = config.scale_out.devices
        raise UserError(f"--devices {devices} asks for {devices} GPUs but this machine has none; "
                        f"give --device cpu to run {config.scale_out.devices} CPU processes (gloo)")
    if config.scale_out.device == "mps" or (config.scale_out.device == "auto" and config.scale_out.devices == 1):
        has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
        if config.scale_out.device == "mps" and not has_mps:
            raise UserError("--device mps is not available on this machine; valid here: auto, cpu")
        return "mps" if has_mps else "cpu"
    return "cpu"


def needs_launch(config: FinetuneConfig, world: WorldEnv) -> bool:
    return config.world_size > 1 and not world.launched


def launch(config: FinetuneConfig, run_dir: Path) -> Path:
    """Run torchrun (torch.distributed.run) here: one worker per device on this machine, joined across nodes.

    Workers run `python -m edgetl.finetune_worker CONFIG RUN_DIR`; their exit status becomes ours.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    resolve_device_type(config)
    args = [f"--nproc-per-node={config.scale_out.devices}", f"--nnodes={config.scale_out.nnodes}", "--max-restarts=0"]
    if config.scale_out.nnodes > 1:
        addr, port = parse_master(config.scale_out.master)
        if config.scale_out.node_rank == 0:
            check_port_free(port)
        else:
            console.print(f"waiting up to {config.scale_out.master_timeout:g} s for the master {addr}:{port}")
            wait_for_master(addr, port, config.scale_out.master_timeout)
        args += [f"--node-rank={config.scale_out.node_rank}", f"--master-addr={addr}", f"--master-port={port}"]
    else:
        args.append("--standalone")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // config.scale_out.devices)))
    if os.environ.get("EDGETL_DEBUG") != "1":
        logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # we report failures
    with tempfile.TemporaryDirectory(prefix="edgetl-launch-") as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(config.to_json()))
        worker = ["--module", "edgetl.finetune_worker", str(config_file), str(Path(run_dir).resolve())]
        console.print(f"launching {config.scale_out.devices} process(es) on this machine through torchrun "
                      f"(node {config.scale_out.node_rank} of {config.scale_out.nnodes})")
        try:
            run(get_args_parser().parse_args(args + worker))
        except ChildFailedError as failed:
            codes = sorted({f.exitcode for f in failed.failures.values()} - {0})
            console.print(f"[red]worker(s) failed (exit {', '.join(map(str, codes))}); their messages are above[/]")
            raise SystemExit(combined_status(codes) or EXIT_FAILED) from None
    return Path(run_dir) / "checkpoint"


@dataclass
class TorchWorld:
    """This rank in the process group (or a lone process): its device and the collectives the recipe uses."""

    env: WorldEnv
    device: torch.device
    backend: str | None = None  # "nccl" / "gloo" when a group is up

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def size(self) -> int:
        return self.env.size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def _comm(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device) if self.backend == "nccl" else tensor.cpu()

    def barrier(self) -> None:
        if self.backend:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so counts stay exact)."""
        if not self.backend:
            return list(values)
        tensor = self._comm(torch.tensor(values, dtype=torch.float64))
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def sum_array(self, array: torch.Tensor) -> torch.Tensor:
        if not self.backend:
            return array
        tensor = self._comm(array.clone())
        dist.all_reduce(tensor)
        return tensor.cpu()

    def shard(self, count: int) -> list[int]:
        """Indices of a fixed-order list this rank handles (strided, as DistributedSampler does)."""
        return list(range(self.rank, count, self.size))

    def gather_strided(self, local: torch.Tensor, count: int) -> torch.Tensor:
        """Reassemble rows that ranks computed for their `shard(count)` into the full, original order."""
        if not self.backend:
            return local
        rows = -(-count // self.size)
        padded = torch.zeros((rows, *local.shape[1:]), dtype=local.dtype)
        padded[: len(local)] = local.cpu()
        parts = [self._comm(torch.empty_like(padded)) for _ in range(self.size)]
        dist.all_gather(parts, self._comm(padded))
        full = torch.empty((count, *local.shape[1:]), dtype=local.dtype)
        for rank, part in enumerate(parts):
            mine = len(range(rank, count, self.size))
            full[rank::self.size] = part[:mine].cpu()
        return full

    def merge(self, mapping: dict) -> dict:
        """Union of small per-rank dicts (decode failures)."""
        if not self.backend:
            return dict(mapping)
        parts: list[dict] = [{} for _ in range(self.size)]
        dist.all_gather_object(parts, mapping)
        return {k: v for part in parts for k, v in part.items()}

    def from_main(self, make):
        """Run `make()` on rank 0 only and hand its result (or its UserError) to every rank."""
        if not self.backend:
            return make()
        box: list = [None]
        if self.is_main:
            try:
                box[0] = ("ok", make())
            except UserError as error:
                box[0] = ("error", str(error))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            error = UserError(value)
            error.reported_by_main = not self.is_main  # rank 0 prints it; the others need not repeat it
            raise error
        return value

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel around the trainable module when there are several ranks."""
        if not self.backend:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)


@contextlib.contextmanager
def session(config: FinetuneConfig) -> Iterator[TorchWorld]:
    """Join the process group when launched (NCCL on GPUs, gloo on CPU); a lone process gets a trivial world."""
    env = world_from_env()
    check_world(env, config.scale_out.devices, config.scale_out.nnodes, config.scale_out.node_rank)
    device_type = resolve_device_type(config if not env.launched else _per_node(config, env))
    if not env.launched or env.size == 1:
        yield TorchWorld(env, _device(device_type, env))
        return
    if config.train.batch_size is not None and config.train.batch_size % env.size:
        raise UserError(f"--batch-size {config.train.batch_size} is the global batch and must divide evenly over "
                        f"WORLD_SIZE={env.size} processes; valid: a multiple of {env.size}")
    if env.rank != 0:
        wait_for_master(env.master_addr, env.master_port, config.scale_out.master_timeout)
    device = _device(device_type, env)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.rank != 0:
        console.quiet = True  # progress and tables come from rank 0 only
    dist.init_process_group(backend, rank=env.rank, world_size=env.size, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield TorchWorld(env, device, backend)
    finally:
        dist.destroy_process_group()


def _per_node(config: FinetuneConfig, env: WorldEnv) -> FinetuneConfig:
    """Device checks count the processes on this machine (LOCAL_WORLD_SIZE), whoever launched them."""
    return config.with_(devices=env.local_size, nnodes=max(1, env.size // env.local_size), node_rank=0)


def _device(device_type: str, env: WorldEnv) -> torch.device:
    if device_type == "cuda":
        return torch.device("cuda", env.local_rank)
    return torch.device(device_type)


class DropoutPlan:
    """How many rows the current global batch has; the trainer sets it before each forward."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.global_rows: int | None = None


class SharedDropout(nn.Module):
    """Dropout whose mask is drawn for the whole global batch from a generator every rank holds alike.

    Rank r keeps rows r, r+W, ... of that mask: exactly the rows of the global batch it holds, so a step
    on W ranks drops the same features as the step on one process (nn.Dropout draws per-rank masks).
    """

    def __init__(self, p: float, plan: DropoutPlan, rank: int, size: int) -> None:
        super().__init__()
        self.p, self.plan, self.rank, self.size = p, plan, rank, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        rows = self.plan.global_rows or x.shape[0] * self.size
        full = torch.rand((max(rows, x.shape[0] * self.size), *x.shape[1:]), generator=self.plan.generator)
        keep = (full[self.rank :: self.size][: x.shape[0]] >= self.p).to(device=x.device, dtype=x.dtype)
        return x * keep / (1.0 - self.p)


@contextlib.contextmanager
def shared_dropout(model: nn.Module, seed: int, world: TorchWorld) -> Iterator[DropoutPlan]:
    """Swap the model's nn.Dropout layers for SharedDropout while training; the originals come back after."""
    plan = DropoutPlan(seed)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, SharedDropout(child.p, plan, world.rank, world.size))
                swapped.append((parent, name, child))
    try:
        yield plan
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
