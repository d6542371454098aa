"""The torch side of the transfer-learning recipe: the steps `edgetl.finetune` orders.

Stage 1's features are computed once with the whole backbone in eval mode (BatchNorm uses its ImageNet
statistics, so an image's feature does not depend on the images beside it in a batch and no running
statistic moves); the stage fits the linear probe on them and hands the head back. Stage 2 unfreezes the
top K blocks (all by default) with BatchNorm statistics frozen (pretrained backbones; a from-scratch one
updates them, since statistics estimated at initialisation go stale as its weights move, and has them estimated
again from the training images before each validation), light augmentation,
AdamW, linear warm-up then cosine decay and label smoothing, and offers the model to the stage's selector after
every epoch.
Images come from the run's `ImageCache` (each decoded once; `edgetl.imagecache`), or are decoded from the
files when a caller has none; with several processes
(`backends/torch/distributed.py`) each rank decodes and extracts its shard and DDP averages gradients.
"""

from __future__ import annotations

import copy
import io
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from edgetl import data
from edgetl.backbones import get_backbone
from edgetl.backends.base import TrainerShared
from edgetl.backends.torch.distributed import TorchWorld, launch, needs_launch, shared_dropout
from edgetl.backends.torch.distributed import session as session  # the stage opens it around the whole run
from edgetl.backends.torch.models import Backbone, build_model
from edgetl.backends.torch.weights import apply_weights
from edgetl.config import FinetuneConfig
from edgetl.distributed import WorldEnv, world_from_env
from edgetl.errors import UserError
from edgetl.imagecache import ImageCache
from edgetl.machine import usable_cores
from edgetl.ui import console

WEIGHTS_FILE = "model.pt"
BN_ESTIMATE_IMAGES = 1024  # enough for stable per-channel means/variances; one pass, no gradients
LIBRARIES = ("torch", "torchao", "executorch", "numpy", "pillow")
# The backbones end in global pooling: one model computes features at any input size (the recipe measures sizes).
FEATURES_AT_ANY_SIZE = True


def preprocess_spec(config: FinetuneConfig) -> dict:
    """torch models take NCHW float input normalised with the backbone's published mean/std."""
    spec = get_backbone(config.model.backbone)
    return data.preprocess_spec(config.model.image_size, spec.mean, spec.std, layout="NCHW")


def describe(model: Backbone) -> dict:
    return {"feature_dim": model.feature_dim, "parameters": sum(p.numel() for p in model.parameters())}


class ImageRecords(Dataset):
    """Preprocessed images on demand: from the run's `ImageCache` when given, else decoded from the files.

    A file that fails to decode yields a zero tensor and its error text, so one bad file is skipped and
    recorded instead of ending the run. Augmentation randomness is keyed by (seed, epoch, index), so it
    does not depend on the number of workers.
    """

    def __init__(self, root: Path, records: list[tuple[str, int]], spec: dict, augment_seed: int | None = None,
                 images: ImageCache | None = None):
        self.root = root
        self.records = records
        self.spec = spec
        self.augment_seed = augment_seed
        self.images = images
        self.epoch = 0
        size = spec["resize"]
        self.blank = torch.zeros(3, size["height"], size["width"])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        rel, label = self.records[index]
        rng = None if self.augment_seed is None else np.random.default_rng([self.augment_seed, self.epoch, index])
        try:
            pixels = data.model_input(self.root, rel, self.spec, rng, self.images)
        except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
            return self.blank, label, index, data.error_text(error)
        return torch.from_numpy(pixels), label, index, ""


@dataclass
class Result:
    """What the backend hands back to the stage: weights live in `model`, figures in the rest."""

    model: Backbone
    history: list[dict] = field(default_factory=list)
    decode_failures: dict[str, str] = field(default_factory=dict)
    device: dict = field(default_factory=dict)
    init: dict = field(default_factory=dict)


