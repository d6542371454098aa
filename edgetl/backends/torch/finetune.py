"""The two-stage transfer-learning recipe on torch.

Stage 1 trains a new head on the frozen backbone: backbone features are computed once (one decode and
one forward per image) and every head epoch runs on the cached tensors, which is what makes CPU
fine-tuning practical. Stage 2 unfreezes the top K blocks at a lower learning rate with BatchNorm
statistics frozen (small data would wreck them) and light augmentation. Both stages use AdamW, linear
warm-up then cosine decay, label smoothing, early stopping on validation top-1, and keep the best weights.
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
from torch.utils.data import DataLoader, Dataset

from edgetl import data
from edgetl.backbones import get_backbone
from edgetl.backends.torch.models import Backbone, build_model
from edgetl.backends.torch.weights import apply_weights
from edgetl.config import FinetuneConfig
from edgetl.errors import UserError
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


def device_info(device: torch.device) -> dict:
    info = {
        "type": device.type,
        "mixed_precision": device.type in ("cuda", "mps"),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
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
    """Runs the recipe for one config; keeps the best weights seen on validation across both stages."""

    def __init__(self, config: FinetuneConfig, listing: data.DatasetListing, spec: dict) -> None:
        self.config = config
        self.listing = listing
        self.spec = spec
        self.device = pick_device(config.device)
        self.amp = self.device.type in ("cuda", "mps")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
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
            self.best_where = {"stage": stage, "epoch": epoch, "val_top1": top1}
            return True
        return False

    # ------------------------------------------------------------ stage 1

    @torch.inference_mode()
    def extract_features(self, model: Backbone, split: str, bar) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode + backbone forward per image of a split; failed files are dropped and recorded."""
        records = self.listing.splits[split]
        loader = _loader(
            ImageRecords(self.listing.root, records, self.spec),
            self.config.batch_size,
            self.config.workers,
            False,
            self.config.seed,
        )
        task = bar.add_task(f"features ({split})", total=len(records), status="")
        features, labels, keep = [], [], []
        for images, targets, indices, errors in loader:
            with self._autocast():
                features.append(model.forward_features(images.to(self.device)).float().cpu())
            labels.append(targets)
            for index, error in zip(indices.tolist(), errors, strict=True):
                if error:
                    self.failures[records[index][0]] = error
                keep.append(not error)
            bar.advance(task, len(targets))
        bar.remove_task(task)
        mask = torch.tensor(keep, dtype=torch.bool)
        return torch.cat(features)[mask], torch.cat(labels)[mask]

    def train_head(self, model: Backbone, cached: dict[str, tuple[torch.Tensor, torch.Tensor]], bar) -> None:
        config = self.config
        head = model.head.to(self.device)
        features, labels = cached["train"]
        val_features, val_labels = (t.to(self.device) for t in cached["val"])
        steps_per_epoch = math.ceil(len(labels) / config.batch_size)
        optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr_head, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(steps_per_epoch * config.epochs_head, config.warmup_fraction)
        )
        generator = torch.Generator().manual_seed(config.seed)
        task = bar.add_task("stage 1: head", total=config.epochs_head, status="")
        stale = 0
        for epoch in range(1, config.epochs_head + 1):
            start = time.perf_counter()
            head.train()
            order = torch.randperm(len(labels), generator=generator)
            loss_sum, correct = 0.0, 0
            for step in range(steps_per_epoch):
                index = order[step * config.batch_size : (step + 1) * config.batch_size]
                x, y = features[index].to(self.device), labels[index].to(self.device)
                logits = head(x)
                loss = self.criterion(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
            head.eval()
            with torch.inference_mode():
                val_logits = head(val_features)
                val_loss = self.criterion(val_logits, val_labels).item()
                val_top1 = (val_logits.argmax(1) == val_labels).float().mean().item()
            improved = self._remember(model, val_top1, 1, epoch)
            stale = 0 if improved else stale + 1
            self._log(
                1,
                epoch,
                loss_sum / len(labels),
                correct / len(labels),
                val_loss,
                val_top1,
                schedule.get_last_lr()[0],
                time.perf_counter() - start,
                len(labels),
            )
            bar.update(task, advance=1, status=f"val top-1 {val_top1:.3f}")
            if stale >= config.patience:
                console.print(f"stage 1: early stop after epoch {epoch} (no val gain for {stale} epochs)")
                break
        bar.remove_task(task)

    def train_head_uncached(self, model: Backbone, bar) -> None:
        """Stage 1 without the feature cache (decode + backbone forward every epoch), for the benchmark."""
        config = self.config
        head = model.head
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in head.parameters():
            parameter.requires_grad_(True)
        train_set = ImageRecords(self.listing.root, self.listing.splits["train"], self.spec)
        loader = _loader(train_set, config.batch_size, config.workers, True, config.seed)
        optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr_head, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(len(loader) * config.epochs_head, config.warmup_fraction)
        )
        task = bar.add_task("stage 1: head (no cache)", total=config.epochs_head, status="")
        for epoch in range(1, config.epochs_head + 1):
            start = time.perf_counter()
            model.eval()
            head.train()
            seen, loss_sum, correct = 0, 0.0, 0
            for images, targets, _, errors in loader:
                ok = torch.tensor([not e for e in errors])
                x, y = images[ok].to(self.device), targets[ok].to(self.device)
                with torch.no_grad():
                    features = model.forward_features(x)
                logits = head(features)
                loss = self.criterion(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                seen += len(y)
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
            val_loss, val_top1 = self.evaluate_split(model, "val")
            self._remember(model, val_top1, 1, epoch)
            self._log(
                1,
                epoch,
                loss_sum / seen,
                correct / seen,
                val_loss,
                val_top1,
                schedule.get_last_lr()[0],
                time.perf_counter() - start,
                seen,
            )
            bar.update(task, advance=1, status=f"val top-1 {val_top1:.3f}")
        bar.remove_task(task)

    # ------------------------------------------------------------ stage 2

    def finetune_top(self, model: Backbone, bar) -> None:
        config = self.config
        stages = model.stages()
        k = min(config.unfreeze, len(stages))
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        trainable = [*stages[-k:], model.head]
        params = [p for unit in trainable for p in unit.parameters()]
        for parameter in params:
            parameter.requires_grad_(True)
        train_set = ImageRecords(self.listing.root, self.listing.splits["train"], self.spec, augment_seed=config.seed)
        loader = _loader(train_set, config.batch_size, config.workers, True, config.seed + 1)
        optimizer = torch.optim.AdamW(params, lr=config.lr_finetune, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(len(loader) * config.epochs_finetune, config.warmup_fraction)
        )
        scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda")
        task = bar.add_task(f"stage 2: top {k} blocks", total=config.epochs_finetune, status="")
        stale = 0
        for epoch in range(1, config.epochs_finetune + 1):
            start = time.perf_counter()
            train_set.epoch = epoch
            model.train()
            freeze_batchnorm(model)
            batches = bar.add_task(f"  epoch {epoch}", total=len(train_set), status="")
            seen, loss_sum, correct = 0, 0.0, 0
            for images, targets, _, errors in loader:
                ok = torch.tensor([not e for e in errors])
                x, y = images[ok].to(self.device), targets[ok].to(self.device)
                if self.device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with self._autocast():
                    logits = model(x)
                    loss = self.criterion(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                seen += len(y)
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                bar.update(batches, advance=len(targets), status=f"loss {loss.item():.3f}")
            bar.remove_task(batches)
            train_seconds = time.perf_counter() - start
            val_loss, val_top1 = self.evaluate_split(model, "val")
            improved = self._remember(model, val_top1, 2, epoch)
            stale = 0 if improved else stale + 1
            self._log(
                2,
                epoch,
                loss_sum / max(1, seen),
                correct / max(1, seen),
                val_loss,
                val_top1,
                schedule.get_last_lr()[0],
                time.perf_counter() - start,
                seen,
                train_seconds,
            )
            bar.update(task, advance=1, status=f"val top-1 {val_top1:.3f}")
            if stale >= config.patience:
                console.print(f"stage 2: early stop after epoch {epoch} (no val gain for {stale} epochs)")
                break
        bar.remove_task(task)

    # ------------------------------------------------------------ evaluation

    @torch.inference_mode()
    def predict(self, model: Backbone, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels, predicted labels and softmax probabilities of a split (full model, no augmentation)."""
        model.eval()
        records = self.listing.splits[split]
        loader = _loader(
            ImageRecords(self.listing.root, records, self.spec),
            self.config.batch_size,
            self.config.workers,
            False,
            self.config.seed,
        )
        labels, probabilities = [], []
        for images, targets, indices, errors in loader:
            ok = torch.tensor([not e for e in errors])
            for index, error in zip(indices.tolist(), errors, strict=True):
                if error:
                    self.failures[records[index][0]] = error
            with self._autocast():
                logits = model(images[ok].to(self.device)).float()
            probabilities.append(logits.softmax(1).cpu().numpy())
            labels.append(targets[ok].numpy())
        probs = np.concatenate(probabilities)
        return np.concatenate(labels), probs.argmax(1), probs

    def evaluate_split(self, model: Backbone, split: str) -> tuple[float, float]:
        labels, predicted, probs = self.predict(model, split)
        smoothing = self.config.label_smoothing
        log_probs = np.log(np.clip(probs, 1e-12, 1.0))
        nll = -log_probs[np.arange(len(labels)), labels]
        loss = float(np.mean((1 - smoothing) * nll - smoothing * log_probs.mean(1)))
        return loss, float(np.mean(predicted == labels))

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
) -> Result:
    """Run both stages from `build_initial_model`'s output; returns the best validation weights and figures."""
    model, init = initial
    torch.manual_seed(config.seed)
    model.reset_head(len(listing.classes))
    np.random.seed(config.seed % (2**32))
    torch.use_deterministic_algorithms(True, warn_only=True)
    trainer = Trainer(config, listing, spec)
    model.to(trainer.device)
    if trainer.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    with progress() as bar:
        if init.get("kind") == "none":
            train_set = ImageRecords(listing.root, listing.splits["train"], spec)
            loader = _loader(train_set, config.batch_size, config.workers, True, config.seed)
            with console.status("estimating BatchNorm statistics of the randomly initialised backbone"):
                init["batchnorm_statistics_from_images"] = estimate_batchnorm_statistics(
                    model, loader, trainer.device, BN_ESTIMATE_IMAGES
                )
        if config.epochs_head:
            start = time.perf_counter()
            if feature_cache:
                model.eval()
                cached = {}
                for split in ("train", "val"):
                    cached[split] = trainer.extract_features(model, split, bar)
                extract_seconds = time.perf_counter() - start
                listing.drop(trainer.failures)
                trainer.failures.clear()
                trainer.train_head(model, cached, bar)
                head_seconds = time.perf_counter() - start - extract_seconds
                trainer.throughput["stage1"] = {
                    "feature_cache": True,
                    "feature_extraction_seconds": round(extract_seconds, 2),
                    "feature_images_per_s": round(sum(len(v[1]) for v in cached.values()) / extract_seconds, 1),
                    "head_seconds": round(head_seconds, 2),
                }
            else:
                trainer.train_head_uncached(model, bar)
                trainer.throughput["stage1"] = {"feature_cache": False}
            stage1_seconds = time.perf_counter() - start
            epochs_run = sum(1 for h in trainer.history if h["stage"] == 1)
            trainer.throughput["stage1"].update(
                {
                    "seconds": round(stage1_seconds, 2),
                    "epochs": epochs_run,
                    "images_per_s": round(epochs_run * len(listing.splits["train"]) / stage1_seconds, 1),
                }
            )
            model.load_state_dict(trainer.best_state)
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
        model.load_state_dict(trainer.best_state)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return Result(
        model=model.cpu(),
        history=trainer.history,
        decode_failures=dict(trainer.failures),
        best=trainer.best_where,
        throughput=trainer.throughput,
        device=device_info(trainer.device),
        init=init,
    )


def evaluate(model: Backbone, config: FinetuneConfig, listing: data.DatasetListing, spec: dict, split: str) -> dict:
    """Top-1, per-class accuracy and confusion matrix of a split, for the manifest."""
    trainer = Trainer(config, listing, spec)
    trainer.device = torch.device("cpu")
    trainer.amp = False
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


def save_weights(model: Backbone, path: Path) -> None:
    torch.save(model.state_dict(), path)
