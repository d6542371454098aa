"""Baselines that edgetl's transfer-learning recipe has to beat, on a train folder and a test folder.

    python benchmarks/baselines.py lr-pixels   --train SUBSET/train --test SUBSET/test [--seed 0] [--out R.json]
    python benchmarks/baselines.py frozen-head --train ... --test ... [--image-size 128]
    python benchmarks/baselines.py scratch     --train ... --test ... [--image-size 128] [--steps 300]

Each returns (and the CLI prints and stores) test top-1 with its Wilson 95% interval, the number of test
images, the seed, the image size, the counts, the seconds and the machine. Folders are ImageFolder trees
(`<folder>/<class>/*.png`); the classes are train's sub-folders. All three read images the way edgetl does
(`edgetl.data.load_rgb`: alpha composited on white, grayscale to RGB), so a difference between columns is
the method's, not the decoder's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from edgetl import data
from edgetl.backbones import get_backbone

BACKBONE = "efficientnet_lite0"


def list_images(folder: Path, classes: list[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    """Every image under folder/<class>/, sorted, with integer labels; classes default to the sub-folders."""
    folder = Path(folder)
    if classes is None:
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (folder / name).glob("*") if p.suffix.lower() in data.IMAGE_EXTENSIONS) \
            if (folder / name).is_dir() else []
        paths += found
        labels += [label] * len(found)
    return paths, np.array(labels, dtype=np.int64), classes


def wilson(correct: int, total: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion, as (low, high): the interval edgetl itself reports."""
    from edgetl.stats import wilson_interval

    return wilson_interval(correct, total)


def machine() -> dict:
    """Where a figure was measured."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    import sklearn

    info["sklearn"] = sklearn.__version__
    return info


def _result(method: str, predicted: np.ndarray, test_labels: np.ndarray, train_labels: np.ndarray,
            classes: list[str], seed: int, seconds: dict, settings: dict, train: Path, test: Path) -> dict:
    correct = int(np.sum(predicted == test_labels))
    total = int(len(test_labels))
    low, high = wilson(correct, total)
    return {
        "method": method,
        "top1": round(correct / total, 5),
        "ci95": [round(low, 5), round(high, 5)],
        "correct": correct,
        "test_images": total,
        "train_images": int(len(train_labels)),
        "train_per_class": {name: int(np.sum(train_labels == i)) for i, name in enumerate(classes)},
        "test_per_class": {name: int(np.sum(test_labels == i)) for i, name in enumerate(classes)},
        "per_class_top1": {name: round(float(np.mean(predicted[test_labels == i] == i)), 5)
                           for i, name in enumerate(classes) if np.any(test_labels == i)},
        "seed": seed,
        "image_size": settings.get("image_size"),
        "settings": settings,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "train": str(train),
        "test": str(test),
        "machine": machine(),
    }


# ---------------------------------------------------------------- (e) logistic regression on raw pixels


def _pixels(paths: list[Path], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image resized to size×size (bilinear), as flat gray and flat RGB vectors in 0..1."""
    gray, rgb = [], []
    for path in paths:
        image = data.load_rgb(path).resize((size, size), Image.Resampling.BILINEAR)
        rgb.append(np.asarray(image, np.float32).ravel() / 255.0)
        gray.append(np.asarray(image.convert("L"), np.float32).ravel() / 255.0)
    return np.stack(gray), np.stack(rgb)


