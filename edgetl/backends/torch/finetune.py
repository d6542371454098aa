"""The two-stage transfer-learning recipe on torch.

Stage 1 trains a new head on the frozen backbone: backbone features are computed once (one decode and
one forward per image) and every head epoch runs on the cached tensors, which is what makes CPU
fine-tuning practical. Stage 2 unfreezes the top K blocks at a lower learning rate with BatchNorm
statistics frozen (small data would wreck them) and light augmentation. Both stages use AdamW, linear
warm-up then cosine decay, label smoothing, early stopping on validation top-1, and keep the best weights.
Images are streamed from disk (DataLoader workers decode them); with several processes
(`backends/torch/distributed.py`) each rank decodes and extracts its shard and DDP averages gradients.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from edgetl import data
from edgetl.backbones import get_backbone
from edgetl.backends.torch.distributed import TorchWorld, launch, needs_launch, shared_dropout
from edgetl.backends.torch.distributed import session as session  # the stage opens it around the whole run
from edgetl.backends.torch.models import Backbone, build_model
from edgetl.backends.torch.weights import apply_weights
from edgetl.config import FinetuneConfig
from edgetl.distributed import WorldEnv, world_from_env
from edgetl.errors import UserError
from edgetl.finetune import run_stages
from edgetl.ui import console, progress

WEIGHTS_FILE = "model.pt"
BN_ESTIMATE_IMAGES = 1024  # enough for stable per-channel means/variances; one pass, no gradients
LIBRARIES = ("torch", "torchao", "executorch", "numpy", "pillow")


def preprocess_spec(config: FinetuneConfig) -> dict:
    """torch models take NCHW float input normalised with the backbone's published mean/std."""
    spec = get_backbone(config.backbone)
    return data.preprocess_spec(config.image_size, spec.mean, spec.std, layout="NCHW")


def describe(model: Backbone) -> dict:
    return {"feature_dim": model.feature_dim, "parameters": sum(p.numel() for p in model.parameters())}


class ImageRecords(Dataset):
    """Decodes and preprocesses images on demand (in worker processes when asked).

    A file that fails to decode yields a zero tensor and its error text, so one bad file is skipped and
    recorded instead of ending the run. Augmentation randomness is keyed by (seed, epoch, index), so it
    does not depend on the number of workers.
    """

    def __init__(self, root: Path, records: list[tuple[str, int]], spec: dict, augment_seed: int | None = None):
        self.root = root
        self.records = records
        self.spec = spec
        self.augment_seed = augment_seed
        self.epoch = 0
        size = spec["resize"]
        self.blank = torch.zeros(3, size["height"], size["width"])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        rel, label = self.records[index]
        try:
            image = data.load_rgb(self.root / rel)
        except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
            return self.blank, label, index, f"{type(error).__name__}: {error}"[:200] or "decode failed"
        if self.augment_seed is not None:
            image = data.augment(image, np.random.default_rng([self.augment_seed, self.epoch, index]))
        return torch.from_numpy(data.to_array(image, self.spec)), label, index, ""


@dataclass
class Result:
    """What the backend hands back to the stage: weights live in `model`, figures in the rest."""

    model: Backbone
    history: list[dict] = field(default_factory=list)
    decode_failures: dict[str, str] = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    throughput: dict = field(default_factory=dict)
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


def precision_settings(device: torch.device) -> dict:
    """Mixed precision (fp16 autocast + loss scaling) and channels-last memory on CUDA, where both pay off.

    MPS gets autocast only; on CPU both stay off (fp16 autocast is slow there, channels-last gains nothing).
    """
    return {
        "mixed_precision": device.type in ("cuda", "mps"),
        "grad_scaler": device.type == "cuda",
        "channels_last": device.type == "cuda",
    }


