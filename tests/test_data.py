"""Data listing, decoding of every supported format, splits and the built-in data sets."""

from __future__ import annotations

import io
import os
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


# ---------------------------------------------------------------- every Pillow mode to its true 8-bit value


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _mode_files(folder: Path) -> dict[str, tuple[Path, float]]:
    """One file per high-depth or alpha mode, and the mean its pixels have on an 8-bit screen."""
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    ramp16 = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16) // 2  # 0..32767: mean 63.75 / 8-bit
    true16 = float(np.mean(ramp16 / 257.0))
    files: dict[str, tuple[Path, float]] = {}
    little = Image.frombytes("I;16", (64, 48), ramp16.astype("<u2").tobytes())
    files["I;16 png"] = (_save(little, folder / "gray16.png"), true16)
    files["I;16 tiff"] = (_save(little, folder / "gray16.tif"), true16)
    big = Image.frombytes("I;16B", (64, 48), ramp16.astype(">u2").tobytes())
    files["I;16B tiff"] = (_save(big, folder / "gray16b.tif"), true16)
    u32 = (ramp16.astype(np.uint64) * 65537 * 2).astype(np.uint32)  # the same picture at 32 bits per sample
    tifffile.imwrite(folder / "gray32u.tif", u32)
    files["I uint32 tiff"] = (folder / "gray32u.tif", float(np.mean(u32 / (2**32 - 1) * 255)))
    half = u32 // 2  # the lower half of the range: a wrong signedness would move its mean by 127.5
    tifffile.imwrite(folder / "gray32s.tif", (half.astype(np.int64) - 2**31).astype(np.int32))
    files["I int32 tiff"] = (folder / "gray32s.tif", float(np.mean(half / (2**32 - 1) * 255)))
    unit = (ramp16 / 65535.0).astype(np.float32)
    tifffile.imwrite(folder / "float01.tif", unit)
    files["F [0,1] tiff"] = (folder / "float01.tif", float(np.mean(unit * 255)))
    tifffile.imwrite(folder / "float255.tif", (unit * 400).astype(np.float32))  # beyond 1: 0-255 values, clipped
    files["F 0-255 tiff"] = (folder / "float255.tif", float(np.mean(np.clip(unit * 400, 0, 255))))
    gray = Image.new("L", (64, 48), 100)
    half = Image.new("L", (64, 48), 128)
    files["LA"] = (_save(Image.merge("LA", (gray, half)), folder / "la.png"), 100 * 128 / 255 + 255 * 127 / 255)
    palette = Image.new("P", (64, 48), 1)
    palette.putpalette([0, 0, 0, 100, 100, 100] + [0] * 762)
    files["PA"] = (_save(Image.merge("PA", (palette, half)).convert("RGBA"), folder / "pa.png"),
                   100 * 128 / 255 + 255 * 127 / 255)
    keyed = Image.new("P", (64, 48), 1)
    keyed.putpalette([0, 0, 0, 100, 100, 100] + [0] * 762)
    keyed.paste(0, (0, 0, 32, 48))  # left half index 0, the transparent one
    files["P transparency"] = (_save(keyed, folder / "keyed.png", transparency=0), (255 + 100) / 2)
    files["1"] = (_save(Image.new("1", (64, 48), 1), folder / "bw.png"), 255.0)
    files["CMYK tiff"] = (_save(Image.new("RGB", (64, 48), (100, 100, 100)).convert("CMYK"), folder / "cmyk.tif"),
                          100.0)
    return files


def test_high_depth_and_alpha_modes_decode_to_their_true_8bit_values(tmp_path: Path) -> None:
    """16-bit PNG/TIFF (I;16, I;16B), 32-bit int TIFF (unsigned, signed), float TIFF, LA, PA, P with a
    transparent index, 1 and CMYK: Pillow's convert("RGB") clips the first ones to 0/255."""
    for name, (path, true_mean) in _mode_files(tmp_path).items():
        image = load_rgb(path)
        assert image.mode == "RGB" and image.size == (64, 48), name
        pixels = np.asarray(image, dtype=np.float64)
        assert abs(pixels.mean() - true_mean) < 1.0, (name, pixels.mean(), true_mean)
        assert np.allclose(pixels[..., 0], pixels[..., 1]), name  # gray stays gray