def pick_device(requested: str) -> torch.device:
    """auto → CUDA, then Apple MPS, then CPU; an explicit request that cannot be met is a user error."""
    has_mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if has_mps else [])
    if requested == "auto":
        return torch.device("cuda" if "cuda" in available else "mps" if "mps" in available else "cpu")
    if requested not in available:
        raise UserError(
            f"--device {requested} is not available on this machine; valid here: auto, {', '.join(available)}"
        )
    return torch.device(requested)


def native_bf16() -> str | None:
    """The CPU feature that computes bf16 natively (AVX512-BF16, AMX-BF16, Arm BF16), read from the CPU's own
    flags; None when it has none (bf16 would then be emulated, slower than fp32)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    for flag in ("amx_bf16", "avx512_bf16", "bf16"):
        if flag in flags:
            return flag
    return None


def precision_settings(device: torch.device) -> dict:
    """Mixed precision, loss scaling and memory format for the device, each with the reason.

    CUDA: fp16 autocast with loss scaling, channels-last. MPS: fp16 autocast. CPU: channels-last (oneDNN's
    convolutions run it 2.4× faster than NCHW for a training step of EfficientNet-Lite0 at 128 px, measured
    2026-12-06 on an AVX-512 host) in fp32. bf16 autocast on top measured 1.05× more there, on a CPU with
    native bf16: too little to give up fp32's reproducibility across CPUs, so it stays off; the manifest says
    whether the CPU has it.
    """
    if device.type == "cuda":
        return {"mixed_precision": True, "grad_scaler": True, "channels_last": True, "precision": "fp16 autocast"}
    if device.type == "mps":
        return {"mixed_precision": True, "grad_scaler": False, "channels_last": False, "precision": "fp16 autocast"}
    feature = native_bf16()
    why = (f"the CPU has native bf16 ({feature}) but bf16 autocast measured only 1.05x over channels-last fp32"
           if feature else "the CPU has no native bf16 (AVX512-BF16, AMX or Arm BF16): it would be emulated")
    return {"mixed_precision": False, "grad_scaler": False, "channels_last": True, "precision": "fp32",
            "precision_why": why, "native_bf16": feature}


def set_threads(world_env: WorldEnv) -> int:
    """Intra-op threads: OMP_NUM_THREADS when the user set it, else this process's share of the usable cores
    (processes of one run on one machine would otherwise fight for them). Fixed for the run: a weight
    gradient's sums depend on the thread count in the last bits, and a seed must give the same weights.
    Returns the count set."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(given) if given.isdigit() and int(given) > 0 else usable_cores() // max(1, world_env.local_size)
    torch.set_num_threads(max(1, threads))
    return max(1, threads)


def device_info(device: torch.device, world: TorchWorld | None = None) -> dict:
    info = {
        "type": device.type,
        **precision_settings(device),
        "torch_threads": torch.get_num_threads(),
        "usable_cores": usable_cores(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    if world is not None and world.backend:
        info["distributed"] = {"backend": world.backend, "world_size": world.size}
    return info


class WarmupCosine:
    """LR multiplier: linear warm-up over the first steps, then cosine decay to zero at `total_steps`.

    `total_steps` may be changed while training (a time budget re-fits the schedule to the steps the machine
    really takes); the warm-up keeps its length.
    """

    def __init__(self, total_steps: int, warmup_fraction: float) -> None:
        self.total_steps = total_steps
        self.warmup = max(1, int(total_steps * warmup_fraction))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress_done = (step - self.warmup) / max(1, self.total_steps - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_done)))


def warmup_cosine(total_steps: int, warmup_fraction: float) -> WarmupCosine:
    return WarmupCosine(total_steps, warmup_fraction)