def device_info(device: torch.device, world: TorchWorld | None = None) -> dict:
    info = {
        "type": device.type,
        **precision_settings(device),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    if world is not None and world.backend:
        info["distributed"] = {"backend": world.backend, "world_size": world.size}
    return info


def warmup_cosine(total_steps: int, warmup_fraction: float) -> callable:
    """LR multiplier: linear warm-up over the first steps, then cosine decay to zero."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_done = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_done)))

    return factor


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


def launch_if_needed(config: FinetuneConfig, run_dir: Path, feature_cache: bool) -> Path | None:
    """Start torchrun's workers when several processes are asked for and none launched us; their checkpoint."""
    return launch(config, run_dir, feature_cache) if needs_launch(config, world_from_env()) else None


def build_initial_model(config: FinetuneConfig) -> tuple[Backbone, dict]:
    """The backbone with its initial weights and the published 1000-class head (replaced in `train`).

    Called before the data is listed, so a weights file that does not fit fails before any work.
    """
    spec = get_backbone(config.backbone)
    torch.manual_seed(config.seed)
    model = build_model(config.backbone, config.width, num_classes=1000)
    init = apply_weights(model, spec, config.width, config.weights)
    return model, init


class Trainer:
    """Runs the recipe for one config on this rank; keeps the best weights seen on validation across both stages.

    With several ranks every epoch walks one seeded permutation of the training split; rank r takes rows
    r, r+W, ... of each global batch, scales its summed loss by W / (global batch count) and DDP averages
    the gradients: the step equals the single-process step on the same global batch.
    """

    def __init__(self, config: FinetuneConfig, listing: data.DatasetListing, spec: dict,
                 world: TorchWorld | None = None) -> None:
        self.config = config
        self.listing = listing
        self.spec = spec
        self.world = world or TorchWorld(WorldEnv(), pick_device(config.device))
        self.device = self.world.device
        settings = precision_settings(self.device)
        self.amp = settings["mixed_precision"]
        self.channels_last = settings["channels_last"]
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing, reduction="sum")
        self.history: list[dict] = []
        self.best_top1 = -1.0
        self.best_state: dict | None = None
        self.best_where: dict = {}
        self.failures: dict[str, str] = {}
        self.throughput: dict = {}

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp)

    def _remember(self, model: nn.Module, top1: float, stage: int, epoch: int) -> bool:
        if top1 > self.best_top1:
            self.best_top1 = top1
            self.best_state = copy.deepcopy(model.state_dict())
            self.best_where = {"stage": stage, "epoch": epoch, "val_top1": round(top1, 5)}  # as in history
            return True
        return False

    def _optimizer(self, params: list[nn.Parameter], lr: float, total_steps: int):
        """AdamW with linear warm-up then cosine decay, stepped once per global batch (all three loops)."""
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=self.config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, self.config.warmup_fraction))
        return optimizer, schedule

    def _global_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the *global* batch, times W (DDP divides the summed gradients by W)."""
        count = self.world.sum([float(len(targets))])[0]
        return self.criterion(logits.float(), targets) * (self.world.size / max(1.0, count))

    def _train_loader(self, dataset: Dataset, seed: int) -> tuple[DataLoader, DistributedSampler]:
        """Each rank's share of every global batch: DistributedSampler strides one seeded permutation."""
        sampler = DistributedSampler(dataset, num_replicas=self.world.size, rank=self.world.rank, shuffle=True,
                                     seed=seed)
        loader = DataLoader(dataset, batch_size=self.config.batch_size // self.world.size, sampler=sampler,
                            num_workers=self.config.workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        return loader, sampler

    def _shard_loader(self, records: list[tuple[str, int]]) -> DataLoader:
        """This rank's fixed share of a split (no shuffling), decoded in worker processes when asked."""
        dataset = Subset(ImageRecords(self.listing.root, records, self.spec), self.world.shard(len(records)))
        return _loader(dataset, self.config.batch_size, self.config.workers, False, self.config.seed)

    def _reduce_epoch(self, loss_sum: float, correct: int, seen: int) -> tuple[float, float, int]:
        loss_sum, correct, seen = self.world.sum([loss_sum, correct, seen])
        return loss_sum / max(1.0, seen), correct / max(1.0, seen), int(seen)

    def _merge_failures(self) -> None:
        self.failures = self.world.merge(self.failures)

    # ------------------------------------------------------------ stage 1

    @torch.inference_mode()
    def extract_features(self, model: Backbone, split: str, bar) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode + backbone forward per image, each rank on its shard; every rank gets the whole cache."""
        records = self.listing.splits[split]
        task = bar.add_task(f"features ({split})", total=len(records), status="")
        shard = self.world.shard(len(records))
        local = torch.empty((len(shard), model.feature_dim))  # filled in place: the cache is held once
        keep = torch.ones(len(shard), dtype=torch.bool)
        row = 0
        for images, _, indices, errors in self._shard_loader(records):
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                local[row : row + len(indices)] = model.forward_features(images.to(self.device)).float().cpu()
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
        return (cache, labels) if bool(mask.all()) else (cache[mask], labels[mask])

    def train_head(self, model: Backbone, cached: dict[str, tuple[torch.Tensor, torch.Tensor]], bar) -> None:
        config, world = self.config, self.world
        head = model.head.to(self.device)
        features, labels = cached["train"]
        val_features, val_labels = (t.to(self.device) for t in cached["val"])
        steps_per_epoch = math.ceil(len(labels) / config.batch_size)
        optimizer, schedule = self._optimizer(list(head.parameters()), config.lr_head,
                                              steps_per_epoch * config.epochs_head)
        generator = torch.Generator().manual_seed(config.seed)
        trained = world.wrap(head)
        task = bar.add_task("stage 1: head", total=config.epochs_head, status="")
        stale = 0
        with shared_dropout(head, config.seed, world) as dropout:
            for epoch in range(1, config.epochs_head + 1):
                start = time.perf_counter()
                head.train()
                order = torch.randperm(len(labels), generator=generator)
                loss_sum, correct, seen = 0.0, 0, 0
                for step in range(steps_per_epoch):
                    batch = order[step * config.batch_size : (step + 1) * config.batch_size]
                    index = batch[world.rank :: world.size]
                    dropout.global_rows = len(batch)
                    x, y = features[index].to(self.device), labels[index].to(self.device)
                    logits = trained(x)
                    loss = self._global_loss(logits, y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    loss_sum += float(self.criterion(logits.detach().float(), y))
                    correct += int((logits.argmax(1) == y).sum())
                    seen += len(y)
                train_loss, train_top1, seen = self._reduce_epoch(loss_sum, correct, seen)
                head.eval()
                with torch.inference_mode():  # every rank holds the whole val cache: same figures everywhere
                    val_logits = head(val_features)
                    val_loss = float(self.criterion(val_logits, val_labels)) / max(1, len(val_labels))
                    val_top1 = (val_logits.argmax(1) == val_labels).float().mean().item()
                improved = self._remember(model, val_top1, 1, epoch)
                stale = 0 if improved else stale + 1
                self._log(1, epoch, train_loss, train_top1, val_loss, val_top1, schedule.get_last_lr()[0],
                          time.perf_counter() - start, seen)
                bar.update(task, advance=1, status=f"val top-1 {val_top1:.3f}")
                if stale >= config.patience:
                    console.print(f"stage 1: early stop after epoch {epoch} (no val gain for {stale} epochs)")
                    break
        bar.remove_task(task)

    def train_head_uncached(self, model: Backbone, bar) -> None:
        """Stage 1 without the feature cache (decode + backbone forward every epoch), for the benchmark."""
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        head = model.head
        for parameter in head.parameters():
            parameter.requires_grad_(True)

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                features = model.forward_features(x)
            return trained(features)

        trained = self.world.wrap(head)
        self._image_epochs(model, head, forward, 1, self.config.epochs_head, self.config.lr_head, None,
                           "stage 1: head (no cache)", bar, early_stop=False)

    # ------------------------------------------------------------ stage 2

    def finetune_top(self, model: Backbone, bar) -> None:
        stages = model.stages()
        k = min(self.config.unfreeze, len(stages))
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for unit in [*stages[-k:], model.head]:
            for parameter in unit.parameters():
                parameter.requires_grad_(True)
        trained = self.world.wrap(model)
        self._image_epochs(model, model, trained, 2, self.config.epochs_finetune, self.config.lr_finetune,
                           self.config.seed, f"stage 2: top {k} blocks", bar)

    def _image_epochs(self, model: Backbone, trainable: nn.Module, forward, stage: int, epochs: int, lr: float,
                      augment_seed: int | None, title: str, bar, early_stop: bool = True) -> None:
        """Epochs over decoded images (stage 2, or stage 1 without the cache), streamed from disk."""
        config = self.config
        train_set = ImageRecords(self.listing.root, self.listing.splits["train"], self.spec, augment_seed=augment_seed)
        loader, sampler = self._train_loader(train_set, config.seed + stage - 1)
        params = [p for p in trainable.parameters() if p.requires_grad]
        optimizer, schedule = self._optimizer(params, lr, len(loader) * epochs)
        scaler = torch.amp.GradScaler("cuda", enabled=precision_settings(self.device)["grad_scaler"])
        task = bar.add_task(title, total=epochs, status="")
        stale = 0
        with shared_dropout(model, config.seed + stage, self.world) as dropout:
            for epoch in range(1, epochs + 1):
                start = time.perf_counter()
                train_set.epoch = epoch
                sampler.set_epoch(epoch)
                model.train()
                freeze_batchnorm(model)
                batches = bar.add_task(f"  epoch {epoch}", total=len(train_set), status="")
                seen, loss_sum, correct = 0, 0.0, 0
                for images, targets, indices, errors in loader:
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
                    bar.update(batches, advance=len(targets) * self.world.size, status=f"loss {shown:.3f}")
                bar.remove_task(batches)
                train_seconds = time.perf_counter() - start
                self._merge_failures()
                train_loss, train_top1, seen = self._reduce_epoch(loss_sum, correct, seen)
                val_loss, val_top1 = self.evaluate_split(model, "val")
                improved = self._remember(model, val_top1, stage, epoch)
                stale = 0 if improved else stale + 1
                self._log(stage, epoch, train_loss, train_top1, val_loss, val_top1, schedule.get_last_lr()[0],
                          time.perf_counter() - start, seen, train_seconds)
                bar.update(task, advance=1, status=f"val top-1 {val_top1:.3f}")
                if early_stop and stale >= config.patience:
                    console.print(f"stage {stage}: early stop after epoch {epoch} (no val gain for {stale} epochs)")
                    break
        bar.remove_task(task)

    # ------------------------------------------------------------ evaluation

    @torch.inference_mode()
    def predict(self, model: Backbone, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's labels, predicted labels and softmax probabilities of a split (no augmentation)."""
        model.eval()
        records = self.listing.splits[split]
        labels, probabilities = [], [np.zeros((0, len(self.listing.classes)), np.float32)]
        for images, targets, indices, errors in self._shard_loader(records):
            ok = torch.tensor([not e for e in errors])
            for index, error in zip(indices.tolist(), errors, strict=True):
                if error:
                    self.failures[records[index][0]] = error
            with self._autocast():
                logits = model(images[ok].to(self.device)).float()
            probabilities.append(logits.softmax(1).cpu().numpy())
            labels.append(targets[ok].numpy())
        self._merge_failures()
        probs = np.concatenate(probabilities)
        labels_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        return labels_all, probs.argmax(1), probs

    def evaluate_split(self, model: Backbone, split: str) -> tuple[float, float]:
        """Loss and top-1 over the whole split (summed over ranks)."""
        labels, predicted, probs = self.predict(model, split)
        smoothing = self.config.label_smoothing
        log_probs = np.log(np.clip(probs, 1e-12, 1.0))
        nll = -log_probs[np.arange(len(labels)), labels]
        loss_sum = float(np.sum((1 - smoothing) * nll - smoothing * log_probs.mean(1)))
        loss_sum, correct, count = self.world.sum([loss_sum, float(np.sum(predicted == labels)), float(len(labels))])
        return loss_sum / max(1.0, count), correct / max(1.0, count)

    def _log(
        self,
        stage: int,
        epoch: int,
        loss: float,
        top1: float,
        val_loss: float,
        val_top1: float,
        lr: float,
        seconds: float,
        images: int,
        train_seconds: float | None = None,
    ) -> None:
        entry = {
            "stage": stage,
            "epoch": epoch,
            "train_loss": round(loss, 5),
            "train_top1": round(top1, 5),
            "val_loss": round(val_loss, 5),
            "val_top1": round(val_top1, 5),
            "lr": lr,
            "seconds": round(seconds, 3),
            "train_images_per_s": round(images / (train_seconds or seconds), 1),
        }
        self.history.append(entry)


def train(
    config: FinetuneConfig,
    listing: data.DatasetListing,
    spec: dict,
    initial: tuple[Backbone, dict],
    feature_cache: bool = True,
    world: TorchWorld | None = None,
) -> Result:
    """Run both stages from `build_initial_model`'s output; returns the best validation weights and figures."""
    model, init = initial
    torch.manual_seed(config.seed)
    model.reset_head(len(listing.classes))
    np.random.seed(config.seed % (2**32))
    torch.use_deterministic_algorithms(True, warn_only=True)
    trainer = Trainer(config, listing, spec, world)
    if trainer.world.size > 1 and not feature_cache:
        raise UserError("stage 1 without the feature cache runs in one process only; drop --devices/--nnodes")
    model.to(trainer.device)
    if trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    with progress() as bar:
        if init.get("kind") == "none":
            # every rank estimates on the same images in the same order, so the statistics agree everywhere
            train_set = ImageRecords(listing.root, listing.splits["train"], spec)
            loader = _loader(train_set, config.batch_size, config.workers, True, config.seed)
            with console.status("estimating BatchNorm statistics of the randomly initialised backbone"):
                init["batchnorm_statistics_from_images"] = estimate_batchnorm_statistics(
                    model, loader, trainer.device, BN_ESTIMATE_IMAGES
                )
        trainer.throughput = run_stages(trainer, model, config, listing, feature_cache, bar,
                                        lambda: model.load_state_dict(trainer.best_state))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return Result(
        model=model.cpu(),
        history=trainer.history,
        decode_failures=dict(trainer.failures),
        best=trainer.best_where,
        throughput=trainer.throughput,
        device=device_info(trainer.device, trainer.world),
        init=init,
    )


def evaluate(model: Backbone, config: FinetuneConfig, listing: data.DatasetListing, spec: dict, split: str,
             world: TorchWorld | None = None) -> dict:
    """Top-1, per-class accuracy and confusion matrix of a split (each rank its shard, summed), for the manifest.

    fp32 on the training device: the figures describe the saved weights, not a mixed-precision forward.
    """
    trainer = Trainer(config, listing, spec, world)
    trainer.amp = False
    model.to(trainer.device)
    labels, predicted, _ = trainer.predict(model, split)
    model.cpu()
    classes = listing.classes
    confusion = torch.zeros((len(classes), len(classes)), dtype=torch.int64)
    np.add.at(confusion.numpy(), (labels, predicted), 1)
    confusion = trainer.world.sum_array(confusion).numpy()
    per_class = {
        name: round(float(confusion[i, i] / confusion[i].sum()), 5) if confusion[i].sum() else None
        for i, name in enumerate(classes)
    }
    return {
        "top1": round(float(np.trace(confusion) / max(1, confusion.sum())), 5),
        "images": int(confusion.sum()),
        "decode_failures": dict(trainer.failures),
        "per_class_top1": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def save_weights(model: Backbone, path: Path) -> None:
    torch.save(model.state_dict(), path)
