"""The recipe's settings, fitted to the folder: what a flag leaves open is decided from the data.

Framework-free and decided before any training, from the listing and the image headers: the input size
(from the images' own size), the batch size and the stage-2 budget (in optimizer steps, so a folder of
fifty images trains as long as it needs and a folder of fifty thousand does not train for days), how many
blocks stage 2 unfreezes, whether classes are weighted, and which rule picks the kept weights. Every
choice is printed and stored with its reason; the constants below are the measured defaults
(docs/BENCHMARKS.md, "Transfer learning on small folders").
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

from edgetl.backbones import check_image_size, get_backbone
from edgetl.config import FinetuneConfig
from edgetl.data import DatasetListing
from edgetl.selection import LARGE_VALIDATION, SMALL_VALIDATION
from edgetl.stats import half_width

HEADER_SAMPLE = 256  # training images whose size is read to describe the folder
# When the training images are smaller than the backbone's input and the features are pretrained, the
# input size is measured: the probe's cross-validated log loss on a stratified sample of the training
# split at each candidate size; the smallest size within one standard error of the best wins (a smaller
# input costs less to train, to export and on the phone). Measured on the benchmark folders
# (docs/BENCHMARKS.md), no single size is best: icons gain up to 224 px, Fashion-MNIST peaks near 128.
SIZE_CANDIDATES = (128, 160, 224)
SEARCH_PER_CLASS = 40
SEARCH_IMAGES = 600
MAX_BATCH = 64
MIN_BATCH = 8
# Stage 2 takes at least this many optimizer steps (and at least STAGE2_EPOCHS epochs), at most
# MAX_STAGE2_EPOCHS epochs: a 150-image folder would otherwise get a dozen steps.
MIN_STAGE2_STEPS = 200
STAGE2_EPOCHS = 4
MAX_STAGE2_EPOCHS = 100
UNFREEZE_ALL = -1  # config value meaning every block
# Classes are weighted by inverse frequency when the largest training class holds this many times the
# images of the smallest.
IMBALANCE_RATIO = 1.5
SMALL_TEST = 200  # below this many test images a warning says how wide the 95% interval is


@dataclass(frozen=True)
class Choice:
    value: object
    source: str  # "flag" (the user's) or "auto" (decided here)
    why: str

    def to_json(self) -> dict:
        return {"value": self.value, "source": self.source, "why": self.why}


@dataclass(frozen=True)
class Plan:
    """The resolved config the backends train with, and why each open setting is what it is."""

    config: FinetuneConfig
    choices: dict[str, Choice] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    folder: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"choices": {k: c.to_json() for k, c in self.choices.items()}, "warnings": list(self.warnings),
                "folder": self.folder}


def describe_folder(listing: DatasetListing, seed: int = 0) -> dict:
    """Counts per split and class, and the size of the training images (read from a sample of headers)."""
    train = listing.splits["train"]
    rng = np.random.default_rng(seed)
    picks = rng.permutation(len(train))[:HEADER_SAMPLE]
    sides, widths, heights = [], [], []
    for index in picks:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(listing.root / train[int(index)][0]) as image:
                    width, height = image.size
        except Exception:  # a file that fails here is skipped at decode time and listed then
            continue
        sides.append(min(width, height))
        widths.append(width)
        heights.append(height)
    per_class = np.bincount([label for _, label in train], minlength=len(listing.classes))
    return {
        "classes": len(listing.classes),
        "images": {split: len(records) for split, records in listing.splits.items()},
        "train_per_class": {"min": int(per_class.min()), "max": int(per_class.max()),
                            "median": float(np.median(per_class))},
        "source_size": {"median_short_side": int(np.median(sides)) if sides else None,
                        "median_width": int(np.median(widths)) if widths else None,
                        "median_height": int(np.median(heights)) if heights else None,
                        "sampled": len(sides)},
    }


def fold_small_validation(listing: DatasetListing) -> tuple[DatasetListing, dict | None]:
    """A validation split edgetl carved that is too small to rank models goes back into training.

    Below SMALL_VALIDATION images the selection rule never looks at validation (the end of the schedule
    is kept), so the images would only be lost to training: at five images a class the carved split is a
    fifth of the data. A validation folder the user gave is always kept as it is.
    """
    val = listing.splits["val"]
    # scan_folder's split_origin: "folders" (val/ given), "folders; val carved ..." or "stratified, seed N"
    carved = "val carved" in listing.split_origin or not listing.split_origin.startswith("folders")
    if not carved or not val or len(val) >= SMALL_VALIDATION:
        return listing, None
    train = sorted(listing.splits["train"] + val, key=lambda record: (record[1], record[0]))
    folded = replace(listing, splits={**listing.splits, "train": train, "val": []},
                     split_origin=f"{listing.split_origin}; the {len(val)} carved validation images were put back "
                                  f"into train (fewer than {SMALL_VALIDATION} cannot rank models)")
    return folded, {"folded_images": len(val), "threshold": SMALL_VALIDATION}


def size_candidates(config: FinetuneConfig, folder: dict, any_size_features: bool) -> tuple[int, ...]:
    """The input sizes worth measuring for this run; empty when there is nothing to measure.

    Nothing is measured when the size is given, when the network starts from random weights (its
    features rank nothing), when the backend cannot run one model at several sizes, or when the images
    are already at least the backbone's own input.
    """
    if config.model.image_size is not None or config.model.weights == "none" or not any_size_features:
        return ()
    default = get_backbone(config.model.backbone).default_image_size
    side = folder["source_size"]["median_short_side"]
    if side is None or side >= default:
        return ()
    return tuple(size for size in SIZE_CANDIDATES if size <= default)


def search_sample(listing: DatasetListing, seed: int) -> DatasetListing:
    """A stratified sample of the training split (at most SEARCH_PER_CLASS a class, SEARCH_IMAGES in all)."""
    rng = np.random.default_rng(seed)
    train = listing.splits["train"]
    per_class = max(2, min(SEARCH_PER_CLASS, SEARCH_IMAGES // max(1, len(listing.classes))))
    picked: list[tuple[str, int]] = []
    for label in range(len(listing.classes)):
        rows = [record for record in train if record[1] == label]
        picked += [rows[int(i)] for i in sorted(rng.permutation(len(rows))[:per_class])]
    return replace(listing, splits={"train": picked, "val": [], "test": []}, skipped=[], ignored=[])


def pick_size(measured: dict[int, tuple[float, float]]) -> int:
    """The smallest size whose cross-validated loss is within one standard error of the lowest."""
    best = min(measured, key=lambda size: measured[size][0])
    loss, error = measured[best]
    return min(size for size, (other, _) in measured.items() if other <= loss + error)


def plan(config: FinetuneConfig, listing: DatasetListing, processes: int = 1,
         measured_sizes: dict[int, tuple[float, float]] | None = None, folder: dict | None = None) -> Plan:
    """Fill every setting the user left open (None in `config`, "auto" class weights) from the folder.

    `processes` is the number of training processes (the global batch must divide over them);
    `measured_sizes` maps each candidate input size to the probe's cross-validated log loss and its
    standard error there (see `size_candidates`), when they were measured.
    """
    folder = dict(folder) if folder is not None else describe_folder(listing, config.train.seed)
    choices: dict[str, Choice] = {}
    spec = get_backbone(config.model.backbone)

    side = folder["source_size"]["median_short_side"]
    if config.model.image_size is not None:
        size = Choice(config.model.image_size, "flag", "--image-size")
    elif measured_sizes:
        chosen = pick_size(measured_sizes)
        shown = ", ".join(f"{s} px {loss:.3f}±{error:.3f}" for s, (loss, error) in sorted(measured_sizes.items()))
        size = Choice(chosen, "auto", f"training images are {side} px: the probe's cross-validated log loss on a "
                                      f"sample of the training split was {shown}; the smallest size within one "
                                      f"standard error of the lowest")
    else:
        size = Choice(spec.default_image_size, "auto",
                      f"the backbone's own input ({spec.default_image_size} px; median short side {side} px)")
    choices["image_size"] = Choice(check_image_size(int(size.value)), size.source, size.why)

    n_train = len(listing.splits["train"])
    world = max(1, processes)
    if config.train.batch_size is not None:
        choices["batch_size"] = Choice(config.train.batch_size, "flag", "--batch-size")
    else:
        batch = max(MIN_BATCH, min(MAX_BATCH, 2 ** int(math.log2(max(1, n_train // 4)))))
        batch = max(world, batch // world * world)  # the global batch divides over the processes
        choices["batch_size"] = Choice(batch, "auto", f"{n_train} training images: about four batches an epoch at "
                                                      f"least, {MIN_BATCH} to {MAX_BATCH} images each")
    batch = int(choices["batch_size"].value)

    steps_per_epoch = math.ceil(n_train / batch)
    if config.train.epochs_finetune is not None:
        choices["epochs_finetune"] = Choice(config.train.epochs_finetune, "flag", "--epochs-finetune")
    else:
        epochs = min(MAX_STAGE2_EPOCHS, max(STAGE2_EPOCHS, math.ceil(MIN_STAGE2_STEPS / steps_per_epoch)))
        choices["epochs_finetune"] = Choice(
            epochs, "auto", f"at least {MIN_STAGE2_STEPS} optimizer steps and {STAGE2_EPOCHS} epochs "
                            f"({steps_per_epoch} steps an epoch), at most {MAX_STAGE2_EPOCHS} epochs: "
                            f"{epochs * steps_per_epoch} steps")

    if config.train.unfreeze is not None:
        choices["unfreeze"] = Choice(config.train.unfreeze, "flag", "--unfreeze")
    else:
        batchnorm = ("BatchNorm statistics trained, then re-estimated before each validation"
                     if config.model.weights == "none" else "BatchNorm statistics stay frozen")
        choices["unfreeze"] = Choice(UNFREEZE_ALL, "auto", f"every block ({batchnorm})")

    counts = folder["train_per_class"]
    ratio = counts["max"] / max(1, counts["min"])
    if config.dataset.class_weights != "auto":
        choices["class_weights"] = Choice(config.dataset.class_weights, "flag", "--class-weights")
    elif ratio >= IMBALANCE_RATIO:
        choices["class_weights"] = Choice("balanced", "auto", f"unbalanced classes (largest/smallest training class "
                                                              f"{counts['max']}/{counts['min']} >= {IMBALANCE_RATIO})")
    else:
        choices["class_weights"] = Choice("none", "auto", f"balanced classes ({counts['max']}/{counts['min']} "
                                                          f"< {IMBALANCE_RATIO})")

    n_val = len(listing.splits["val"])
    if folder.get("validation_folded"):
        folded = folder["validation_folded"]["folded_images"]
        choices["validation"] = Choice("none (put back into train)", "auto",
                                       f"the carved validation split would hold {folded} images (< "
                                       f"{SMALL_VALIDATION}): too few to rank models, so they train instead")
    if n_val >= LARGE_VALIDATION:
        selection = Choice("val_top1", "auto", f"{n_val} validation images (>= {LARGE_VALIDATION})")
    elif n_val >= SMALL_VALIDATION:
        selection = Choice("end_of_schedule", "auto",
                           f"{n_val} validation images ({SMALL_VALIDATION} to {LARGE_VALIDATION - 1})")
    else:
        selection = Choice("end_of_schedule_only", "auto", f"{n_val} validation images (< {SMALL_VALIDATION})")
    choices["selection"] = selection

    notes = []
    n_test = len(listing.splits["test"])
    if n_test < SMALL_TEST:
        notes.append(f"the test split has {n_test} images: its top-1 is known to about ±{100 * half_width(n_test):.0f} "
                     f"points (95% interval at 50%), so results a few points apart cannot be told apart")
    resolved = config.with_(image_size=int(choices["image_size"].value), batch_size=batch,
                            epochs_finetune=int(choices["epochs_finetune"].value),
                            unfreeze=int(choices["unfreeze"].value),
                            class_weights=str(choices["class_weights"].value))
    return Plan(resolved.validate(), choices, tuple(notes), folder)