def freeze_batchnorm(model: nn.Module) -> None:
    """Keep BN running statistics as they are while the rest of the model trains."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def estimate_batchnorm_statistics(model: nn.Module, loader: DataLoader, device: torch.device, max_images: int) -> int:
    """Replace BN running statistics by the training data's (cumulative average over `max_images`).

    Freshly initialised BN layers hold mean 0 / variance 1, which do not describe any real activations;
    freezing those (as stage 2 does) would leave a from-scratch backbone degenerate. Returns images seen.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative moving average: every batch counts equally
    model.train()
    seen = 0
    for images, _, _, errors in loader:
        ok = torch.tensor([not e for e in errors])
        if int(ok.sum()) < 2:  # a last batch of one image: BatchNorm in training mode needs two or more
            continue
        model.forward_features(images[ok].to(device))
        seen += int(ok.sum())
        if seen >= max_images:
            break
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.eval()
    return seen


def _loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        persistent_workers=False,
        pin_memory=False,
    )


def launch_if_needed(config: FinetuneConfig, run_dir: Path) -> Path | None:
    """Start torchrun's workers when several processes are asked for and none launched us; their checkpoint."""
    return launch(config, run_dir) if needs_launch(config, world_from_env()) else None


def build_initial_model(config: FinetuneConfig) -> tuple[Backbone, dict]:
    """The backbone with its initial weights and the published 1000-class head (replaced by the trainer).

    Called right after the data is listed, so a weights file that does not fit fails before any work.
    """
    spec = get_backbone(config.model.backbone)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model.backbone, config.model.width, num_classes=1000)
    init = apply_weights(model, spec, config.model.width, config.model.weights)
    return model, init


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every BatchNorm running statistic (and batch counter), copied: what "frozen" must leave unchanged."""
    return {f"{name}.{key}": value.detach().clone()
            for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for key, value in module.named_buffers(recurse=False)}


class Trainer(TrainerShared):
    """The recipe's steps on this rank, for one model, one config and one listing.

    With several ranks every epoch walks one seeded permutation of the training split; rank r takes rows
    r, r+W, ... of each global batch, scales its summed loss by W / (global batch count) and DDP averages
    the gradients: the step equals the single-process step on the same global batch.
    """

    def __init__(self, config: FinetuneConfig, listing: data.DatasetListing, spec: dict,
                 initial: tuple[Backbone, dict] | None = None, world: TorchWorld | None = None,
                 images: ImageCache | None = None) -> None:
        self.config = config
        self.listing = listing
        self.spec = spec
        self.images = images  # the run's decoded pixels (edgetl.imagecache), read instead of the files
        self.world = world or TorchWorld(WorldEnv(), pick_device(config.scale_out.device))
        self.device = self.world.device
        set_threads(self.world.env)
        settings = precision_settings(self.device)
        self.amp = settings["mixed_precision"]
        self.channels_last = settings["channels_last"]
        weights = config.dataset.class_weights
        self.class_weight: torch.Tensor | None = None
        if weights == "balanced":
            counts = np.bincount([label for _, label in listing.splits["train"]], minlength=len(listing.classes))
            self.class_weight = torch.tensor(len(listing.splits["train"]) / (len(counts) * np.maximum(counts, 1)),
                                             dtype=torch.float32, device=self.device)
        self.criterion = nn.CrossEntropyLoss(weight=self.class_weight, label_smoothing=config.train.label_smoothing,
                                             reduction="sum")
        self.history: list[dict] = []
        self.failures: dict[str, str] = {}
        self.model: Backbone | None = None
        self.init: dict = {}
        self.deadline: float | None = None  # time.perf_counter() by which stage 2 stops (a time budget's guard)
        self.stopped_at_deadline = False
        # a time budget's re-fit after each epoch: (steps done, seconds a step took, seconds an epoch's
        # validation took) -> the stage's total steps from now on
        self.refit_steps: Callable[[int, float, float], int] | None = None
        if initial is not None:
            self._prepare(*initial)

    def _prepare(self, model: Backbone, init: dict) -> None:
        """New head for this folder's classes, on the device; from-scratch BN statistics estimated."""
        config = self.config
        torch.manual_seed(config.train.seed)
        model.reset_head(len(self.listing.classes))
        np.random.seed(config.train.seed % (2**32))
        # On CUDA, deterministic kernels where torch has them. On the CPU the flag only costs time: a training step
        # of EfficientNet-Lite0 at 128 px ran 1.24-1.31x faster without it, and three steps gave bit-identical
        # weights with and without it, run after run, at a fixed thread count (2026-12-06, this project's 2-core
        # host); tests/test_finetune.py checks that a seed gives the same weights.
        torch.use_deterministic_algorithms(self.device.type != "cpu", warn_only=True)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model, self.init = model, init
        if init.get("kind") == "none":
            with console.status("estimating BatchNorm statistics of the randomly initialised backbone"):
                init["batchnorm_statistics_from_images"] = self._estimate_batchnorm()
            init["batchnorm_before_validation"] = (
                "re-estimated from the training images before every validation: a from-scratch network's weights "
                "move faster than its running statistics follow"
            )
        model.eval()

    def _estimate_batchnorm(self) -> int:
        """The model's BN running statistics replaced by the training images' under its current weights.

        Every rank estimates on the same images in the same order, so the statistics agree everywhere. The images
        are the un-augmented training split, as validation sees images.
        """
        config = self.config
        train_set = ImageRecords(self.listing.root, self.listing.splits["train"], self.spec, images=self.images)
        loader = _loader(train_set, config.train.batch_size, config.dataset.workers, True, config.train.seed)
        return estimate_batchnorm_statistics(self.model, loader, self.device, BN_ESTIMATE_IMAGES)

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    def _optimizer(self, params: list[nn.Parameter], lr: float, total_steps: int):
        """AdamW with linear warm-up then cosine decay, stepped once per global batch."""
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=self.config.train.weight_decay)
        warmup = warmup_cosine(total_steps, self.config.train.warmup_fraction)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup)
        return optimizer, schedule

    def _global_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the *global* batch, times W (DDP divides the summed gradients by W)."""
        count = self.world.sum([float(len(targets))])[0]
        return self.criterion(logits.float(), targets) * (self.world.size / max(1.0, count))

    def _train_loader(self, dataset: Dataset, seed: int) -> tuple[DataLoader, DistributedSampler]:
        """Each rank's share of every global batch: DistributedSampler strides one seeded permutation."""
        sampler = DistributedSampler(dataset, num_replicas=self.world.size, rank=self.world.rank, shuffle=True,
                                     seed=seed)
        share = max(1, self.config.train.batch_size // self.world.size)
        # BatchNorm cannot train on a batch of one image (one value per channel at a 1x1 feature map, and no
        # variance anywhere): a lone last image is left out of that epoch (a different one each epoch)
        lone_last = len(sampler) > share and len(sampler) % share == 1
        loader = DataLoader(dataset, batch_size=share, sampler=sampler, drop_last=lone_last,
                            num_workers=self.config.dataset.workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        return loader, sampler

    def _shard_loader(self, records: list[tuple[str, int]]) -> DataLoader:
        """This rank's fixed share of a split (no shuffling), decoded in worker processes when asked."""
        dataset = Subset(ImageRecords(self.listing.root, records, self.spec, images=self.images),
                         self.world.shard(len(records)))
        train = self.config.train
        return _loader(dataset, train.batch_size, self.config.dataset.workers, False, train.seed)

    def _reduce_epoch(self, loss_sum: float, correct: int, seen: int) -> tuple[float, float, int]:
        loss_sum, correct, seen = self.world.sum([loss_sum, correct, seen])
        return loss_sum / max(1.0, seen), correct / max(1.0, seen), int(seen)

    def _merge_failures(self) -> None:
        self.failures = self.world.merge(self.failures)

    # ------------------------------------------------------------ weights

    def snapshot(self) -> dict[str, torch.Tensor]:
        return copy.deepcopy(self.model.state_dict())

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    def batchnorm_buffers(self) -> dict[str, torch.Tensor]:
        return batchnorm_buffers(self.model)

    # ------------------------------------------------------------ stage 1

    @torch.inference_mode()
    def extract_features(self, split: str, bar) -> tuple[np.ndarray, np.ndarray]:
        """One decode + eval-mode backbone forward per image, each rank on its shard; every rank gets it all."""
        model = self.model
        model.eval()
        records = self.listing.splits[split]
        task = bar.add_task(f"features ({split})", total=len(records), status="")
        shard = self.world.shard(len(records))
        local = torch.empty((len(shard), model.head_input_width()))  # filled in place: the cache is held once
        keep = torch.ones(len(shard), dtype=torch.bool)
        row = 0
        for images, _, indices, errors in self._shard_loader(records):
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                local[row : row + len(indices)] = model.head_input(images.to(self.device)).float().cpu()
            for offset, (index, error) in enumerate(zip(indices.tolist(), errors, strict=True)):
                if error:
                    self.failures[records[index][0]] = error
                    keep[row + offset] = False
            row += len(indices)
            bar.advance(task, len(indices) * self.world.size)
        bar.remove_task(task)
        cache = self.world.gather_strided(local, len(records))
        mask = self.world.gather_strided(keep, len(records))
        self._merge_failures()
        labels = torch.tensor([label for _, label in records], dtype=torch.long)
        return cache[mask].numpy(), labels[mask].numpy()

    def set_head(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Load the probe's weights into the head's final Linear layer."""
        linear = [m for m in self.model.head.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight))
            linear.bias.copy_(torch.from_numpy(bias))

    # ------------------------------------------------------------ stage 2

    def finetune(self, bar, selector) -> int:
        """Stage 2: the top K units (K < 0: all) and the head train; returns the number of units unfrozen."""
        model = self.model
        stages = model.stages()
        k = len(stages) if self.config.train.unfreeze < 0 else min(self.config.train.unfreeze, len(stages))
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for unit in [*stages[len(stages) - k :], model.head]:
            for parameter in unit.parameters():
                parameter.requires_grad_(True)
        trained = self.world.wrap(model)
        title = "stage 2: all blocks" if k == len(stages) else f"stage 2: top {k} blocks"
        train = self.config.train
        self._image_epochs(trained, 2, train.epochs_finetune, train.lr_finetune, train.seed,
                           title, bar, selector)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return k

    def _image_epochs(self, forward, stage: int, epochs: int, lr: float, augment_seed: int | None, title: str,
                      bar, selector) -> None:
        """Epochs over decoded images streamed from disk; the model is offered to `selector` after each."""
        config, model = self.config, self.model
        train_set = ImageRecords(self.listing.root, self.listing.splits["train"], self.spec, augment_seed=augment_seed,
                                 images=self.images)
        loader, sampler = self._train_loader(train_set, config.train.seed + stage - 1)
        params = [p for p in model.parameters() if p.requires_grad]
        total_steps = len(loader) * epochs
        if config.train.max_steps is not None:  # a time budget's plan: the last epoch may be partial
            total_steps = min(total_steps, config.train.max_steps)
        optimizer, schedule = self._optimizer(params, lr, total_steps)
        steps, step_seconds = 0, 0.0
        scaler = torch.amp.GradScaler("cuda", enabled=precision_settings(self.device)["grad_scaler"])
        task = bar.add_task(title, total=epochs, status="")
        stale, best = 0, -1.0
        epoch = 0
        with shared_dropout(model, config.train.seed + stage, self.world) as dropout:
            while epoch < epochs:
                epoch += 1
                start = time.perf_counter()
                steps_before = steps
                train_set.epoch = epoch
                sampler.set_epoch(epoch)
                model.train()
                if self.init.get("kind") != "none":  # pretrained statistics stay; a from-scratch model learns its own
                    freeze_batchnorm(model)
                batches = bar.add_task(f"  epoch {epoch}", total=len(train_set), status="")
                seen, loss_sum, correct = 0, 0.0, 0
                for images, targets, indices, errors in loader:
                    if steps >= total_steps or self._past_deadline():
                        break
                    ok = torch.tensor([not e for e in errors])
                    for index, error in zip(indices.tolist(), errors, strict=True):
                        if error:
                            self.failures[self.listing.splits["train"][index][0]] = error
                    x, y = images[ok].to(self.device, non_blocking=True), targets[ok].to(self.device)
                    dropout.global_rows = len(targets) * self.world.size  # DistributedSampler pads: equal shares
                    if self.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with self._autocast():
                        logits = forward(x)
                    loss = self._global_loss(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    schedule.step()
                    seen += len(y)
                    loss_sum += float(self.criterion(logits.detach().float(), y))
                    correct += int((logits.argmax(1) == y).sum())
                    shown = float(loss.detach()) / self.world.size
                    steps += 1
                    bar.update(batches, advance=len(targets) * self.world.size, status=f"loss {shown:.3f}")
                bar.remove_task(batches)
                train_seconds = time.perf_counter() - start
                step_seconds = train_seconds / max(1, steps - steps_before)
                self._merge_failures()
                train_loss, train_top1, seen = self._reduce_epoch(loss_sum, correct, seen)
                validation_started = time.perf_counter()
                if self.init.get("kind") == "none":
                    # A from-scratch network trains its BN statistics (momentum 0.01 in MobileNetV3: an average over
                    # ~100 steps of weights that moved): eval mode then normalises with stale statistics, and
                    # MobileNetV3-Large collapsed to one class on validation (val loss 22 against 1.1 train). The
                    # statistics of the weights as they are now describe the model that is offered and kept.
                    self._estimate_batchnorm()
                val_loss, val_top1 = self.evaluate_split("val")
                selector.offer(stage, epoch, val_loss, val_top1, self.snapshot)
                self.log(stage, epoch, train_loss, train_top1, val_loss, val_top1, schedule.get_last_lr()[0],
                         time.perf_counter() - start, seen, train_seconds)
                bar.update(task, advance=1, status=f"val top-1 {val_top1:.3f}")
                stale = 0 if val_top1 > best else stale + 1
                best = max(best, val_top1)
                if selector.rule == "val_top1" and stale >= config.train.patience:
                    console.print(f"stage {stage}: early stop after epoch {epoch} (no val gain for {stale} epochs)")
                    break
                if self.refit_steps is not None and steps < total_steps:
                    total_steps = max(steps, self.refit_steps(steps, step_seconds,
                                                              time.perf_counter() - validation_started))
                    schedule.lr_lambdas[0].total_steps = total_steps
                    epochs = max(epoch, math.ceil(total_steps / max(1, len(loader))))
                    bar.update(task, total=epochs)
                if steps >= total_steps:
                    break
                if self._past_deadline():
                    self.stopped_at_deadline = True
                    console.print(f"[yellow]stage {stage}: stopped after {steps} of {total_steps} steps at the time "
                                  f"budget's deadline[/]")
                    break
        model.eval()
        bar.remove_task(task)

    def _past_deadline(self) -> bool:
        """Every rank stops at the same step: the slowest one's clock decides."""
        if self.deadline is None:
            return False
        late = float(time.perf_counter() > self.deadline)
        return self.world.sum([late])[0] > 0

    def measure_speed(self, timed_steps: int = 3) -> dict:
        """Images/s of an eval forward and of a stage-2 training step (every block trainable), each timed on
        real batches of the training split after one untimed step, batch preparation included; the weights
        are left exactly as they were. What a time budget plans with."""
        config, model = self.config, self.model
        records = self.listing.splits["train"]
        batch = min(config.train.batch_size // self.world.size, len(records))
        state = self.snapshot()
        dataset = ImageRecords(self.listing.root, records, self.spec, augment_seed=config.train.seed,
                               images=self.images)

        def prepared(offset: int) -> torch.Tensor:
            rows = [dataset[(offset * batch + i) % len(records)][0] for i in range(batch)]
            x = torch.stack(rows).to(self.device)
            return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

        def timed(step) -> float:
            step(0)  # oneDNN builds its kernels on the first call
            started = time.perf_counter()
            for offset in range(1, timed_steps + 1):
                step(offset)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return batch * timed_steps / max(1e-9, time.perf_counter() - started)

        def forward(offset: int) -> None:
            with torch.inference_mode(), self._autocast():
                model(prepared(offset))

        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler("cuda", enabled=precision_settings(self.device)["grad_scaler"])
        targets = torch.zeros(batch, dtype=torch.long, device=self.device)

        def train(offset: int) -> None:
            with self._autocast():
                loss = self.criterion(model(prepared(offset)).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        started = time.perf_counter()
        model.eval()
        forward_rate = timed(forward)
        model.train()
        if self.init.get("kind") != "none":
            freeze_batchnorm(model)
        train_rate = timed(train)
        model.eval()
        self.restore(state)
        rates = self.world.sum([forward_rate, train_rate])  # the world's images/s: ranks work side by side
        return {"forward_images_per_s": rates[0], "train_images_per_s": rates[1], "batch": batch,
                "seconds": time.perf_counter() - started}

    # ------------------------------------------------------------ evaluation

    @torch.inference_mode()
    def predict(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's labels, predicted labels and softmax probabilities of a split (no augmentation)."""
        model = self.model
        model.eval()
        records = self.listing.splits[split]
        labels, probabilities = [], [np.zeros((0, len(self.listing.classes)), np.float32)]
        for images, targets, indices, errors in self._shard_loader(records):
            ok = torch.tensor([not e for e in errors])
            for index, error in zip(indices.tolist(), errors, strict=True):
                if error:
                    self.failures[records[index][0]] = error
            x = images[ok].to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = model(x).float()
            probabilities.append(logits.softmax(1).cpu().numpy())
            labels.append(targets[ok].numpy())
        self._merge_failures()
        probs = np.concatenate(probabilities)
        labels_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        return labels_all, probs.argmax(1), probs

    def result(self) -> Result:
        """The model (on the CPU, trainable again) and the figures the stage writes."""
        model = self.model
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        model = model.cpu().to(memory_format=torch.contiguous_format)  # saved and exported in the usual layout
        device = {**device_info(self.device, self.world), "data_loader_workers": self.config.dataset.workers}
        return Result(model=model, history=self.history, decode_failures=dict(self.failures), device=device,
                      init=self.init)


def evaluate(model: Backbone, config: FinetuneConfig, listing: data.DatasetListing, spec: dict, split: str,
             world: TorchWorld | None = None, images: ImageCache | None = None) -> dict:
    """Top-1, per-class accuracy and confusion matrix of a split (each rank its shard, summed), for the manifest.

    fp32 on the training device: the figures describe the saved weights, not a mixed-precision forward.
    """
    trainer = Trainer(config, listing, spec, world=world, images=images)
    trainer.amp = False
    trainer.model = model.to(trainer.device)
    if trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    labels, predicted, _ = trainer.predict(split)
    model.cpu().to(memory_format=torch.contiguous_format)
    classes = listing.classes
    confusion = torch.zeros((len(classes), len(classes)), dtype=torch.int64)
    np.add.at(confusion.numpy(), (labels, predicted), 1)
    confusion = trainer.world.sum_array(confusion).numpy()
    return {"confusion_matrix": confusion.tolist(), "decode_failures": dict(trainer.failures)}


def save_weights(model: Backbone, path: Path) -> None:
    """Serialised in memory, then written by Python: a full disk or an I/O error is then an OSError with its
    errno and file name (torch's own writer reports it as "unexpected pos" or "file write failed")."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    Path(path).write_bytes(buffer.getbuffer())
