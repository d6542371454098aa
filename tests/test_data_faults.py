"""Data folders built to mislead or exhaust the listing: symlinks that would give an image two labels, a
folder nested deeper than Python's recursion limit, an image whose pixels would fill the memory, a val/ tree
that lacks a class."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from edgetl.data import scan_folder


def _tree(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / name / f"{i:03d}.png")
    return root


def _listed(listing) -> dict[str, str]:
    """Every listed file with its label, over all splits."""
    return {p: listing.classes[y] for records in listing.splits.values() for p, y in records}


# ------------------------------------------------------------------------------ deep folders


def _remove_chain(top: str, depth: int) -> None:
    """Remove a chain of folders named "d" below `top`, deepest first: shutil.rmtree recurses once per level."""
    chain = os.path.join(top, *["d"] * depth)
    for name in os.listdir(chain):
        os.remove(os.path.join(chain, name))
    for _ in range(depth):
        os.rmdir(chain)
        chain = os.path.dirname(chain)


def test_a_folder_nested_1500_levels_deep_is_listed_without_recursion() -> None:
    # outside pytest's tmp_path, whose clean-up (shutil.rmtree) cannot remove 1500 levels
    root = _tree(Path(tempfile.mkdtemp(prefix="edgetl-deep-")), {"cat": 5, "dog": 5})
    deep = str(root / "dog")
    try:
        for _ in range(1500):  # level by level: os.makedirs recurses once per missing level too
            deep = os.path.join(deep, "d")
            os.mkdir(deep)
        Image.new("RGB", (8, 8)).save(os.path.join(deep, "bottom.png"))
        listing = scan_folder(root)
    finally:
        _remove_chain(str(root / "dog"), deep.count(os.sep) - str(root / "dog").count(os.sep))
        shutil.rmtree(root)
    listed = _listed(listing)
    bottom = "dog/" + "d/" * 1500 + "bottom.png"
    assert listed[bottom] == "dog" and len(listed) == 11
    assert not listing.skipped
