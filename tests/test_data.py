"""Data listing, decoding of every supported format, splits and the built-in data sets."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl.data import augment, load_rgb, preprocess_spec, scan_folder, to_array
from edgetl.datasets import PACKAGE_DIR, resolve_builtin
from edgetl.errors import UserError


def _make_formats(folder: Path) -> dict[str, Path]:
    """One file per supported format and colour mode, each with a known dominant colour."""
    folder.mkdir(parents=True, exist_ok=True)
    red = Image.new("RGB", (24, 16), (200, 30, 30))
    paths = {}
    for ext, fmt in (("jpg", "JPEG"), ("jpeg", "JPEG"), ("png", "PNG"), ("bmp", "BMP"), ("tiff", "TIFF"),
                     ("webp", "WEBP")):
        paths[ext] = folder / f"red.{ext}"
        red.save(paths[ext], fmt)
    paths["gray"] = folder / "gray.png"
    Image.new("L", (24, 16), 128).save(paths["gray"])
    paths["palette"] = folder / "palette.png"
    red.convert("P", palette=Image.Palette.ADAPTIVE).save(paths["palette"])
    paths["rgba"] = folder / "rgba.png"
    Image.new("RGBA", (24, 16), (200, 30, 30, 0)).save(paths["rgba"])  # fully transparent → white
    paths["cmyk"] = folder / "cmyk.jpg"
    red.convert("CMYK").save(paths["cmyk"], "JPEG")
    frames = [Image.new("P", (24, 16), 0), Image.new("P", (24, 16), 1)]
    for frame, colour in zip(frames, ((200, 30, 30), (30, 30, 200)), strict=True):
        frame.putpalette([*colour, *colour] + [0] * 762)
    paths["gif"] = folder / "anim.gif"
    frames[0].save(paths["gif"], save_all=True, append_images=frames[1:], duration=100, loop=0)
    return paths


def test_every_format_and_mode_decodes_to_rgb(tmp_path: Path) -> None:
    paths = _make_formats(tmp_path)
    for name, path in paths.items():
        image = load_rgb(path)
        assert image.mode == "RGB", name
        assert image.size == (24, 16), name
        r, g, b = np.asarray(image, dtype=float).reshape(-1, 3).mean(0)
        if name == "gray":
            assert abs(r - 128) < 2 and abs(g - 128) < 2
        elif name == "rgba":
            assert min(r, g, b) > 250  # transparent pixels composited on white
        else:
            assert r > 150 and g < 90 and b < 90, (name, r, g, b)  # gif: first frame (red), not the blue one


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    upright = load_rgb(path)
    assert upright.size == (20, 40)
    pixels = np.asarray(upright, dtype=float)
    assert pixels[:20].mean() > 200 and pixels[20:].mean() < 50  # white half now on top


def test_unreadable_and_truncated_files_are_skipped_not_fatal(tmp_path: Path) -> None:
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(6):
            Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(folder / f"{i}.png")
    (tmp_path / "a" / "garbage.jpg").write_bytes(b"this is not an image")
    (tmp_path / "b" / "notes.txt").write_text("readme")
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "JPEG")
    (tmp_path / "b" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    listing = scan_folder(tmp_path, seed=0)
    skipped = {entry["path"] for entry in listing.skipped}
    assert {"a/garbage.jpg", "b/notes.txt"} <= skipped
    with pytest.raises(OSError):
        load_rgb(tmp_path / "b" / "truncated.jpg")  # caught at decode time by the trainer and skipped
    listed = {p for records in listing.splits.values() for p, _ in records}
    assert "a/garbage.jpg" not in listed and len(listed) == 13


def _tree(root: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / name / f"{i:03d}.png")
    return root


def test_split_is_stratified_deterministic_and_seeded(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"zebra": 50, "ant": 30, "moth": 20})
    first = scan_folder(root, seed=3)
    again = scan_folder(root, seed=3)
    other = scan_folder(root, seed=4)
    assert first.classes == ["ant", "moth", "zebra"]  # sorted folder names
    assert first.splits == again.splits
    assert first.splits["test"] != other.splits["test"]
    counts = first.counts()
    assert counts["test"] == {"ant": 3, "moth": 2, "zebra": 5}
    assert counts["val"] == {"ant": 3, "moth": 2, "zebra": 5}
    assert sum(counts["train"].values()) == 80
    all_files = [p for split in first.splits.values() for p, _ in split]
    assert len(all_files) == len(set(all_files)) == 100


def test_given_train_val_test_trees_are_respected(tmp_path: Path) -> None:
    _tree(tmp_path / "train", {"a": 10, "b": 10})
    _tree(tmp_path / "test", {"a": 4, "b": 4})
    listing = scan_folder(tmp_path, seed=0)
    assert all(p.startswith("test/") for p, _ in listing.splits["test"])
    assert len(listing.splits["test"]) == 8
    assert all(p.startswith("train/") for p, _ in listing.splits["val"])  # val carved from train
    assert len(listing.splits["val"]) == 2
    _tree(tmp_path / "val", {"a": 3, "b": 3})
    listing = scan_folder(tmp_path, seed=0)
    assert len(listing.splits["val"]) == 6 and len(listing.splits["train"]) == 20
    _tree(tmp_path / "test", {"c": 1})
    with pytest.raises(UserError, match="not in train"):
        scan_folder(tmp_path)


def test_preprocessing_follows_the_spec() -> None:
    image = Image.new("RGB", (10, 30), (255, 0, 127))
    spec = preprocess_spec(16, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5), layout="NCHW")
    chw = to_array(image, spec)
    assert chw.shape == (3, 16, 16) and chw.dtype == np.float32
    np.testing.assert_allclose(chw[:, 0, 0], [1.0, -2.0, (127 / 255 - 0.5) / 0.5], atol=1e-5)
    hwc = to_array(image, {**spec, "layout": "NHWC"})
    np.testing.assert_allclose(hwc, chw.transpose(1, 2, 0))


def test_augment_is_keyed_by_the_rng() -> None:
    image = Image.effect_noise((32, 32), 60).convert("RGB")
    one = np.asarray(augment(image, np.random.default_rng([0, 1, 5])))
    two = np.asarray(augment(image, np.random.default_rng([0, 1, 5])))
    three = np.asarray(augment(image, np.random.default_rng([0, 2, 5])))
    assert np.array_equal(one, two) and not np.array_equal(one, three)


def test_fashion_mnist_mini_is_real_balanced_and_documented() -> None:
    archive = PACKAGE_DIR / "fashion_mnist_mini.npz"
    assert archive.stat().st_size < 3_000_000
    assert "MIT" in (PACKAGE_DIR / "LICENSE.fashion-mnist").read_text()
    assert "dataset-fashion-mnist" in (PACKAGE_DIR / "PROVENANCE.md").read_text()
    root = resolve_builtin("builtin:fashion-mnist-mini")
    listing = scan_folder(root, seed=0)
    assert len(listing.classes) == 10 and "ankle_boot" in listing.classes
    counts = listing.counts()
    assert set(counts["test"].values()) == {100}
    assert {a + b for a, b in zip(counts["train"].values(), counts["val"].values(), strict=True)} == {300}
    sample = load_rgb(root / listing.splits["test"][0][0])
    assert sample.size == (28, 28)
    assert resolve_builtin("builtin:fashion-mnist-mini") == root  # written once, then reused


def test_shapes_builtin_is_generated_deterministically() -> None:
    root = resolve_builtin("builtin:shapes")
    listing = scan_folder(root, seed=0)
    assert listing.classes == ["circle", "square", "triangle"]
    assert sum(len(v) for v in listing.splits.values()) == 120


def test_decode_kept_leaves_out_files_that_fail_and_keeps_labels_aligned(tmp_path: Path) -> None:
    from edgetl.data import decode_kept, preprocess_spec

    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    Image.new("L", (8, 8), 0).save(tmp_path / "c.png")
    spec = preprocess_spec(16, [0.5] * 3, [0.5] * 3, layout="NHWC")
    x, y = decode_kept(tmp_path, [("a.png", 3), ("broken.png", 1), ("c.png", 2)], spec)
    assert x.shape == (2, 16, 16, 3) and x.dtype == np.float32 and y.tolist() == [3, 2]
    assert np.allclose(x[0, ..., 0], 1.0) and np.allclose(x[1], -1.0)  # red → +1 in R; black → -1