def lr_pixels(train: Path, test: Path, seed: int = 0, pixel_size: int = 32,
              cs: tuple[float, ...] = tuple(np.logspace(-5, 1, 7)), max_iter: int = 500, threads: int = 1) -> dict:
    """L2 logistic regression on standardised raw pixels, everything chosen on the training set only.

    Images are resized to pixel_size² (bilinear). Gray or RGB, and the L2 strength (C over `cs`, one value
    per decade from 1e-5 to 10: a finer grid costs more fits than its accuracy is worth here), are
    picked by stratified k-fold cross-validation on train (k = 5, fewer when a class has fewer images;
    scikit-learn's LogisticRegressionCV, lbfgs) by held-out log-loss, which unlike accuracy does not tie on
    a handful of images. The scaler is fitted on the whole training set before the folds (unsupervised, so it
    leaks no labels); the chosen model is refitted on all of train and scored once on test. lbfgs stops after
    `max_iter` iterations: the weakly regularised fits of a near-separable folder would otherwise run for
    minutes and lose on held-out log-loss anyway (whether every fit converged is recorded). BLAS/OpenMP run
    on `threads` threads (default 1): on a shared 2-core machine two threads made each fit ~30x slower.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    train_paths, train_labels, classes = list_images(train)
    test_paths, test_labels, _ = list_images(test, classes)
    train_views = dict(zip(("gray", "rgb"), _pixels(train_paths, pixel_size), strict=True))
    test_views = dict(zip(("gray", "rgb"), _pixels(test_paths, pixel_size), strict=True))
    loaded = time.perf_counter()
    smallest = int(np.bincount(train_labels, minlength=len(classes)).min())
    folds = StratifiedKFold(n_splits=max(2, min(5, smallest)), shuffle=True, random_state=seed)
    fits, cv = {}, {}
    for view, features in train_views.items():
        scaler = StandardScaler().fit(features)
        model = LogisticRegressionCV(Cs=list(cs), cv=folds, scoring="neg_log_loss", l1_ratios=(0.0,), max_iter=max_iter,
                                     use_legacy_attributes=False, random_state=seed)
        with warnings.catch_warnings(), threadpool_limits(threads):
            warnings.simplefilter("ignore", ConvergenceWarning)
            warnings.simplefilter("ignore", UserWarning)  # "least populated class has only N members"
            model.fit(scaler.transform(features), train_labels)
        scores = model.scores_.mean(axis=0)[0]  # (n_l1_ratios=1, n_cs) -> mean over folds, per C
        fits[view] = (scaler, model)
        cv[view] = {"best_C": float(model.C_), "cv_log_loss": round(-float(scores.max()), 5)}
    view = min(cv, key=lambda v: cv[v]["cv_log_loss"])
    scaler, model = fits[view]
    predicted = model.predict(scaler.transform(test_views[view]))
    finished = time.perf_counter()
    settings = {"pixel_size": pixel_size, "representation": view, "C": cv[view]["best_C"], "cv": cv,
                "cv_folds": folds.get_n_splits(), "Cs": [float(c) for c in cs], "selection": "cv log-loss",
                "max_iter": max_iter, "converged": bool(np.all(model.n_iter_ < max_iter)), "blas_threads": threads,
                "image_size": pixel_size}
    return _result("lr-pixels", predicted, test_labels, train_labels, classes, seed,
                   {"load": loaded - started, "fit": finished - loaded, "total": finished - started}, settings,
                   train, test)


# ---------------------------------------------------------------- the ImageNet backbone, shared by (c) and (d)


def _preprocess(image_size: int) -> dict:
    spec = get_backbone(BACKBONE)
    return data.preprocess_spec(image_size, spec.mean, spec.std, layout="NCHW")


def _model(weights: str, seed: int):
    """EfficientNet-Lite0 as edgetl builds it: our definition, weights through edgetl's own loader."""
    import torch

    from edgetl.backends.torch.models import build_model
    from edgetl.backends.torch.weights import apply_weights

    torch.manual_seed(seed)
    model = build_model(BACKBONE, 1.0, num_classes=1000)
    provenance = apply_weights(model, get_backbone(BACKBONE), 1.0, weights)
    return model, provenance


class FeatureExtractor:
    """Pooled EfficientNet-Lite0 ImageNet features, backbone in eval mode (BatchNorm uses its ImageNet
    statistics, so an image's feature does not depend on its batch), kept in memory per (file content,
    size): the nested subsets of a folder, its fixed test set and folders sharing files are computed once
    per process."""

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self.model = None
        self.weights: dict = {}
        self.memo: dict[tuple[str, int], np.ndarray] = {}
        self.computed = 0
        self.reused = 0

    def __call__(self, paths: list[Path], image_size: int) -> np.ndarray:
        import torch

        if self.model is None:
            self.model, self.weights = _model("imagenet", 0)
            self.model.eval()
        keys = [(hashlib.sha256(Path(p).read_bytes()).hexdigest(), image_size) for p in paths]
        missing = [i for i, key in enumerate(keys) if key not in self.memo]
        spec = _preprocess(image_size)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            batch = torch.from_numpy(np.stack([data.to_array(data.load_rgb(paths[i]), spec) for i in chunk]))
            with torch.inference_mode():
                features = self.model.forward_features(batch).numpy()
            for i, row in zip(chunk, features, strict=True):
                self.memo[keys[i]] = row
        self.computed += len(missing)
        self.reused += len(paths) - len(missing)
        return np.stack([self.memo[key] for key in keys])


