"""Image folders: listing, labels, deterministic stratified splits, robust decoding and preprocessing.

Framework-free (Pillow + numpy) so both backends, the exporter and the verifier apply exactly the same
preprocessing that the checkpoint manifest describes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from edgetl.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")

# A truncated file must fail loudly so that it is skipped, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass
class DatasetListing:
    """What a data folder holds: labels, the three splits as (relative path, label) and skipped files."""

    root: Path
    source: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    split_origin: str  # "folders" when train/val/test trees were given, else how the split was made
    skipped: list[dict[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class per split, for the manifest."""
        table: dict[str, dict[str, int]] = {}
        for split, records in self.splits.items():
            per_class = dict.fromkeys(self.classes, 0)
            for _, label in records:
                per_class[self.classes[label]] += 1
            table[split] = per_class
        return table

    def drop(self, bad: dict[str, str]) -> None:
        """Remove files that failed to decode from every split and record why."""
        if not bad:
            return
        for split in self.splits:
            self.splits[split] = [(p, y) for p, y in self.splits[split] if p not in bad]
        self.skipped.extend({"path": p, "reason": r} for p, r in sorted(bad.items()))

    def to_json(self) -> dict:
        return {
            "root": str(self.root),
            "source": self.source,
            "classes": self.classes,
            "split_origin": self.split_origin,
            "splits": {k: [[p, y] for p, y in v] for k, v in self.splits.items()},
        }

    @classmethod
    def from_json(cls, payload: dict) -> DatasetListing:
        return cls(
            root=Path(payload["root"]),
            source=payload["source"],
            classes=list(payload["classes"]),
            splits={k: [(p, int(y)) for p, y in v] for k, v in payload["splits"].items()},
            split_origin=payload["split_origin"],
        )


def load_rgb(path: Path) -> Image.Image:
    """Decode any supported file to an upright RGB image.

    First frame of animations, EXIF orientation applied, alpha composited on white (what a photo
    viewer shows), palette/grayscale/CMYK converted. Raises OSError/ValueError for unreadable files.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns on odd EXIF / palette transparency; not our user's problem
        with Image.open(path) as image:
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                canvas = Image.new("RGB", rgba.size, (255, 255, 255))
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                return canvas
            return image.convert("RGB")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _class_dirs(root: Path) -> list[Path]:
    return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _list_tree(root: Path, base: Path, classes: list[str]) -> tuple[list[tuple[str, int]], list[dict[str, str]]]:
    """(relative path, label) for every image under root/<class>/, plus files that are not images."""
    records: list[tuple[str, int]] = []
    skipped: list[dict[str, str]] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(base).as_posix()
            if path.name.startswith("."):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append({"path": rel, "reason": f"not an image extension ({path.suffix or 'none'})"})
                continue
            records.append((rel, label))
    return records, skipped


def _probe(base: Path, records: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[dict[str, str]]]:
    """Header check of every file (cheap: no pixel decoding); full decode errors are caught later."""
    good: list[tuple[str, int]] = []
    bad: list[dict[str, str]] = []
    for rel, label in records:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(base / rel) as image:
                    image.size  # noqa: B018 - forces the header parse
            good.append((rel, label))
        except Exception as error:  # Pillow raises several types for garbage files
            bad.append({"path": rel, "reason": f"unreadable: {type(error).__name__}: {error}"[:200]})
    return good, bad


def _stratified_take(
    records: list[tuple[str, int]], fraction: float, rng: np.random.Generator, num_classes: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split off `fraction` of every class (at least one image each) deterministically."""
    kept: list[tuple[str, int]] = []
    taken: list[tuple[str, int]] = []
    for label in range(num_classes):
        members = sorted(r for r in records if r[1] == label)
        order = rng.permutation(len(members))
        n_take = max(1, int(round(fraction * len(members))))
        taken += [members[i] for i in order[:n_take]]
        kept += [members[i] for i in order[n_take:]]
    return sorted(kept), sorted(taken)


