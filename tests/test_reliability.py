"""The reliability suite: generated folder trees and manifests (hypothesis), device_bench over mutated model
files, export killed at random points or interrupted, and a full disk.

What it holds edgetl to: bad input is one line (exit 2) and never a traceback; a listing takes exactly the
images a user would expect and says what it left out and why; a stage that is killed, interrupted or runs
out of space leaves its previous output exactly as it was and never a partial file under a final name.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgetl.data import IMAGE_EXTENSIONS, load_rgb, scan_folder
from edgetl.errors import UserError
from edgetl.labels import label_problem
from edgetl.manifest import read_checkpoint_manifest, read_splits
from tests.conftest import REPO, mutate_json, run_cli, tree_digest

# ------------------------------------------------------------------------ generated folder trees


def _write_image(path: Path, mode: str, value: int) -> int:
    """A uniform image whose pixels are `value` on an 8-bit screen, stored in `mode`; returns that value."""
    import tifffile

    size = (6, 5)
    if mode == "L":
        Image.new("L", size, value).save(path.with_suffix(".png"))
    elif mode == "I;16":
        Image.frombytes("I;16", size, np.full(30, value * 257, "<u2").tobytes()).save(path.with_suffix(".png"))
    elif mode == "I;16B":
        Image.frombytes("I;16B", size, np.full(30, value * 257, ">u2").tobytes()).save(path.with_suffix(".tif"))
    elif mode == "I32":
        tifffile.imwrite(path.with_suffix(".tif"), np.full((5, 6), value * 0x01010101, np.uint32))
    elif mode == "I32 signed":
        tifffile.imwrite(path.with_suffix(".tiff"), np.full((5, 6), value * 0x01010101 - 2**31, np.int64)
                         .astype(np.int32))
    elif mode == "F":
        tifffile.imwrite(path.with_suffix(".tif"), np.full((5, 6), value / 255.0, np.float32))
    elif mode == "LA":
        Image.new("LA", size, (value, 255)).save(path.with_suffix(".png"))
    elif mode == "P transparency":
        image = Image.new("P", size, 0)
        image.putpalette([value] * 3 + [0, 0, 0] * 255)
        image.save(path.with_suffix(".png"), transparency=1)  # index 1 is transparent, and unused
    elif mode == "1":
        value = 255 if value > 127 else 0
        Image.new("1", size, 1 if value else 0).save(path.with_suffix(".bmp"))
    elif mode == "CMYK":
        Image.new("RGB", size, (value,) * 3).convert("CMYK").save(path.with_suffix(".tif"))
    elif mode == "RGBA":
        Image.new("RGBA", size, (value, value, value, 255)).save(path.with_suffix(".webp"), lossless=True)
    else:
        Image.new("RGB", size, (value,) * 3).save(path.with_suffix(".jpg"), quality=100)
    return value


MODES = ("L", "I;16", "I;16B", "I32", "I32 signed", "F", "LA", "P transparency", "1", "CMYK", "RGBA", "RGB")
HOSTILE_NAMES = ("a\nb", "tab\there", "back\\slash", "bell\x07", "line\u2028break", "   ",
                 b"caf\xe9".decode("utf-8", "surrogateescape"))
FRIENDLY_NAMES = ("cat", "dog", "é-ok", "two words", "x.y", "-dash", "日本")

image_spec = st.tuples(st.sampled_from(MODES), st.integers(0, 255))
# a class folder: images directly in it, images in sub-folders (some hidden), and odd entries
class_spec = st.fixed_dictionaries({
    "images": st.lists(image_spec, max_size=4),
    "nested": st.lists(st.tuples(st.lists(st.sampled_from(["sub", "deeper", ".hidden", ".ipynb_checkpoints"]),
                                          min_size=1, max_size=3), image_spec), max_size=3),
    "hidden_files": st.integers(0, 2),
    "not_images": st.integers(0, 1),
    "dangling": st.booleans(),
    "loop_to_self": st.booleans(),
    "loop_to_parent": st.booleans(),
})
tree_spec = st.dictionaries(
    st.sampled_from(FRIENDLY_NAMES) | st.sampled_from(HOSTILE_NAMES) | st.sampled_from([".git", ".Trash"]),
    class_spec, min_size=1, max_size=4,
)


def _build(root: Path, tree: dict) -> dict:
    """Write the tree; return what a careful user expects the listing to take, per class, with values."""
    expected: dict[str, dict[str, int]] = {}
    for name, spec in tree.items():
        folder = root / name
        folder.mkdir()
        taken: dict[str, int] = {}
        for index, (mode, value) in enumerate(spec["images"]):
            value = _write_image(folder / f"img{index}", mode, value)
            taken[next(folder.glob(f"img{index}.*")).name] = value
        for index, (parts, (mode, value)) in enumerate(spec["nested"]):
            sub = folder.joinpath(*parts)
            sub.mkdir(parents=True, exist_ok=True)
            value = _write_image(sub / f"n{index}", mode, value)
            if not any(part.startswith(".") for part in parts):
                taken[next(sub.glob(f"n{index}.*")).relative_to(folder).as_posix()] = value
        for index in range(spec["hidden_files"]):
            Image.new("L", (4, 4)).save(folder / f".hidden{index}.png")
        for index in range(spec["not_images"]):
            (folder / f"notes{index}.txt").write_text("not an image")
        if spec["dangling"]:
            (folder / "gone.png").symlink_to(root / "nowhere.png")
        if spec["loop_to_self"]:
            (folder / "self.jpg").symlink_to(folder / "self.jpg")
        if spec["loop_to_parent"]:
            (folder / "loop").symlink_to(folder)
        if not name.startswith(".") and taken:
            expected[name] = taken
    return expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=tree_spec)
def test_listing_takes_what_a_user_expects_and_says_what_it_left_out(tree: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="edgetl-tree-") as scratch:
        root = Path(scratch) / "data"
        root.mkdir()
        expected = _build(root, tree)
        classes = sorted(expected)
        bad = [name for name in classes if label_problem(name)]
        try:
            listing = scan_folder(root)
        except UserError as error:
            message = str(error)
            assert "\n" not in message and message.encode("utf-8"), message  # one printable line
            if bad:
                assert "rename that folder" in message
            elif len(classes) < 2:
                assert "single class" in message or "no class" in message or "no readable" in message
            else:
                assert any(len(expected[name]) < 3 for name in classes) and "at least 3" in message
            return
        assert not bad and len(classes) >= 2 and all(len(expected[name]) >= 3 for name in classes)
        assert listing.classes == classes
        listed = {p: listing.classes[y] for records in listing.splits.values() for p, y in records}
        want = {f"{name}/{rel}": name for name in classes for rel in expected[name]}
        assert listed == want
        assert not any(part.startswith(".") for p in listed for part in p.split("/"))
        skipped = {entry["path"]: entry["reason"] for entry in listing.skipped}
        ignored = {entry["path"]: entry["reason"] for entry in listing.ignored}
        for name, spec in tree.items():
            if name.startswith("."):
                assert ignored[name] == "hidden folder"
                continue
            if name not in expected:
                assert ignored[name].startswith("empty class folder")
                continue
            if spec["dangling"]:
                assert skipped[f"{name}/gone.png"].startswith("dangling symlink")
            if spec["loop_to_self"]:
                assert skipped[f"{name}/self.jpg"].startswith("symlink loop")
            if spec["loop_to_parent"]:
                assert skipped[f"{name}/loop"].startswith("symlink loop")
            for index in range(spec["hidden_files"]):
                assert ignored[f"{name}/.hidden{index}.png"] == "hidden file"
            for index in range(spec["not_images"]):
                assert skipped[f"{name}/notes{index}.txt"].startswith("not an image extension")
        for rel, name in listed.items():  # every mode decodes to its true 8-bit value
            pixels = np.asarray(load_rgb(root / rel), dtype=np.float64)
            value = expected[name][rel.split("/", 1)[1]]
            assert abs(pixels.mean() - value) <= 1.0, (rel, pixels.mean(), value)


def test_every_listed_extension_is_one_load_rgb_decodes() -> None:
    assert set(IMAGE_EXTENSIONS) >= {".png", ".tif", ".tiff", ".bmp", ".jpg", ".webp"}


# ------------------------------------------------------------------------------ generated manifests

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    return found




@pytest.fixture(scope="module")
def checkpoint_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_export import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("template"))


def _one_line(error: UserError, path: Path) -> None:
    message = str(error)
    assert "\n" not in message and str(path) in message, message


def test_damaged_checkpoint_manifests_are_refused_with_one_line(checkpoint_template: Path) -> None:
    valid = json.loads((checkpoint_template / "manifest.json").read_text())
    paths = _paths(valid)

    @settings(max_examples=300, deadline=None)
    @given(path=st.sampled_from(paths), replacement=json_values, delete=st.booleans())
    def check(path: tuple, replacement: object, delete: bool) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / "checkpoint"
            shutil.copytree(checkpoint_template, folder)
            damaged = mutate_json(valid, path, replacement, delete)
            (folder / "manifest.json").write_text(json.dumps(damaged))
            try:
                manifest = read_checkpoint_manifest(folder)
            except UserError as error:
                _one_line(error, folder)
                return
            # accepted: then every field a reader relies on is there and of its kind
            assert isinstance(manifest["model"]["num_classes"], int) and manifest["model"]["num_classes"] >= 2
            assert all(label_problem(label) is None for label in manifest["labels"])
            assert (folder / manifest["weights_file"]).is_file()
            assert len(manifest["preprocess"]["mean"]) == 3 and all(s > 0 for s in manifest["preprocess"]["std"])

    check()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_as_a_manifest_or_splits_file_are_one_line(checkpoint_template: Path, content: bytes) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "checkpoint"
        shutil.copytree(checkpoint_template, folder)
        (folder / "manifest.json").write_bytes(content)
        with pytest.raises(UserError) as caught:
            read_checkpoint_manifest(folder)
        _one_line(caught.value, folder)
        (folder / "splits.json").write_bytes(content)
        with pytest.raises(UserError) as caught:
            read_splits(folder / "splits.json", ["circle", "square"])
        _one_line(caught.value, folder)


def test_damaged_splits_files_are_refused_with_one_line(checkpoint_template: Path) -> None:
    valid = json.loads((checkpoint_template / "splits.json").read_text())
    paths = _paths(valid)

    @settings(max_examples=200, deadline=None)
    @given(path=st.sampled_from(paths), replacement=json_values, delete=st.booleans(),
           record=st.lists(json_values, max_size=3))
    def check(path: tuple, replacement: object, delete: bool, record: list) -> None:
        damaged = mutate_json(valid, path, replacement, delete)
        if isinstance(damaged.get("splits"), dict) and isinstance(damaged["splits"].get("train"), list):
            damaged["splits"]["train"].append(record)
        with tempfile.TemporaryDirectory() as scratch:
            path_ = Path(scratch) / "splits.json"
            path_.write_text(json.dumps(damaged))
            try:
                payload = read_splits(path_, ["circle", "square"])
            except UserError as error:
                _one_line(error, path_)
                return
            for split in ("train", "val", "test"):
                for rel, label in payload["splits"][split]:
                    assert isinstance(rel, str) and ".." not in rel.split("/") and label in (0, 1)

    check()


# ------------------------------------------------------------------- device_bench over mutated models

from tests.test_device_bench import SCRIPT, tiny_models  # noqa: E402, F401  (session fixture)


def _mutants(source: bytes, count: int, seed: int) -> list[tuple[str, bytes]]:
    """Flipped bytes, truncations, zeroed and duplicated blocks, each at a random place (seeded)."""
    rng = random.Random(seed)
    made = []
    for index in range(count):
        data = bytearray(source)
        kind = ("flip", "truncate", "zero", "duplicate")[index % 4]
        at = rng.randrange(8, len(data) - 1)  # keep the format identifier: get past the header check
        if kind == "flip":
            for _ in range(rng.randint(1, 16)):
                data[rng.randrange(8, len(data))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            del data[at:]
        elif kind == "zero":
            end = min(len(data), at + rng.randint(4, 256))
            data[at:end] = bytes(end - at)
        else:
            block = data[at:at + rng.randint(4, 256)]
            data[at:at] = block
        made.append((f"{kind}-{index}", bytes(data)))
    return made


def _fuzz(models: Path, scratch: Path, suffix: str, count: int, seed: int) -> list[tuple[str, int]]:
    source = (models / f"tiny{suffix}").read_bytes()
    outcomes = []
    for name, payload in _mutants(source, count, seed):
        path = scratch / f"{name}{suffix}"
        path.write_bytes(payload)
        result = scratch / f"{name}{suffix}.json"
        done = subprocess.run([sys.executable, str(SCRIPT), str(path), "--iters", "1", "--warmup", "0",
                               "--out", str(result)], capture_output=True, text=True, timeout=300)
        assert done.returncode in (0, 2), (name, done.returncode, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, (name, done.stderr[-2000:])
        if done.returncode == 2:  # one line of ours (LiteRT's own INFO lines may stand beside it)
            lines = [line for line in done.stderr.splitlines() if line.startswith("device_bench:")]
            assert len(lines) == 1 and lines[0].startswith("device_bench: error:"), (name, done.stderr[-2000:])
            assert not result.exists()
        else:
            assert json.loads(result.read_text())["schema_version"] == 1
        outcomes.append((name, done.returncode))
    return outcomes


def test_device_bench_on_mutated_models_exits_0_or_2_with_one_line(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    """A bounded fuzz: 16 damaged .tflite and 3 damaged .pte files (each mutation kind 4 times on .tflite);
    never a crash, a hang or a traceback. The long one is behind `slow`."""
    outcomes = _fuzz(tiny_models, tmp_path, ".tflite", 16, seed=15)
    outcomes += _fuzz(tiny_models, tmp_path, ".pte", 3, seed=15)
    assert any(code == 2 for _, code in outcomes)  # the mutations did damage something


@pytest.mark.slow
def test_device_bench_long_fuzz(tiny_models: Path, tmp_path: Path) -> None:  # noqa: F811
    _fuzz(tiny_models, tmp_path, ".tflite", 200, seed=int(os.environ.get("EDGETL_FUZZ_SEED", "1")))
    _fuzz(tiny_models, tmp_path, ".pte", 40, seed=int(os.environ.get("EDGETL_FUZZ_SEED", "1")))


# ----------------------------------------------------------------- export killed, interrupted, disk full

EXPORT_ARGS = ("--formats", "tflite", "--quant", "fp32")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> dict:
    """A 32 px MobileNetV2-0.35 checkpoint and one finished fp32 .tflite export of it (about 50 s here)."""
    pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    run = tmp_path_factory.mktemp("run")
    env = {"EDGETL_CACHE": str(shared_cache)}
    done = run_cli("finetune", "--data", "builtin:shapes", "--backbone", "mobilenet_v2", "--width", "0.35",
                   "--weights", "none", "--image-size", "32", "--epochs-finetune", "0",
                   "--out", str(run), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    started = time.monotonic()
    done = run_cli("export", str(run / "checkpoint"), *EXPORT_ARGS, "--out", str(run / "export"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"checkpoint": run / "checkpoint", "export": run / "export", "seconds": time.monotonic() - started,
            "env": {**os.environ, "EDGETL_CACHE": str(shared_cache)}}


def _previous(tiny_export: dict, where: Path) -> Path:
    out = where / "exports" / "export"
    shutil.copytree(tiny_export["export"], out)
    return out


def _assert_complete(out: Path) -> None:
    """No partial file under a final name: every model is listed as good and matches its sidecar."""
    manifest = json.loads((out / "manifest.json").read_text())
    models = sorted(p.name for p in out.iterdir() if p.suffix in (".tflite", ".pte"))
    assert models == sorted(a["file"] for a in manifest["artifacts"] if a["status"] == "ok")
    for name in models:
        from edgetl.manifest import sha256_file

        assert json.loads((out / f"{name}.json").read_text())["sha256"] == sha256_file(out / name)


def _start_export(tiny_export: dict, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgetl.cli", "export", str(tiny_export["checkpoint"]),
                             *EXPORT_ARGS, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=tiny_export["env"], cwd=REPO)


@pytest.mark.torch
def test_export_killed_at_random_points_leaves_the_previous_output_or_a_complete_one(
    tiny_export: dict, tmp_path: Path
) -> None:
    """SIGKILL (no clean-up at all) at random moments of a real export (EDGETL_FAULT_KILLS of them, seeded by
    EDGETL_FAULT_SEED) and once near the end, where the new folder takes the old one's place: the final name
    always holds a complete export, the previous one unless the run had finished; the next run removes what
    the killed ones left."""
    out = _previous(tiny_export, tmp_path)
    rng = random.Random(int(os.environ.get("EDGETL_FAULT_SEED", "15")))
    seconds = tiny_export["seconds"]
    kills = int(os.environ.get("EDGETL_FAULT_KILLS", "1"))  # random moments, plus one near the end
    delays = sorted(rng.uniform(1.0, seconds) for _ in range(kills)) + [seconds * 0.95]
    before = tree_digest(out)
    created = json.loads((out / "manifest.json").read_text())["created"]
    for delay in delays:
        child = _start_export(tiny_export, out)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=120)
        _assert_complete(out)
        now = tree_digest(out)
        if now != before:  # the new folder had taken the old one's place before the kill (or the run finished)
            assert json.loads((out / "manifest.json").read_text())["created"] != created, (
                f"killed after {delay:.1f} s: the previous export changed but is not a new complete one")
            before, created = now, json.loads((out / "manifest.json").read_text())["created"]
    done = run_cli("export", str(tiny_export["checkpoint"]), *EXPORT_ARGS, "--out", str(out),
                   env=tiny_export["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_complete(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["export"]  # the killed runs' leftovers are gone


@pytest.mark.torch
@pytest.mark.parametrize(("signum", "status", "line"), [
    (signal.SIGINT, 130, "edgetl: interrupted; the running stage published nothing and its previous output is "
                         "unchanged"),
    (signal.SIGTERM, 143, "edgetl: terminated (SIGTERM); the running stage published nothing and its previous "
                          "output is unchanged"),
])
def test_ctrl_c_or_sigterm_during_export_exits_with_one_line_and_no_temporary_folder(
    tiny_export: dict, tmp_path: Path, signum: int, status: int, line: str
) -> None:
    out = _previous(tiny_export, tmp_path)
    before = tree_digest(out)
    child = _start_export(tiny_export, out)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".export.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.2)  # the export is writing its temporary folder: interrupt it there
    time.sleep(random.Random(15).uniform(0.0, 2.0))
    child.send_signal(signum)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == status, stderr[-2000:]
    mine = [text for text in stderr.splitlines() if text.startswith("edgetl:")]
    assert mine == [line], stderr[-2000:]
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["export"] and tree_digest(out) == before


@pytest.mark.torch
def test_ctrl_c_during_finetune_exits_130_with_one_line(tmp_path: Path, shared_cache: Path) -> None:
    pytest.importorskip("torch")
    child = subprocess.Popen([sys.executable, "-m", "edgetl.cli", "finetune", "--data", "builtin:shapes",
                              "--backbone", "mobilenet_v2", "--width", "0.35", "--weights", "none", "--image-size",
                              "32", "--epochs-finetune", "100", "--unfreeze", "2",
                              "--patience", "200",
                              "--out", str(tmp_path / "run")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                             env={**os.environ, "EDGETL_CACHE": str(shared_cache)})
    while True:  # wait for training to begin
        line = child.stderr.readline()
        assert line, "finetune ended before training began"
        if line.startswith("data:"):
            break
    time.sleep(3)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr[-2000:]
    assert [line for line in stderr.splitlines() if line.startswith("edgetl:")] == [
        "edgetl: interrupted; the running stage published nothing and its previous output is unchanged"]
    assert "Traceback" not in stderr and not (tmp_path / "run" / "checkpoint").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


def _tmpfs(where: Path, size: str) -> str | None:
    """Mount a small tmpfs at `where`; the reason it cannot be done otherwise (not root, no permission)."""
    if os.geteuid() != 0:
        return "a full disk needs a small tmpfs, which only root can mount (CI runs as root)"
    if shutil.which("mount") is None:
        return "no mount command"
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    return None if done.returncode == 0 else f"mount -t tmpfs failed: {done.stderr.strip()}"


@pytest.mark.torch
def test_a_full_disk_gives_one_line_and_loses_nothing(tiny_export: dict, tmp_path: Path) -> None:
    """The disk holds the previous export but not a second copy beside it: the new export runs out of space
    while writing its temporary folder."""
    disk = tmp_path / "disk"
    size_kb = sum(f.stat().st_size for f in tiny_export["export"].iterdir()) // 1024
    reason = _tmpfs(disk, f"{int(size_kb * 1.5) + 64}k")
    if reason:
        pytest.skip(reason)
    try:
        out = _previous(tiny_export, disk)
        before = tree_digest(out)
        done = run_cli("export", str(tiny_export["checkpoint"]), *EXPORT_ARGS, "--out", str(out),
                       env=tiny_export["env"])
        errors = [line for line in done.stderr.splitlines() if line.startswith("edgetl:")]
        assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
        assert "No space left on device" in errors[0] or "no space left on device" in errors[0], errors
        assert "Traceback" not in done.stderr
        assert tree_digest(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["export"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.torch
# into an empty disk with -m slow: over a finished export is the case where something could be lost
@pytest.mark.parametrize("previous", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["over-a-finished-export", "into-an-empty-disk"])
def test_a_disk_that_fills_midway_publishes_nothing_however_many_files_were_done(
    tiny_export: dict, tmp_path: Path, previous: bool
) -> None:
    """An export of more files than the disk holds: the files made before the disk filled are not published in
    place of the previous, complete export (nor as a partial first one); a full disk is the machine failing,
    not a file failing verification."""
    disk = tmp_path / "disk"
    size_kb = sum(f.stat().st_size for f in tiny_export["export"].iterdir()) // 1024
    reason = _tmpfs(disk, f"{int(size_kb * 1.5) + 64}k" if previous else f"{int(size_kb * 0.75)}k")
    if reason:
        pytest.skip(reason)
    try:
        out = _previous(tiny_export, disk) if previous else disk / "exports" / "export"
        before = tree_digest(out) if previous else None
        done = run_cli("export", str(tiny_export["checkpoint"]), "--formats", "tflite", "--quant", "int8,fp32",
                       "--out", str(out), env=tiny_export["env"])
        errors = [line for line in done.stderr.splitlines() if line.startswith("edgetl:")]
        assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
        assert "no space left on device" in errors[0].lower() and "published nothing" in errors[0] or \
            "nothing was published" in errors[0], errors
        assert "Traceback" not in done.stderr
        if previous:
            assert tree_digest(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["export"]
        else:
            assert not out.exists() and not [p for p in disk.rglob("*") if p.is_file()]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.torch
def test_finetune_on_a_full_disk_names_the_folder_and_the_space_needed(tmp_path: Path, shared_cache: Path) -> None:
    """A full disk while the checkpoint is written: one line that names the folder, what the checkpoint needs and
    what is free, and no temporary folder stays behind."""
    pytest.importorskip("torch", reason="fine-tuning needs the torch extra")
    disk = tmp_path / "disk"
    reason = _tmpfs(disk, "400k")  # the 32 px MobileNetV2-0.35 checkpoint needs about 2.8 MB
    if reason:
        pytest.skip(reason)
    try:
        done = run_cli("finetune", "--data", "builtin:shapes", "--backbone", "mobilenet_v2", "--width", "0.35",
                       "--weights", "none", "--image-size", "32", "--epochs-finetune", "0",
                       "--out", str(disk / "run"), env={"EDGETL_CACHE": str(shared_cache)})
        errors = [line for line in done.stderr.splitlines() if line.startswith("edgetl:")]
        assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        assert "no space left on device" in errors[0] and repr(str(disk / "run")) in errors[0], errors
        assert re.search(r"needs about \d+\.\d MB, \d+\.\d MB are free", errors[0]), errors
        assert not (disk / "run").exists() or [p.name for p in (disk / "run").iterdir()] == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.torch
def test_swapped_weights_are_refused_or_exported_under_their_own_sha256(tiny_export: dict, tmp_path: Path) -> None:
    """Another valid model.pt put in a checkpoint: export refuses it (the accuracy in the manifest is not its),
    and with --allow-modified records the weights' real sha256 in the manifest and every sidecar, marked."""
    import torch

    from edgetl.manifest import sha256_file

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_export["checkpoint"], checkpoint)
    state = torch.load(checkpoint / "model.pt", weights_only=True)
    name = next(key for key, value in state.items() if value.is_floating_point())
    state[name] = state[name] + 0.01
    torch.save(state, checkpoint / "model.pt")
    swapped = sha256_file(checkpoint / "model.pt")
    out = tmp_path / "export"
    done = run_cli("export", str(checkpoint), *EXPORT_ARGS, "--out", str(out), env=tiny_export["env"])
    errors = [line for line in done.stderr.splitlines() if line.startswith("edgetl:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "does not match the sha256" in errors[0] and "--allow-modified" in errors[0], errors
    assert not out.exists()
    done = run_cli("export", str(checkpoint), *EXPORT_ARGS, "--out", str(out), "--allow-modified",
                   env=tiny_export["env"])
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    sidecars = [json.loads(p.read_text()) for p in out.glob("*.tflite.json")]
    assert sidecars
    for parent in [manifest["parent"], *(sidecar["parent"] for sidecar in sidecars)]:
        assert parent["weights_sha256"] == swapped and parent["weights_modified"] is True
        assert parent["manifest_weights_sha256"] != swapped
