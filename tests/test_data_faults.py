"""Data folders built to mislead or exhaust the listing: symlinks that would give an image two labels, a
folder nested deeper than Python's recursion limit, an image whose pixels would fill the memory, a val/ tree
that lacks a class."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl.data import (
    DecodeError,
    cache_side,
    decode_small,
    load_rgb,
    preprocess_spec,
    render,
    scan_folder,
    to_array,
    too_large,
    upright_size,
)
from edgetl.errors import UserError
from tests.test_data import _tree


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


# ------------------------------------------------------------------------------ symlinks and labels


def _reasons(listing) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in listing.skipped}


def test_a_link_to_the_data_root_inside_a_class_gives_no_image_a_second_label(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"c0": 5, "c1": 5, "c2": 5})
    (root / "c0" / "up").symlink_to("..")
    listing = scan_folder(root)
    listed = _listed(listing)
    assert len(listed) == 15 and all(path.split("/")[0] == label for path, label in listed.items())
    assert listing.counts()["train"] == {"c0": 3, "c1": 3, "c2": 3}
    assert _reasons(listing)["c0/up"].startswith("symlink leaves its class folder")


def test_links_to_files_of_another_class_or_outside_the_data_are_skipped(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", {"c0": 5, "c1": 5})
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere.png")
    (root / "c0" / "theirs.png").symlink_to(root / "c1" / "000.png")
    (root / "c0" / "outside.png").symlink_to(tmp_path / "elsewhere.png")
    (root / "c1" / "sub").symlink_to(tmp_path)  # a folder above the data root
    listing = scan_folder(root)
    assert set(_listed(listing)) == {f"c{c}/{i:03d}.png" for c in (0, 1) for i in range(5)}
    reasons = _reasons(listing)
    for link in ("c0/theirs.png", "c0/outside.png", "c1/sub"):
        assert reasons[link].startswith("symlink leaves its class folder"), link
    assert set(reasons) == {"c0/theirs.png", "c0/outside.png", "c1/sub"}


def test_a_file_reached_twice_in_its_class_is_listed_once_at_its_own_place(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"cat": 5, "dog": 5})
    (root / "dog" / "also.png").symlink_to("004.png")
    (root / "dog" / "alias").symlink_to("sub")  # sorts before the folder it reaches
    (root / "dog" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "dog" / "sub" / "x.png")
    (root / "dog" / "sub" / "back").symlink_to("..")  # a loop, inside the class
    (root / "cat" / ".store").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cat" / ".store" / "kept.png")
    (root / "cat" / "kept.png").symlink_to(".store/kept.png")  # reaches a file once: taken
    os.link(root / "cat" / "000.png", root / "cat" / "hard.png")
    listing = scan_folder(root)
    listed = _listed(listing)
    assert "dog/sub/x.png" in listed and "cat/kept.png" in listed and "cat/000.png" in listed
    assert len(listed) == 12
    reasons = _reasons(listing)
    assert reasons["dog/also.png"].startswith("the same file as 'dog/004.png'")
    assert reasons["dog/alias"].startswith("symlink to the folder 'dog/sub', already listed")
    assert reasons["dog/sub/back"].startswith("symlink loop")
    assert reasons["cat/hard.png"].startswith("the same file as 'cat/000.png'")


def test_a_hard_link_in_two_classes_is_skipped_in_both(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"c0": 5, "c1": 5})
    os.link(root / "c0" / "000.png", root / "c1" / "same.png")
    listing = scan_folder(root)
    assert "c0/000.png" not in _listed(listing) and "c1/same.png" not in _listed(listing)
    reasons = _reasons(listing)
    for path in ("c0/000.png", "c1/same.png"):
        assert "cannot carry two labels" in reasons[path]


@pytest.mark.parametrize(("link", "target", "needle"), [
    ("c3", "c1", "class folder 'c3' is a symlink to class folder 'c1'"),
    ("c3", "c1/sub", "class folder 'c3' is a symlink into class folder 'c1'"),
    ("all", ".", "class folder 'all' is a symlink to a folder that holds class folder 'c0'"),
])
def test_a_class_folder_that_is_a_symlink_to_another_class_is_refused(
    tmp_path: Path, link: str, target: str, needle: str
) -> None:
    root = _tree(tmp_path, {"c0": 5, "c1": 5, "c1/sub": 3})
    (root / link).symlink_to(target)
    with pytest.raises(UserError) as caught:
        scan_folder(root)
    message = str(caught.value)
    assert needle in message and "two labels" in message and "\n" not in message


def test_a_class_folder_that_is_a_symlink_elsewhere_is_a_class(tmp_path: Path) -> None:
    _tree(tmp_path / "photos", {"birds": 5})
    root = _tree(tmp_path / "data", {"c0": 5})
    (root / "birds").symlink_to(tmp_path / "photos" / "birds")
    listing = scan_folder(root)
    assert listing.classes == ["birds", "c0"] and len(_listed(listing)) == 10 and not listing.skipped


def test_train_val_test_trees_take_the_same_rule(tmp_path: Path) -> None:
    _tree(tmp_path / "train", {"a": 6, "b": 6})
    _tree(tmp_path / "val", {"a": 3, "b": 3})
    (tmp_path / "val" / "a" / "leak.png").symlink_to("../../train/a/000.png")
    os.link(tmp_path / "train" / "b" / "000.png", tmp_path / "val" / "b" / "hard.png")
    (tmp_path / "val" / "b" / "up").symlink_to("../../train")
    listing = scan_folder(tmp_path)
    assert len(listing.splits["val"]) == 6 and all(p.startswith("val/") for p, _ in listing.splits["val"])
    reasons = _reasons(listing)
    assert reasons["val/a/leak.png"].startswith("symlink leaves its class folder")
    assert reasons["val/b/hard.png"].startswith("the same file as 'train/b/000.png'")
    assert reasons["val/b/up"].startswith("symlink leaves its class folder")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "a").symlink_to("../train/a")
    with pytest.raises(UserError, match="class folder 'test/a' is a symlink to class folder 'train/a'.*two splits"):
        scan_folder(tmp_path)


# ------------------------------------------------------------------------------ a split that lacks a class


def test_a_val_or_test_tree_that_lacks_a_class_is_warned_about_and_recorded(tmp_path: Path, capsys) -> None:
    _tree(tmp_path / "train", {"a": 6, "b": 6, "c": 6})
    _tree(tmp_path / "val", {"a": 2, "b": 2})  # no c/ at all
    _tree(tmp_path / "test", {"a": 2, "b": 2, "c": 0})  # c/ there but empty
    listing = scan_folder(tmp_path)
    assert listing.classes == ["a", "b", "c"]
    assert listing.counts()["val"]["c"] == 0 and listing.counts()["test"]["c"] == 0
    assert len(listing.warnings) == 2
    assert listing.warnings[0].startswith("val/ has no image of class 'c'")
    assert listing.warnings[1].startswith("test/ has no image of class 'c'")
    err = capsys.readouterr().err
    assert "warning: val/ has no image of class 'c'" in err and "warning: test/ has no image of class 'c'" in err
    _tree(tmp_path / "val", {"c": 2})
    _tree(tmp_path / "test", {"c": 2})
    assert scan_folder(tmp_path).warnings == []


# ------------------------------------------------------------------------------ images too large to decode


def _flat_png(path: Path, width: int, height: int, rgb: tuple[int, int, int]) -> Path:
    """A single-colour RGB PNG of any size, written row by row: tiny on disk and in this process's memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + bytes(rgb) * width  # filter type 0, then the pixels
    packer = zlib.compressobj(1)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