def scan_folder(
    root: Path, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1, source: str | None = None
) -> DatasetListing:
    """List an ImageFolder tree (or train/val/test trees) and make the splits that are not given."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder {str(root)!r} does not exist; give a folder with one sub-folder per class")
    if not root.is_dir():
        raise UserError(f"data path {str(root)!r} is not a folder; give a folder with one sub-folder per class")
    given = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if given and "train" not in given:
        raise UserError(f"{str(root)!r} has {', '.join(given)} but no train/ folder; add train/ or use one tree")
    train_root = given.get("train", root)
    classes = [d.name for d in _class_dirs(train_root)]
    if not classes:
        raise UserError(f"data folder {str(train_root)!r} has no class sub-folders; expected one folder per class")
    if len(classes) < 2:
        raise UserError(f"data folder {str(train_root)!r} has a single class ({classes[0]!r}); need at least 2")
    for split, folder in given.items():
        extra = sorted({d.name for d in _class_dirs(folder)} - set(classes))
        if extra:
            raise UserError(f"{split}/ has classes not in train/: {', '.join(extra)}; valid: {', '.join(classes)}")

    skipped: list[dict[str, str]] = []
    listed: dict[str, list[tuple[str, int]]] = {}
    for split in list(given) or ["train"]:
        records, not_images = _list_tree(given.get(split, root), root, classes)
        records, unreadable = _probe(root, records)
        skipped += not_images + unreadable
        listed[split] = records

    counts = {name: sum(1 for _, y in listed["train"] if y == i) for i, name in enumerate(classes)}
    if sum(counts.values()) == 0:
        raise UserError(f"data folder {str(train_root)!r} holds no readable images ({', '.join(IMAGE_EXTENSIONS)})")
    needed = 1 + ("val" not in listed) + ("test" not in listed)
    for name, count in counts.items():
        if count < needed:
            raise UserError(
                f"class {name!r} has {count} readable training image(s); the train/val/test split needs at "
                f"least {needed} per class"
            )

    rng = np.random.default_rng(seed)
    train = listed["train"]
    origin = "folders" if given else f"stratified, seed {seed}"
    if "test" not in listed:
        train, listed["test"] = _stratified_take(train, test_fraction, rng, len(classes))
    if "val" not in listed:
        # val_fraction is of the whole folder; when test was carved above, rescale to what is left
        share = val_fraction if "test" in given else val_fraction / (1.0 - test_fraction)
        train, listed["val"] = _stratified_take(train, share, rng, len(classes))
        if given:
            origin = f"folders; val carved from train (stratified, seed {seed})"
    listed["train"] = train
    return DatasetListing(root=root, source=source or str(root), classes=classes,
                          splits={s: listed[s] for s in SPLITS}, split_origin=origin, skipped=skipped)


# ---------------------------------------------------------------- preprocessing


def preprocess_spec(image_size: int, mean: tuple[float, ...], std: tuple[float, ...], layout: str = "NCHW") -> dict:
    """The contract between training, export, verification and the apps: how pixels become a tensor."""
    return {
        "color": "RGB",
        "resize": {"height": image_size, "width": image_size, "method": "bilinear", "keep_aspect": False},
        "scale": 1.0 / 255.0,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "layout": layout,
        "dtype": "float32",
    }


def to_array(image: Image.Image, spec: dict) -> np.ndarray:
    """Resize and normalise one RGB image as `spec` says; returns CHW or HWC float32."""
    size = (spec["resize"]["width"], spec["resize"]["height"])
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) * np.float32(spec["scale"])
    pixels = (pixels - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1) if spec["layout"] == "NCHW" else pixels)


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Light augmentation for stage 2: random resized crop (80-100% area), flip, brightness/contrast."""
    width, height = image.size
    area = width * height * rng.uniform(0.8, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = int(min(width, round(np.sqrt(area * ratio))))
    crop_h = int(min(height, round(np.sqrt(area / ratio))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    pixels = np.asarray(image, dtype=np.float32)
    contrast = rng.uniform(0.85, 1.15)
    brightness = rng.uniform(-0.1, 0.1) * 255
    pixels = (pixels - pixels.mean()) * contrast + pixels.mean() + brightness
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# ---------------------------------------------------------------- streaming decode (framework-free)


def decode_records(
    root: Path, records: list[tuple[str, int]], spec: dict, indices: list[int] | np.ndarray,
    augment_seed: int | None = None, epoch: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode, augment and preprocess `records[indices]` into one batch (layout from `spec`).

    Each image is resized once. A file that fails yields zeros and its error text, so one bad file is
    skipped and recorded instead of ending the run; augmentation is keyed by (seed, epoch, index) so it
    does not depend on which process decodes it.
    """
    size = spec["resize"]
    shape = (3, size["height"], size["width"]) if spec["layout"] == "NCHW" else (size["height"], size["width"], 3)
    batch = np.zeros((len(indices), *shape), np.float32)
    labels = np.zeros(len(indices), np.int64)
    errors = []
    for row, index in enumerate(indices):
        rel, label = records[int(index)]
        labels[row] = label
        try:
            image = load_rgb(root / rel)
        except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
            errors.append(f"{type(error).__name__}: {error}"[:200] or "decode failed")
            continue
        if augment_seed is not None:
            image = augment(image, np.random.default_rng([augment_seed, epoch, int(index)]))
        batch[row] = to_array(image, spec)
        errors.append("")
    return batch, labels, errors


def decode_kept(root: Path, records: list[tuple[str, int]], spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """All of `records` decoded without augmentation, files that fail to decode left out (fine-tuning
    already recorded them): the arrays that calibration, QAT and recovery read once and keep."""
    batch, labels, errors = decode_records(root, records, spec, np.arange(len(records)))
    kept = np.array([not error for error in errors], dtype=bool)
    return batch[kept], labels[kept]


_STREAM_STATE: dict = {}


def _stream_init(root: Path, records: list[tuple[str, int]], spec: dict) -> None:
    _STREAM_STATE.update(root=root, records=records, spec=spec)


def _stream_task(task: tuple[np.ndarray, int | None, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    indices, augment_seed, epoch = task
    state = _STREAM_STATE
    return decode_records(state["root"], state["records"], state["spec"], indices, augment_seed, epoch)


class BatchStream:
    """Batches decoded in worker processes, in order, with at most 2 × workers batches in flight.

    For backends without a data loader of their own (keras). Only file names travel to the workers and
    only the batches in flight are held in memory, whatever the size of the folder. Workers are spawned
    (never forked from a process that runs TensorFlow) and live as long as the stream.
    """

    def __init__(self, root: Path, records: list[tuple[str, int]], spec: dict, workers: int) -> None:
        self.root, self.records, self.spec, self.workers = root, records, spec, workers
        self.pool = None
        if workers > 0:
            import multiprocessing

            self.pool = multiprocessing.get_context("spawn").Pool(workers, _stream_init, (root, records, spec))

    def batches(self, index_batches: list[np.ndarray], augment_seed: int | None = None, epoch: int = 0):
        """Yield (indices, x, y, errors) for each list of indices, in the order given."""
        if self.pool is None:
            for indices in index_batches:
                yield (indices, *decode_records(self.root, self.records, self.spec, indices, augment_seed, epoch))
            return
        from collections import deque

        pending: deque = deque()
        queue = iter(index_batches)
        for indices in queue:
            pending.append((indices, self.pool.apply_async(_stream_task, ((indices, augment_seed, epoch),))))
            if len(pending) >= 2 * self.workers:
                break
        while pending:
            indices, result = pending.popleft()
            following = next(queue, None)
            if following is not None:
                pending.append((following, self.pool.apply_async(_stream_task, ((following, augment_seed, epoch),))))
            yield (indices, *result.get())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
