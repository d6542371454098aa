"""Build edgetl/datasets/fashion_mnist_mini.npz from Debian's `dataset-fashion-mnist` package.

    apt-get install dataset-fashion-mnist && python scripts/make_fashion_mnist_mini.py

A balanced, seeded subset of the real Fashion-MNIST: TRAIN_PER_CLASS images per class from its training
set and TEST_PER_CLASS from its test set, stored as uint8 arrays (the package ships them; built-in data
needs no network). Re-running it reproduces the file byte for byte.
"""

from __future__ import annotations

import argparse
import gzip
import io
from pathlib import Path

import numpy as np

SOURCE = Path("/usr/share/datasets/fashion-mnist")
TARGET = Path(__file__).resolve().parents[1] / "edgetl" / "datasets" / "fashion_mnist_mini.npz"
CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 100
SEED = 20261125


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format: big-endian dims, then uint8 data)."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    picks = [np.sort(rng.choice(np.flatnonzero(labels == c), per_class, replace=False)) for c in range(len(CLASSES))]
    return np.concatenate(picks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=TARGET)
    args = parser.parse_args()
    rng = np.random.default_rng(SEED)
    arrays: dict[str, np.ndarray] = {"classes": np.array(CLASSES)}
    for split, prefix, per_class in (("train", "train", TRAIN_PER_CLASS), ("test", "t10k", TEST_PER_CLASS)):
        images = read_idx(args.source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{prefix}-labels-idx1-ubyte.gz")
        index = balanced_subset(labels, per_class, rng)
        arrays[f"{split}_images"] = images[index]
        arrays[f"{split}_labels"] = labels[index].astype(np.uint8)
        arrays[f"{split}_source_index"] = index.astype(np.int32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    args.out.write_bytes(buffer.getvalue())
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
