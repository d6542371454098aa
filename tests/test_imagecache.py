"""The run's image cache: each image decoded once (JPEG draft for phone photos), kept a little above the input
size, in memory or in a mapped file that goes away with the run, and read the same way by every stage."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetl import data, imagecache
from edgetl.data import DecodeError, augment, cache_side, decode_small, model_input, preprocess_spec, render, to_array
from edgetl.errors import UserError
from edgetl.imagecache import open_cache


def phone_photo(path: Path, width: int = 4032, height: int = 3024, seed: int = 0, orientation: int | None = None
                ) -> Path:
    """A phone-size JPEG (quality 90) with real image structure: a sample photo scaled up, tinted per seed."""
    from skimage import data as samples

    rng = np.random.default_rng(seed)
    picture = Image.fromarray(samples.chelsea()).resize((width, height), Image.Resampling.BILINEAR)
    tint = np.clip(np.asarray(picture, np.float32) * rng.uniform(0.7, 1.2, 3), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(tint).save(path, quality=90, exif=exif.tobytes())
    return path


def small_folder(root: Path, count: int = 6, size: tuple[int, int] = (40, 30)) -> list[str]:
    rng = np.random.default_rng(1)
    rels = []
    for i in range(count):
        rel = f"c{i % 2}/{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / rel)
        rels.append(rel)
    return rels


def test_phone_photo_is_decoded_at_draft_scale_and_kept_small(tmp_path: Path) -> None:
    path = phone_photo(tmp_path / "a" / "photo.jpg")
    side = cache_side(128)
    assert side == 148
    started = time.perf_counter()
    pixels, source = decode_small(path, side)
    draft_seconds = time.perf_counter() - started
    assert pixels.shape == (148, 148, 3) and pixels.dtype == np.uint8
    assert source == (504, 378)  # 1/8 DCT scale: still at least 148 on both sides, the proportions of 4:3
    started = time.perf_counter()
    full = data.load_rgb(path)
    full_seconds = time.perf_counter() - started
    assert draft_seconds < full_seconds  # a 12-megapixel decode against a 0.2-megapixel one
    # the model input from the kept pixels is the full-resolution one up to resampling
    spec = preprocess_spec(128, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    direct = to_array(full, spec)
    kept = render(pixels, source, spec)
    assert np.abs(kept - direct).mean() < 0.02  # in normalised units: under 0.3 of a grey level per pixel


def test_small_images_are_kept_as_they_are(tmp_path: Path) -> None:
    rels = small_folder(tmp_path)
    spec = preprocess_spec(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with open_cache(tmp_path, rels, cache_side(64), tmp_path) as cache:
        assert cache.record["where"] == "memory"
        assert cache.record["bytes"] == len(rels) * 40 * 30 * 3  # a 40 × 30 image keeps its 3.6 kB
        pixels, source = cache.get(rels[0])
        assert pixels.shape == (30, 40, 3) and source == (40, 30)
        np.testing.assert_array_equal(pixels, np.asarray(data.load_rgb(tmp_path / rels[0])))
        # without augmentation the input equals today's full decode + resize, bit for bit
        np.testing.assert_array_equal(model_input(tmp_path, rels[0], spec, images=cache),
                                      to_array(data.load_rgb(tmp_path / rels[0]), spec))


def test_exif_rotated_photo_is_planned_upright(tmp_path: Path) -> None:
    path = phone_photo(tmp_path / "a" / "turned.jpg", 800, 600, orientation=6)
    assert data.upright_size(path) == (600, 800)
    with open_cache(tmp_path, ["a/turned.jpg"], 300, tmp_path) as cache:
        pixels, source = cache.get("a/turned.jpg")
    assert pixels.shape == (300, 300, 3) and source[1] > source[0]  # upright: taller than wide


def test_augmentation_from_kept_pixels_follows_the_full_image(tmp_path: Path) -> None:
    """The crop is drawn in the decoded proportions, so it covers the same part of the picture as on the full
    image, even though the kept pixels are squeezed to at most `side` on each side."""
    path = phone_photo(tmp_path / "a" / "wide.jpg", 900, 300)
    spec = preprocess_spec(96, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    pixels, source = decode_small(path, cache_side(96))
    assert pixels.shape == (111, 111, 3) and source == (450, 150)  # drafted at 1/2: 150 ≥ 111
    full = data.load_rgb(path)
    for seed in range(4):
        cached = render(pixels, source, spec, np.random.default_rng([seed, 1, 2]))
        reference = to_array(augment(full, np.random.default_rng([seed, 1, 2])), spec)
        assert np.abs(cached - reference).mean() < 0.06, seed
    again = render(pixels, source, spec, np.random.default_rng([0, 1, 2]))
    np.testing.assert_array_equal(again, render(pixels, source, spec, np.random.default_rng([0, 1, 2])))


def test_a_large_cache_is_a_mapped_file_removed_with_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    rels = small_folder(tmp_path / "data")
    with open_cache(tmp_path / "data", rels, 64, tmp_path / "unused") as expected:
        assert expected.record["where"] == "memory"
        in_memory = {rel: expected.get(rel)[0].copy() for rel in rels}
    monkeypatch.setenv(imagecache.MEMORY_LIMIT_ENV, "0")
    (tmp_path / "run").mkdir()
    with open_cache(tmp_path / "data", rels, 64, tmp_path / "run") as cache:
        assert cache.record["where"] == "file"
        hidden = [p for p in (tmp_path / "run").iterdir()]
        assert len(hidden) == 1 and hidden[0].name.startswith(".image-cache.tmp-")
        assert (hidden[0] / "pixels.u8").stat().st_size == cache.record["bytes"]
        for rel in rels:
            np.testing.assert_array_equal(cache.get(rel)[0], in_memory[rel])
    assert list((tmp_path / "run").iterdir()) == []


def test_unwritable_cache_folder_falls_back_to_memory_or_says_what_it_needs(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rels = small_folder(tmp_path / "data")
    monkeypatch.setenv(imagecache.MEMORY_LIMIT_ENV, "0")
    locked = tmp_path / "locked"
    locked.mkdir()

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(imagecache, "_allocate", lambda total, folder, create: refuse() if folder else
                        np.empty(max(1, total), np.uint8))
    with open_cache(tmp_path / "data", rels, 64, locked) as cache:
        assert cache.record["where"] == "memory" and "could not be written" in cache.record["fallback"]
        assert cache.get(rels[1])[0].shape == (30, 40, 3)
    assert list(locked.iterdir()) == []  # the scratch folder made before the failure is gone too
    monkeypatch.setattr(imagecache, "FALLBACK_SHARE", 0.0)
    with pytest.raises(UserError, match=r"image cache cannot be written in .*locked.*no space left.*needs 0 MB"), \
            open_cache(tmp_path / "data", rels, 64, locked):
        pass


def test_damaged_files_are_recorded_once_and_raise_on_read(tmp_path: Path) -> None:
    rels = small_folder(tmp_path, 4)
    good = phone_photo(tmp_path / "c0" / "photo.jpg", 640, 480)
    truncated = tmp_path / "c1" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    rels += ["c0/photo.jpg", "c1/truncated.jpg"]
    with open_cache(tmp_path, rels, 74, tmp_path) as cache:
        assert cache.record["failed"] == 1
        assert list(cache.failures()) == ["c1/truncated.jpg"]
        with pytest.raises(DecodeError, match="OSError"):
            cache.get("c1/truncated.jpg")
        assert cache.get("c0/photo.jpg")[0].shape == (74, 74, 3)


def test_ctrl_c_while_building_leaves_no_cache_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rels = small_folder(tmp_path / "data", 8)
    monkeypatch.setenv(imagecache.MEMORY_LIMIT_ENV, "0")
    run = tmp_path / "run"
    run.mkdir()
    seen = []

    def interrupt(done: int) -> None:
        seen.append(done)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), open_cache(tmp_path / "data", rels, 64, run, progress=interrupt):
        pass
    assert list(run.iterdir()) == []


def test_search_cache_is_resized_not_decoded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rels = small_folder(tmp_path, 6, (300, 200))
    calls = []
    real = data.load_rgb
    monkeypatch.setattr(data, "load_rgb", lambda path, draft=None: calls.append(path) or real(path, draft))
    with open_cache(tmp_path, rels[:4], 258, tmp_path) as search, \
            open_cache(tmp_path, rels, 148, tmp_path, reuse=search) as final:
        assert (final.record["decoded"], final.record["resized_from_search"]) == (2, 4)
        assert len(calls) == 6  # each file opened for pixels once in all
        pixels, source = final.get(rels[0])
        assert pixels.shape == (148, 148, 3) and source == (300, 200)
        direct, _ = decode_small(tmp_path / rels[0], 148)
        assert np.abs(pixels.astype(int) - direct.astype(int)).mean() < 5.0  # white noise: the worst case


def test_each_image_is_decoded_once_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1, two stage-2 epochs and the evaluation of val and test all read one decode of each file."""
    pytest.importorskip("torch")
    from edgetl.config import FinetuneConfig
    from edgetl.finetune import run_finetune

    root = tmp_path / "data"
    for i in range(24):
        phone_photo(root / f"c{i % 2}" / f"{i:02d}.jpg", 400, 300, seed=i)
    calls: list[str] = []
    real = data.load_rgb
    monkeypatch.setattr(data, "load_rgb", lambda path, draft=None: calls.append(str(path)) or real(path, draft))
    checkpoint = run_finetune(FinetuneConfig.of(data=str(root), backbone="mobilenet_v2", width=0.35, image_size=32,
                                             weights="none", epochs_finetune=2, seed=0, device="cpu"),
                              tmp_path / "run")
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 24
    import json

    manifest = json.loads((checkpoint / "manifest.json").read_text())
    cache = manifest["training"]["image_cache"]
    assert (cache["where"], cache["images"], cache["decoded"], cache["max_side"]) == ("memory", 24, 24, 37)
    assert cache["bytes"] == 24 * 37 * 37 * 3
    assert manifest["training"]["device"]["channels_last"] is True
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint"]
