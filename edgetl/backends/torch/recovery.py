"""The short training loop that channel pruning, magnitude pruning and QAT share.

It trains on the checkpoint's own training split with the checkpoint's own preprocessing and the
fine-tuning augmentation (`backends/torch/finetune.py`: `ImageRecords`, its loader, warm-up + cosine, frozen
BatchNorm), so a compressed model sees exactly the data its dense parent was fine-tuned on. A hook called
after every optimiser step lets magnitude pruning raise its sparsity on a schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from edgetl import data
from edgetl.backends.base import Tune
from edgetl.backends.torch.finetune import ImageRecords, _loader, freeze_batchnorm, warmup_cosine
from edgetl.ui import console, progress


def training_records(listing: data.DatasetListing, tune: Tune) -> list[tuple[str, int]]:
    """The training split, or a seeded subset of `tune.images` of it."""
    records = listing.splits["train"]
    if tune.images is not None and tune.images < len(records):
        order = np.random.default_rng(tune.seed).permutation(len(records))[: tune.images]
        records = [records[i] for i in sorted(order)]
    return records


def val_arrays(listing: data.DatasetListing, spec: dict, limit: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation split decoded once (NCHW, as `spec` says); empty tensors when there is none."""
    x, y = data.decode_kept(listing.root, listing.splits.get("val", [])[:limit], spec)
    if not len(x):
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(x), torch.from_numpy(y)


def _is_graph(model: nn.Module) -> bool:
    """Exported PT2E graphs refuse .train()/.eval(); they have no BatchNorm or dropout left to switch."""
    return isinstance(model, torch.fx.GraphModule)


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor, y: torch.Tensor, nhwc: bool = False, batch: int = 100) -> float | None:
    if not len(y):
        return None
    if not _is_graph(model):
        model.eval()
    correct = 0
    for start in range(0, len(y), batch):
        chunk = x[start : start + batch]
        chunk = chunk.permute(0, 2, 3, 1).contiguous() if nhwc else chunk
        correct += int((model(chunk).argmax(1) == y[start : start + batch]).sum())
    return correct / len(y)


def distillation_loss(logits: torch.Tensor, teacher: nn.Module, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: KL(teacher ‖ student) at `temperature`, scaled by T² to keep gradients comparable.

    A pruned or quantized student learns from the dense model's whole output distribution (which classes look
    alike), not only the one-hot label: far more signal per image on a small training split.
    """
    with torch.no_grad():
        soft_targets = nn.functional.softmax(teacher(x) / temperature, dim=1)
    log_student = nn.functional.log_softmax(logits / temperature, dim=1)
    return nn.functional.kl_div(log_student, soft_targets, reduction="batchmean") * temperature**2


def fit(
    model: nn.Module,
    listing: data.DatasetListing,
    spec: dict,
    tune: Tune,
    what: str,
    nhwc: bool = False,
    after_step: Callable[[int, int], None] | None = None,
    teacher: nn.Module | None = None,
) -> dict:
    """Train every parameter of `model` in place for `tune.epochs` epochs; BatchNorm statistics stay frozen.

    `spec` is the checkpoint's (NCHW) preprocessing; `nhwc` feeds a model that takes NHWC images (the
    export graphs). Returns what the manifest records: the settings, images used, loss and val top-1 per epoch.
    """
    torch.manual_seed(tune.seed)
    records = training_records(listing, tune)
    dataset = ImageRecords(listing.root, records, spec, augment_seed=tune.seed)
    loader = _loader(dataset, tune.batch_size, 0, True, tune.seed)
    x_val, y_val = val_arrays(listing, spec)
    params = [p for p in model.parameters() if p.is_floating_point()]
    for parameter in params:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=tune.lr, weight_decay=tune.weight_decay)
    total = max(1, math.ceil(len(records) / tune.batch_size) * tune.epochs)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, 0.1))
    criterion = nn.CrossEntropyLoss(label_smoothing=tune.label_smoothing)
    distilling = teacher is not None and tune.distill > 0
    if distilling and not _is_graph(teacher):
        teacher.eval()
    history, step, failed = [], 0, set()
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(what, total=tune.epochs * len(records), status="")
        for epoch in range(1, tune.epochs + 1):
            began = time.perf_counter()
            dataset.epoch = epoch
            if not _is_graph(model):
                model.train()
                if not tune.train_batchnorm:
                    freeze_batchnorm(model)
            seen, loss_sum, correct = 0, 0.0, 0
            for images, targets, indices, errors in loader:
                ok = torch.tensor([not e for e in errors])
                failed.update(int(i) for i, e in zip(indices.tolist(), errors, strict=True) if e)
                x, y = images[ok], targets[ok]
                if not len(y):
                    continue
                if nhwc:
                    x = x.permute(0, 2, 3, 1).contiguous()
                logits = model(x)
                loss = criterion(logits, y)
                if distilling:
                    loss = (1 - tune.distill) * loss + tune.distill * distillation_loss(logits, teacher, x,
                                                                                         tune.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                if after_step is not None:
                    after_step(step, total)
                seen += len(y)
                loss_sum += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                bar.update(task, advance=len(targets), status=f"epoch {epoch} loss {loss.item():.3f}")
            val = top1(model, x_val, y_val, nhwc)
            history.append({"epoch": epoch, "train_loss": round(loss_sum / max(1, seen), 5),
                            "train_top1": round(correct / max(1, seen), 5),
                            "val_top1": None if val is None else round(val, 5),
                            "seconds": round(time.perf_counter() - began, 1)})
            shown = "" if val is None else f", val top-1 {val:.3f}"
            console.print(f"{what}: epoch {epoch}/{tune.epochs}, loss {loss_sum / max(1, seen):.3f}{shown} "
                          f"({history[-1]['seconds']:.0f} s)")
    if not _is_graph(model):
        model.eval()
    return {**tune.to_json(), "train_images": len(records) - len(failed), "undecodable": len(failed),
            "val_images": int(len(y_val)), "steps": step, "history": history,
            "seconds": round(time.perf_counter() - started, 1)}
