"""Built-in data sets (`--data builtin:NAME`), written out once as ImageFolder trees in the cache.

Writing real PNG files (instead of feeding arrays) means the built-ins go through exactly the same
listing, decoding and preprocessing path as a user's folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from edgetl.errors import UserError, one_of
from edgetl.paths import atomic_dir, cache_dir

PACKAGE_DIR = Path(__file__).resolve().parent
PREFIX = "builtin:"


def _write_fashion_mnist_mini(target: Path) -> None:
    with np.load(PACKAGE_DIR / "fashion_mnist_mini.npz") as archive:
        classes = [str(c) for c in archive["classes"]]
        for split in ("train", "test"):
            images, labels, origin = (archive[f"{split}_{k}"] for k in ("images", "labels", "source_index"))
            for image, label, index in zip(images, labels, origin, strict=True):
                folder = target / split / classes[int(label)]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image, mode="L").save(folder / f"{split}-{int(index):05d}.png")


SHAPES = ("circle", "square", "triangle")


def _write_shapes(target: Path, per_class: int = 40, size: int = 48, seed: int = 0) -> None:
    """A tiny synthetic 3-class set: one coloured shape on a noisy background. Learnable in seconds."""
    rng = np.random.default_rng(seed)
    for name in SHAPES:
        (target / name).mkdir(parents=True)
    for index in range(per_class * len(SHAPES)):
        name = SHAPES[index % len(SHAPES)]
        background = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(background)
        draw = ImageDraw.Draw(image)
        radius = int(rng.integers(size // 6, size // 3))
        cx, cy = (int(v) for v in rng.integers(radius, size - radius, 2))
        colour = tuple(int(v) for v in rng.integers(120, 256, 3))
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if name == "circle":
            draw.ellipse(box, fill=colour)
        elif name == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
        image.save(target / name / f"{index:04d}.png")


BUILTINS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "fashion-mnist-mini": ("v1", _write_fashion_mnist_mini),
    "shapes": ("v1", _write_shapes),
}


def is_builtin(spec: str) -> bool:
    return spec.startswith(PREFIX)


def resolve_builtin(spec: str) -> Path:
    """Folder of a built-in data set, written to the cache on first use (atomically)."""
    name = spec[len(PREFIX):]
    if name not in BUILTINS:
        raise UserError(one_of(spec, [PREFIX + n for n in BUILTINS], "built-in data set"))
    version, writer = BUILTINS[name]
    folder = cache_dir() / "datasets" / f"{name}-{version}"
    if not folder.is_dir():
        with atomic_dir(folder, record=False) as tmp:
            writer(tmp)
    return folder