# run in a child process, so its peak memory is its own: list the folder, decode every image once as a run does
_LIST_AND_DECODE = """
import json, resource, sys
from pathlib import Path
from edgetl.data import cache_side, scan_folder
from edgetl.imagecache import open_cache
root = Path(sys.argv[1])
listing = scan_folder(root)
rels = sorted({p for records in listing.splits.values() for p, _ in records})
with open_cache(root, rels, cache_side(32), root.parent) as cache:
    failed = cache.failures()
    pixels = {rel: cache.get(rel)[0].mean(axis=(0, 1)).tolist() for rel in rels if rel not in failed}
try:  # this program's own peak: ru_maxrss keeps the parent's size from before exec
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mb": peak / 1024, "listed": rels,
                  "skipped": listing.skipped, "failed": failed, "pixels": pixels}))
"""


def _list_and_decode(root: Path) -> dict:
    env = {**os.environ, "EDGETL_CACHE_MEMORY_MAX": str(1 << 30)}
    done = subprocess.run([sys.executable, "-c", _LIST_AND_DECODE, str(root)], capture_output=True, text=True,
                          env=env, timeout=300, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_an_11000_pixel_square_png_does_not_take_gigabytes(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", {"a": 5, "b": 5})
    _flat_png(root / "a" / "huge.png", 11000, 11000, (200, 10, 10))  # 121 MP: 363 MB decoded, once
    assert (root / "a" / "huge.png").stat().st_size < 2 << 20
    result = _list_and_decode(root)
    # a decode of the whole image alone takes 363 MB; the run without it about 60
    assert result["peak_mb"] < 250, result["peak_mb"]
    skipped = {entry["path"]: entry["reason"] for entry in result["skipped"]}
    assert "a/huge.png" not in result["listed"]
    assert skipped["a/huge.png"].startswith("too large: 11000x11000 pixels (121 MP) over the 64 MP")


def test_a_large_png_under_the_limit_is_decoded_reduced(tmp_path: Path) -> None:
    root = _tree(tmp_path / "data", {"a": 5, "b": 5})
    _flat_png(root / "b" / "large.png", 7000, 7000, (10, 200, 30))  # 49 MP: 147 MB decoded
    result = _list_and_decode(root)
    # one full-size copy and a small one: three full-size copies (load, convert, transpose) took 500 MB
    assert result["peak_mb"] < 300, result["peak_mb"]
    assert "b/large.png" in result["listed"] and not result["failed"]
    assert result["pixels"]["b/large.png"] == [10.0, 200.0, 30.0]


def test_a_reduced_decode_matches_the_full_one_upright_and_composited(tmp_path: Path) -> None:
    spec = preprocess_spec(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    gradient = np.add.outer(np.arange(600), np.arange(1200)) % 256  # 1200 x 600, wider than tall
    picture = Image.fromarray(np.stack([gradient, gradient[::-1], 255 - gradient], -1).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: taller than wide
    picture.save(tmp_path / "turned.png", exif=exif)
    palette = picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(tmp_path / "keyed.png", transparency=0)
    for name in ("turned.png", "keyed.png"):
        full = load_rgb(tmp_path / name)
        pixels, source = decode_small(tmp_path / name, cache_side(64))  # 1200 // 74 and 600 // 74: reduced 8 times
        assert source == (full.width // 8, full.height // 8), name
        assert np.abs(render(pixels, source, spec) - to_array(full, spec)).mean() < 0.05, name
    assert load_rgb(tmp_path / "turned.png").size == upright_size(tmp_path / "turned.png") == (600, 1200)


def test_an_image_over_the_limit_is_refused_before_its_pixels_are_decoded(tmp_path: Path) -> None:
    path = _flat_png(tmp_path / "huge.png", 11000, 11000, (1, 2, 3))
    with pytest.raises(DecodeError, match="too large: 11000x11000 pixels"):
        decode_small(path, cache_side(224))
    # a JPEG decodes at its draft scale: counted there
    assert too_large(16320, 12240, 8) is None and too_large(16320, 12240) is not None
    assert too_large(4032, 3024) is None and too_large(8160, 6120) is None