def test_a_16bit_png_is_not_clipped_to_black_and_white(tmp_path: Path) -> None:
    """The reported case: a 16-bit grayscale PNG whose true 8-bit mean is 81.5 decoded to only 0 and 255."""
    values = np.tile(np.array([0, 163 * 257], dtype=np.uint16), (32, 16))  # 8-bit 0 and 163: mean 81.5
    path = _save(Image.frombytes("I;16", (32, 32), values.astype("<u2").tobytes()), tmp_path / "scan.png")
    pixels = np.asarray(load_rgb(path), dtype=np.float64)
    assert pixels.mean() == pytest.approx(81.5, abs=0.01) and set(np.unique(pixels)) == {0.0, 163.0}


# ---------------------------------------------------------------- what a listing takes, ignores and skips


def test_hidden_files_and_folders_at_any_depth_are_ignored_and_listed(tmp_path: Path) -> None:
    _tree(tmp_path, {"cat": 5, "dog": 5, "cat/.ipynb_checkpoints": 3, "dog/sub/.cache": 2, ".git/objects": 2})
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "._resource_fork.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "sub" / "deep.png")
    listing = scan_folder(tmp_path)
    listed = {p for records in listing.splits.values() for p, _ in records}
    assert listing.classes == ["cat", "dog"] and len(listed) == 11 and "dog/sub/deep.png" in listed
    assert not any("/." in p or p.startswith(".") for p in listed)
    ignored = {entry["path"]: entry["reason"] for entry in listing.ignored}
    assert ignored == {".git": "hidden folder", "cat/.ipynb_checkpoints": "hidden folder",
                       "cat/._resource_fork.png": "hidden file", "dog/sub/.cache": "hidden folder"}


def test_an_empty_class_folder_is_not_a_class_and_is_listed(tmp_path: Path) -> None:
    _tree(tmp_path, {"cat": 5, "dog": 5})
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    (tmp_path / "labels.csv").write_text("stray file beside the class folders")
    listing = scan_folder(tmp_path)
    assert listing.classes == ["cat", "dog"]
    reasons = {entry["path"]: entry["reason"] for entry in listing.ignored}
    assert reasons["empty"].startswith("empty class folder") and reasons["notes"].startswith("empty class folder")
    assert reasons["labels.csv"] == "not inside a class folder"
    _tree(tmp_path, {"bird": 1})  # some images but too few for the split: still an error, before training
    with pytest.raises(UserError, match="'bird' has 1 readable"):
        scan_folder(tmp_path)


def test_dangling_and_looping_symlinks_are_skipped_with_the_reason(tmp_path: Path) -> None:
    _tree(tmp_path, {"cat": 5, "dog": 5})
    (tmp_path / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "cat" / "self.png").symlink_to(tmp_path / "cat" / "self.png")
    (tmp_path / "dog" / "loop").symlink_to(tmp_path / "dog")
    (tmp_path / "dog" / ".originals").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / ".originals" / "kept.png")
    (tmp_path / "dog" / "kept.png").symlink_to(tmp_path / "dog" / ".originals" / "kept.png")  # a good link
    (tmp_path / "dog" / "also.png").symlink_to(tmp_path / "dog" / "000.png")  # the same file twice: listed once
    listing = scan_folder(tmp_path)
    reasons = {entry["path"]: entry["reason"] for entry in listing.skipped}
    assert reasons["cat/gone.png"].startswith("dangling symlink") and "nowhere.png" in reasons["cat/gone.png"]
    assert reasons["cat/self.png"].startswith("symlink loop")
    assert reasons["dog/loop"].startswith("symlink loop")
    assert reasons["dog/also.png"].startswith("the same file as 'dog/000.png'")
    listed = {p for records in listing.splits.values() for p, _ in records}
    assert "dog/kept.png" in listed and "dog/000.png" in listed and len(listed) == 11


@pytest.mark.parametrize(
    ("name", "needle"),
    [("a\nb", "control character"), ("tab\there", "control character"), ("back\\slash", "path separator"),
     (b"caf\xe9".decode("utf-8", "surrogateescape"), "not valid UTF-8"), ("   ", "only spaces"),
     ("bell\x07", "control character"), ("line\u2028sep", "control character")],
)
def test_a_class_folder_name_that_cannot_be_a_label_is_refused_before_training(
    tmp_path: Path, name: str, needle: str
) -> None:
    _tree(tmp_path, {"cat": 5})
    folder = tmp_path / name  # a non-UTF-8 name arrives as surrogate escapes, as os.listdir gives it
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "x.png")
    assert os.fsencode(name) in os.listdir(os.fsencode(tmp_path))
    with pytest.raises(UserError, match=needle) as caught:
        scan_folder(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "rename that folder" in message
    message.encode("utf-8")  # printable in one line, even for non-UTF-8 bytes