# ---------------------------------------------------------------- (c) frozen backbone + Dropout/Linear head


def frozen_head(train: Path, test: Path, seed: int = 0, image_size: int = 128, epochs: int = 10,
                batch_size: int = 32, lr: float = 0.005, momentum: float = 0.9, dropout: float = 0.2,
                label_smoothing: float = 0.1, extractor: FeatureExtractor | None = None) -> dict:
    """The "Model-Maker-style" frozen baseline: the same ImageNet EfficientNet-Lite0 weights edgetl uses,
    frozen (eval-mode BatchNorm), a new Dropout(0.2) + Linear head trained with SGD (momentum 0.9, lr 0.005,
    cosine decay to 0 over the run), 10 epochs of batch 32 (the last batch of an epoch may be smaller; at
    least one step per epoch), label smoothing 0.1, on features computed once with edgetl's preprocessing.

    Where the recipe comes from: TensorFlow Hub's `make_image_classifier` (the tool TFLite Model Maker grew
    from) defaults to a frozen module + Dropout 0.2 + Dense, SGD lr 0.005 momentum 0.9, batch 32, label
    smoothing 0.1 (5 epochs, no decay, Dense L2 1e-4); MediaPipe Model Maker's image classifier defaults to
    a frozen module + Dropout 0.2 + Dense, 10 epochs, label smoothing 0.1, cosine decay and data
    augmentation, but with RMSprop (momentum 0.9), lr 0.001 × batch/256, batch 2, 2 warm-up epochs and L2
    1e-4. This column is the combination that edgetl's issue tracker names as its reference; it has no L2
    term and no augmentation (the features are cached). Head init: Glorot-uniform weights, zero bias (Keras'
    Dense default).
    """
    import torch
    from torch import nn

    started = time.perf_counter()
    extractor = extractor or FeatureExtractor()
    train_paths, train_labels, classes = list_images(train)
    test_paths, test_labels, _ = list_images(test, classes)
    before = extractor.computed
    train_x = torch.from_numpy(extractor(train_paths, image_size))
    test_x = torch.from_numpy(extractor(test_paths, image_size))
    featured = time.perf_counter()

    torch.manual_seed(seed)
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(train_x.shape[1], len(classes)))
    nn.init.xavier_uniform_(head[1].weight)
    nn.init.zeros_(head[1].bias)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum)
    steps_per_epoch = math.ceil(len(train_labels) / batch_size)
    total = steps_per_epoch * epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    targets = torch.from_numpy(train_labels)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        epoch_loss = 0.0
        for step in range(steps_per_epoch):
            rows = order[step * batch_size : (step + 1) * batch_size]
            loss = criterion(head(train_x[rows]), targets[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += loss.item() * len(rows)
        losses.append(round(epoch_loss / len(targets), 5))
    head.eval()
    with torch.inference_mode():
        predicted = head(test_x).argmax(1).numpy()
    finished = time.perf_counter()
    settings = {"image_size": image_size, "backbone": BACKBONE, "weights": extractor.weights.get("source"),
                "weights_sha256": extractor.weights.get("sha256"), "epochs": epochs, "batch_size": batch_size,
                "steps": total, "optimizer": f"SGD lr {lr} momentum {momentum}, cosine to 0 per step",
                "dropout": dropout, "label_smoothing": label_smoothing, "train_loss_per_epoch": losses,
                "features_computed": extractor.computed - before,
                "features_reused": len(train_paths) + len(test_paths) - (extractor.computed - before)}
    return _result("frozen-head", predicted, test_labels, train_labels, classes, seed,
                   {"features": featured - started, "head": finished - featured, "total": finished - started},
                   settings, train, test)


# ---------------------------------------------------------------- (d) the same network from scratch


def from_scratch(train: Path, test: Path, seed: int = 0, image_size: int = 128, steps: int = 150,
                 batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 0.05, warmup: float = 0.05,
                 label_smoothing: float = 0.1) -> dict:
    """EfficientNet-Lite0 from random initialisation (`weights='none'`), every layer trained: AdamW (lr 2e-3,
    weight decay 0.05), linear warm-up over 5% of the steps then cosine to 0, label smoothing 0.1, edgetl's
    light augmentation (`edgetl.data.augment`: 80–100% random crop, flip, brightness/contrast) on every
    training image, batches of 32 drawn epoch by epoch from a seeded shuffle, for a FIXED number of optimizer
    steps (default 150, i.e. 4,800 augmented images, whatever the folder's size).

    On CPU this is budget-limited, not converged: a step at 128 px takes seconds on 2 cores, so 150 steps
    are what a benchmark sweep can afford, about 5 epochs of a 1,000-image folder and far from what
    training a 4.7 M-parameter network from scratch needs. Read this column as "what a small, fixed
    compute budget buys without ImageNet", not as the best a from-scratch model can do.

    After training, BatchNorm statistics are re-estimated on the un-augmented training images (edgetl's
    `estimate_batchnorm_statistics`, cumulative average), because Lite0's BatchNorm momentum of 0.01
    leaves the running averages far behind the final weights.
    """
    import torch
    from torch import nn

    from edgetl.backends.torch.finetune import estimate_batchnorm_statistics

    started = time.perf_counter()
    train_paths, train_labels, classes = list_images(train)
    test_paths, test_labels, _ = list_images(test, classes)
    spec = _preprocess(image_size)
    sources = [data.load_rgb(p) for p in train_paths]  # small images: decoded once, augmented per step
    model, provenance = _model("none", seed)
    model.reset_head(len(classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, int(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    batch = min(batch_size, len(sources))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses, done, epoch = [], 0, 0
    while done < steps:
        order = torch.randperm(len(sources), generator=generator).tolist()
        for start in range(0, len(order) - batch + 1, batch):  # full batches only: BatchNorm needs them
            rows = order[start : start + batch]
            x = torch.from_numpy(np.stack([
                data.to_array(data.augment(sources[i], np.random.default_rng([seed, epoch, i])), spec) for i in rows]))
            loss = criterion(model(x), torch.from_numpy(train_labels[rows]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            done += 1
            if done == steps:
                break
        epoch += 1
    trained = time.perf_counter()

    def plain_batches(paths: list[Path]):
        for start in range(0, len(paths), 64):
            chunk = paths[start : start + 64]
            yield torch.from_numpy(np.stack([data.to_array(data.load_rgb(p), spec) for p in chunk])), None, None, \
                [""] * len(chunk)

    with torch.no_grad():
        bn_images = estimate_batchnorm_statistics(model, plain_batches(train_paths), torch.device("cpu"), 1024)
    model.eval()
    predicted = []
    with torch.inference_mode():
        for images, *_ in plain_batches(test_paths):
            predicted.append(model(images).argmax(1).numpy())
    finished = time.perf_counter()
    settings = {"image_size": image_size, "backbone": BACKBONE, "weights": provenance["kind"], "steps": steps,
                "epochs_seen": round(steps * batch / len(sources), 2), "batch_size": batch,
                "optimizer": f"AdamW lr {lr} weight decay {weight_decay}, warm-up {warmup:.0%} then cosine",
                "label_smoothing": label_smoothing, "augmentation": "edgetl.data.augment",
                "batchnorm_reestimated_on": bn_images,
                "train_loss_last_10pct": round(float(np.mean(losses[-max(1, steps // 10):])), 5),
                "train_loss_first_10pct": round(float(np.mean(losses[: max(1, steps // 10)])), 5)}
    return _result("scratch", np.concatenate(predicted), test_labels, train_labels, classes, seed,
                   {"train": trained - started, "evaluate": finished - trained, "total": finished - started},
                   settings, train, test)


METHODS = {"lr-pixels": lr_pixels, "frozen-head": frozen_head, "scratch": from_scratch}


def summary(result: dict) -> str:
    low, high = result["ci95"]
    return (f"{result['method']}: test top-1 {100 * result['top1']:.1f}% (95% CI {100 * low:.1f}–{100 * high:.1f}, "
            f"{result['test_images']} test images; {result['train_images']} train; "
            f"{result['seconds']['total']:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=list(METHODS))
    parser.add_argument("--train", type=Path, required=True, help="ImageFolder tree to train on")
    parser.add_argument("--test", type=Path, required=True, help="ImageFolder tree to score on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128, help="frozen-head / scratch input size")
    parser.add_argument("--steps", type=int, default=150, help="scratch: optimizer steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see lr_pixels on contention)")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args()
    kwargs: dict = {"seed": args.seed}
    if args.method != "lr-pixels":
        import torch

        torch.set_num_threads(args.threads)
        kwargs["image_size"] = args.image_size
    if args.method == "scratch":
        kwargs["steps"] = args.steps
    result = METHODS[args.method](args.train, args.test, **kwargs)
    print(summary(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
