"""Benchmark image folders made from real images that Debian packages ship (a script, not a timed test).

    python benchmarks/folders.py build [--folders NAME ...] [--source-root DIR] [--cache DIR] [--force]
    python benchmarks/folders.py table [--markdown]
    python benchmarks/folders.py subset NAME --per-class 25 --seed 0 --out DIR

Nobody here drew or chose these images, which is the point: a learning curve measured on them says how
edgetl does on a user's small folder, not on data it was tuned on. Each folder is written once into the
cache (`$EDGETL_CACHE/bench-folders`, else `~/.cache/edgetl/bench-folders`) as

    NAME/train/<class>/*.png   the training pool (subsets are drawn from it)
    NAME/test/<class>/*.png    a fixed test set, disjoint from the pool
    NAME/folder.json           every file with its group, the counts, the source and how it was drawn
    NAME/PROVENANCE.md         package, version, licence and how the folder was made, in words
    NAME/COPYRIGHT             the package's own Debian copyright file

The packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x` into the cache (nothing
is installed); `--source-root` uses a tree where they are already unpacked. The card folder renders SVG
decks with `rsvg-convert` (Debian: `apt-get install librsvg2-bin`); without it that folder is skipped.

Images that are near-copies of each other share a *group* (one icon family, one game unit's animation
frames, one deck design) and a group is never split between train and test. A training subset of N images
per class takes the groups round-robin in a seeded order, so 5 images are 5 different things where the
pool allows it; the subsets of one seed are nested (the 10-per-class set holds the 5-per-class set).
Everything is drawn from fixed seeds: rebuilding gives the same files.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
from PIL import Image

import edgetl.datasets
from edgetl.data import load_rgb
from edgetl.paths import atomic_dir, cache_dir

FORMAT = 5  # bump when the way folders are drawn changes; older folders are then rebuilt
BUILD_SEED = 20261201
SUBSET_SALT = 7919  # keeps subset draws independent of the build draws that share a seed value
SIZES = (5, 10, 25, 50, 100, 300)
MIN_TEST = 8  # a class with fewer test images than this is an error at build time

PACKAGES = {  # binary package -> a path inside it that the folders read
    "dataset-fashion-mnist": "usr/share/datasets/fashion-mnist",
    "oxygen-icon-theme": "usr/share/icons/oxygen/base",
    "wesnoth-1.16-data": "usr/share/games/wesnoth/1.16/data/core/images/units",
    "kdegames-card-data-kf5": "usr/share/carddecks",
}
# Where a package's copyright file is not machine-readable (DEP-5), what it says, in short.
LICENCE_NOTES = {"wesnoth-1.16-data": "GPL-2+ (Debian's copyright file, not machine-readable: "
                                      "GNU GPL version 2 or any later version)"}


def default_cache() -> Path:
    return cache_dir() / "bench-folders"


# ---------------------------------------------------------------- sources: Debian packages, unpacked


@dataclass(frozen=True)
class Source:
    """One Debian package unpacked somewhere, and where it came from."""

    package: str
    root: Path
    version: str
    origin: str

    @property
    def copyright(self) -> Path:
        return self.root / "usr/share/doc" / self.package / "copyright"

    def licence(self, path_in_source: str = "x") -> str:
        """The licence the copyright file gives `path_in_source` (a path in the upstream source tree)."""
        found = dep5_licence(self.copyright.read_text(errors="replace"), path_in_source)
        return found or LICENCE_NOTES.get(self.package, "see COPYRIGHT")


def dep5_licence(text: str, path: str) -> str | None:
    """Licence short name of the last `Files:` paragraph matching `path`; None if not DEP-5."""
    if not text.startswith("Format:"):
        return None
    found = None
    for paragraph in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in paragraph.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                fields[key] = value.strip()
        if "Files" in fields and "License" in fields and any(fnmatch(path, p) for p in fields["Files"].split()):
            found = fields["License"].split(" ")[0]
    return found


def _changelog_version(root: Path, package: str) -> str:
    """Version from the first line of the package's Debian changelog: `name (version) dist; ...`."""
    doc = root / "usr/share/doc" / package
    for name in ("changelog.Debian.gz", "changelog.gz"):
        if (doc / name).is_file():
            first = gzip.decompress((doc / name).read_bytes()).split(b"\n", 1)[0].decode()
            return first.split("(", 1)[1].split(")", 1)[0]
    return "unknown"


def _need_tool(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        sys.exit(f"{tool} not found; it comes with Debian's {package} package (apt-get install {package})")


def fetch_source(package: str, cache: Path, source_root: Path | None = None) -> Source:
    """The package's files: from `source_root` when it holds them, else its .deb unpacked in the cache."""
    probe = PACKAGES[package]
    if source_root is not None and (source_root / probe).exists():
        return Source(package, source_root, _changelog_version(source_root, package), f"unpacked tree {source_root}")
    debs = cache / "debs"
    unpacked = cache / "debian" / package
    deb = next(iter(sorted(debs.glob(f"{package}_*.deb"))), None)
    if deb is None:
        _need_tool("apt-get", "apt")
        debs.mkdir(parents=True, exist_ok=True)
        print(f"apt-get download {package} (into {debs})", file=sys.stderr)
        subprocess.run(["apt-get", "download", package], cwd=debs, check=True)
        deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
    if not (unpacked / probe).exists():
        _need_tool("dpkg-deb", "dpkg")
        with atomic_dir(unpacked) as tmp:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True)
    return Source(package, unpacked, version.stdout.strip(), f"{deb.name} (apt-get download), dpkg-deb -x")


# ---------------------------------------------------------------- what a folder is made of


@dataclass
class Candidate:
    """One image that may go into a folder: its class, its group, its file name and how to write it."""

    label: str
    group: str  # never split between train and test
    name: str
    origin: str
    write: Callable[[Path], None]
    subgroup: str = ""  # one picture's variants inside a group (a unit of an advancement line); default: group
    source: Path | None = None  # the file it copies, for the near-copy check

    @property
    def picture(self) -> str:
        return self.subgroup or self.group


@dataclass
class Collected:
    """What a collector found: candidates (pre-split by the source when it has one) and what it left out."""

    candidates: dict[str, list[Candidate]]  # "train"/"test" when the source splits, else "all"
    source_size: str
    excluded: list[dict[str, str]] = field(default_factory=list)  # {"item", "reason", "detail"}
    licence: str | None = None  # None: what the copyright file says for the whole package
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class FolderSpec:
    """How one benchmark folder is drawn."""

    name: str
    package: str
    classes: tuple[str, ...]
    test_per_class: int
    train_cap: int  # the most training images kept per class (the largest subset needs no more)
    why: str
    icon_size: int = 0
    frames_per_unit: int = 0
    test_per_group: int = 0  # at most this many test images of one picture (0: no cap), so more pictures test
    test_group_share: float = 0.4  # at most this share of a class's groups (at least one) goes to test
    shared_groups: bool = False  # groups span classes (decks): choose the test groups once for all classes
    minority: tuple[str, float] | None = None  # (class, fraction of the others' images it gets)
    draw_as: str | None = None  # reuse another folder's draws (same test set, same pool order)


FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
SPRITES_10 = ("drakes", "dunefolk", "dwarves", "elves-wood", "human-loyalists", "human-outlaws", "merfolk",
              "nagas", "orcs", "undead")
SUITS = ("club", "diamond", "heart", "spade")

FOLDERS: dict[str, FolderSpec] = {spec.name: spec for spec in (
    FolderSpec("fashion-10", "dataset-fashion-mnist", FASHION_CLASSES, 100, 300,
               "Fashion-MNIST beyond the built-in subset: the official train/test images that "
               "builtin:fashion-mnist-mini does not use."),
    FolderSpec("fashion-2", "dataset-fashion-mnist", ("pullover", "coat"), 100, 300,
               "Two Fashion-MNIST classes that look alike (the same draws as fashion-10).",
               draw_as="fashion-10"),
    FolderSpec("fashion-10-unbalanced", "dataset-fashion-mnist", FASHION_CLASSES, 100, 300,
               "fashion-10 with 'shirt' (the class most often confused) at a fifth of the others' images, "
               "for class weighting; the same test set and pool order as fashion-10.",
               minority=("shirt", 0.2), draw_as="fashion-10"),
    FolderSpec("icons-2", "oxygen-icon-theme", ("actions", "mimetypes"), 50, 300,
               "Tiny (16 px) icons: action glyphs against file-type icons (a page with a symbol on it). The page "
               "outline is visible in raw pixels, so this is a folder where a pixel baseline is strong and "
               "transfer from 224 px photographs has to earn its place. (actions against apps was tried first "
               "and left out: no baseline got far above chance on it.)", icon_size=16, test_per_group=2),
    FolderSpec("icons-5", "oxygen-icon-theme", ("actions", "apps", "devices", "mimetypes", "status"), 20, 300,
               "Five icon categories at 32 px, the largest ones with enough distinct icons (devices has "
               "57); the test set is small, so read its intervals.", icon_size=32, test_per_group=2),
    FolderSpec("sprites-5", "wesnoth-1.16-data", ("drakes", "dwarves", "elves-wood", "human-loyalists", "undead"),
               32, 300, "Battle for Wesnoth unit sprites (72 px), five factions that look different; split "
               "by advancement line (a unit and the units it becomes are redrawn from one picture).",
               frames_per_unit=8),
    FolderSpec("sprites-10", "wesnoth-1.16-data", SPRITES_10, 32, 300,
               "Ten factions, some close (loyalists and outlaws are both human); split by advancement line. "
               "Some factions have only three lines: one of them tests.", frames_per_unit=8),
    FolderSpec("cards-4", "kdegames-card-data-kf5", SUITS, 52, 300,
               "Playing cards of many deck designs, classes are suits; split by deck design (the same test "
               "decks for every suit), so the test decks are styles never seen in training.",
               shared_groups=True),
)}


def _rng(*keys: str | int) -> np.random.Generator:
    return np.random.default_rng([BUILD_SEED, *(k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys)])


def _pixel_digest(path: Path) -> str:
    """Hash of the pixels a model sees (edgetl's decoding: alpha on white), so re-encoded copies match."""
    image = load_rgb(path)
    return hashlib.sha256(repr(image.size).encode() + image.tobytes()).hexdigest()


def _copy_to(src: Path) -> Callable[[Path], None]:
    return lambda dst: shutil.copyfile(src, dst)


# ---------------------------------------------------------------- collectors, one per package


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic with the number of dimensions, big-endian sizes, then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    shape = np.frombuffer(raw, ">u4", count=raw[3], offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(shape)


def _png_writer(pixels: np.ndarray) -> Callable[[Path], None]:
    return lambda dst: Image.fromarray(pixels, mode="L").save(dst)


def collect_fashion(spec: FolderSpec, source: Source) -> Collected:
    """Official train images for the pool and t10k images for the test set, minus the built-in's indices."""
    folder = source.root / PACKAGES[source.package]
    with np.load(Path(edgetl.datasets.__file__).parent / "fashion_mnist_mini.npz") as builtin:
        used = {split: set(builtin[f"{split}_source_index"].tolist()) for split in ("train", "test")}
    candidates: dict[str, list[Candidate]] = {"train": [], "test": []}
    draw = spec.draw_as or spec.name
    for split, prefix, per_class in (("train", "train", spec.train_cap), ("test", "t10k", spec.test_per_class)):
        images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
        for label in spec.classes:
            code = FASHION_CLASSES.index(label)
            free = np.array([i for i in np.flatnonzero(labels == code) if int(i) not in used[split]])
            picked = np.sort(_rng(draw, split, label).choice(free, per_class, replace=False))
            candidates[split] += [Candidate(label, f"{split}-{i:05d}", f"{prefix}-{i:05d}.png",
                                            f"{prefix}-images-idx3-ubyte.gz[{i}]", _png_writer(images[i]))
                                  for i in picked.tolist()]
    return Collected(candidates, "28×28 gray", extra={"excluded_builtin_indices": {k: len(v) for k, v in used.items()}})


def _leave_out(excluded: list[dict[str, str]], item: str, reason: str, detail: str = "") -> None:
    excluded.append({"item": item, "reason": reason, "detail": detail})


def _unique_files(files: dict[str, list[Path]], excluded: list[dict], base: Path) -> dict[str, list[Path]]:
    """Drop exact copies (same decoded pixels): within a class keep the first by name; an image in two
    classes leaves both (its label is ambiguous)."""
    digests = {path: _pixel_digest(path) for paths in files.values() for path in paths}
    owners: dict[str, set[str]] = {}
    for label, paths in files.items():
        for path in paths:
            owners.setdefault(digests[path], set()).add(label)
    kept: dict[str, list[Path]] = {}
    for label, paths in files.items():
        seen: set[str] = set()
        kept[label] = []
        for path in sorted(paths):
            digest = digests[path]
            rel = path.relative_to(base).as_posix()
            if len(owners[digest]) > 1:
                _leave_out(excluded, rel, "the same pixels in two classes", ", ".join(sorted(owners[digest])))
            elif digest in seen:
                _leave_out(excluded, rel, "a pixel-identical copy of another image of its class")
            else:
                seen.add(digest)
                kept[label].append(path)
    return kept


NEAR_COPY = 0.01  # mean absolute pixel difference (0..1) below which two images of a class are one picture


def merge_near_copies(candidates: list[Candidate]) -> int:
    """Put images of one class that are near-copies (recoloured or re-exported variants under another
    name) into one group, so none can be in train with its twin in test; returns how many merges.
    Compares what a model sees (edgetl's decoding); images of different sizes are never near-copies."""
    parent: dict[str, str] = {}

    def find(group: str) -> str:
        while parent.setdefault(group, group) != group:
            group = parent[group]
        return group

    merges = 0
    for label in sorted({c.label for c in candidates}):
        members = [c for c in candidates if c.label == label and c.source is not None]
        by_size: dict[tuple[int, int], list[Candidate]] = {}
        pixels = {}
        for c in members:
            image = load_rgb(c.source)
            by_size.setdefault(image.size, []).append(c)
            pixels[c.name] = np.asarray(image, np.float32).ravel() / 255.0
        for group in by_size.values():
            stack = np.stack([pixels[c.name] for c in group])
            for i in range(len(group)):
                close = np.flatnonzero(np.abs(stack[i + 1 :] - stack[i]).mean(axis=1) < NEAR_COPY) + i + 1
                for j in close.tolist():
                    a, b = find(f"{label}|{group[i].group}"), find(f"{label}|{group[j].group}")
                    if a != b:
                        parent[max(a, b)] = min(a, b)
                        merges += 1
    for c in candidates:
        c.group = find(f"{c.label}|{c.group}").split("|", 1)[1]
    return merges


def _images_of_size(paths: list[Path], size: tuple[int, int], excluded: list[dict], base: Path) -> list[Path]:
    kept = []
    for path in paths:
        with Image.open(path) as image:
            if image.size == size:
                kept.append(path)
            else:
                _leave_out(excluded, path.relative_to(base).as_posix(), f"not {size[0]}×{size[1]}",
                           f"{image.size[0]}×{image.size[1]}")
    return kept


def icon_family(stem: str, category: str) -> str:
    """The group of near-copies an icon belongs to.

    Icons whose names differ only in the last dash-separated part are variants of one picture
    (folder-blue / folder-red, network-wireless-connected-25 / -50, view-calendar-day / -week). A mimetype
    icon's name is a MIME type with '/' written as '-', so there the parts are not variants; only a
    document template (…-template) is drawn as its document.
    """
    if category == "mimetypes":
        return stem.removesuffix("-template")
    return stem.rsplit("-", 1)[0] if "-" in stem else stem


def collect_icons(spec: FolderSpec, source: Source) -> Collected:
    """Regular PNG files of one size per category; symbolic links (aliases of other icons) are skipped."""
    base = source.root / PACKAGES[source.package]
    size = f"{spec.icon_size}x{spec.icon_size}"
    excluded: list[dict] = []
    files: dict[str, list[Path]] = {}
    for label in spec.classes:
        folder = base / size / label
        links = [p for p in folder.iterdir() if p.is_symlink()]
        for link in sorted(links):
            _leave_out(excluded, link.relative_to(base).as_posix(), "symbolic link (an alias of another icon)")
        pngs = sorted(p for p in folder.iterdir() if p.suffix == ".png" and p.is_file() and not p.is_symlink())
        files[label] = _images_of_size(pngs, (spec.icon_size, spec.icon_size), excluded, base)
    files = _unique_files(files, excluded, base)
    candidates = [Candidate(label, icon_family(p.stem, label), p.name, p.relative_to(source.root).as_posix(),
                            _copy_to(p), source=p) for label, paths in files.items() for p in paths]
    merged = merge_near_copies(candidates)
    return Collected({"all": candidates}, f"{spec.icon_size}×{spec.icon_size} RGBA", excluded,
                     extra={"near_copy_merges": merged})


def sprite_unit(rel: Path) -> str:
    """A unit's frames share the file-name stem before the first '-' ('+female' variants join it), under
    the same sub-folder: dwarves/berserker/berserker-attack-3.png -> berserker/berserker."""
    stem = rel.stem.split("-", 1)[0].split("+", 1)[0]
    return f"{rel.parent.as_posix()}/{stem}" if rel.parent.as_posix() != "." else stem


MIN_OPAQUE = 0.03  # sprites with less are effect overlays (flames, glows) or the last frames of a death


def _has_a_figure(path: Path, excluded: list[dict], base: Path) -> bool:
    with Image.open(path) as image:
        opaque = float((np.asarray(image.convert("RGBA"))[..., 3] > 0).mean())
    if opaque < MIN_OPAQUE:
        _leave_out(excluded, path.relative_to(base).as_posix(), f"under {MIN_OPAQUE:.0%} opaque pixels",
                   f"{opaque:.1%}")
    return opaque >= MIN_OPAQUE


def wesnoth_lines(core: Path) -> dict[str, str]:
    """'faction|unit' -> the advancement line it belongs to, from the game's own unit files.

    A unit's level-2 and level-3 successors are redrawn from its picture (the Drake Thrasher is the Slasher
    with other arms; the Ulfserker is the Berserker's son), so splitting by unit alone puts near-copies on
    both sides. Every `units/**/*.cfg` joins the unit ids it defines, the ids it `advances_to` and the
    sprites its animations name; sprites in one faction sub-folder (dunefolk/soldier/…) join too.
    """
    parent: dict[str, str] = {}

    def find(node: str) -> str:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    for cfg in sorted((core / "units").rglob("*.cfg")):
        text = cfg.read_text(errors="replace")
        nodes = ["id:" + m.strip() for m in re.findall(r"^\s*id\s*=\s*(.+?)\s*$", text, re.M)]
        for targets in re.findall(r"^\s*advances_to\s*=\s*(.+?)\s*$", text, re.M):
            nodes += ["id:" + t.strip() for t in targets.split(",") if t.strip() not in ("", "null")]
        for path in re.findall(r"units/([A-Za-z0-9_+\-/]+?)\.png", text.replace("[", "").replace("]", "")):
            faction, _, rel = path.partition("/")
            if rel:
                nodes.append(f"img:{faction}|{sprite_unit(Path(rel + '.png'))}")
        for node in nodes[1:]:
            union(nodes[0], node)
    images = core / "images" / "units"
    lines = {}
    for faction in sorted(p for p in images.iterdir() if p.is_dir()):
        for png in sorted(faction.rglob("*.png")):
            unit = sprite_unit(png.relative_to(faction))
            node = f"img:{faction.name}|{unit}"
            find(node)
            if "/" in unit:
                union(node, f"dir:{faction.name}|{unit.split('/')[0]}")
    members: dict[str, list[str]] = {}
    for node in parent:
        if node.startswith("img:"):
            members.setdefault(find(node), []).append(node[4:])
    for nodes in members.values():
        name = min(nodes)  # a stable name: the alphabetically first sprite of the line
        for node in nodes:
            lines[node] = "line:" + name.split("|", 1)[1]
    return lines


def collect_sprites(spec: FolderSpec, source: Source) -> Collected:
    """72×72 unit sprites per faction; at most `frames_per_unit` frames (seeded) of each unit; a unit's whole
    advancement line is one group (never split), each unit a picture inside it."""
    base = source.root / PACKAGES[source.package]
    excluded: list[dict] = []
    files = {}
    for label in spec.classes:
        pngs = sorted(p for p in (base / label).rglob("*.png") if p.is_file() and not p.is_symlink())
        files[label] = [p for p in _images_of_size(pngs, (72, 72), excluded, base) if _has_a_figure(p, excluded, base)]
    files = _unique_files(files, excluded, base)
    lines = wesnoth_lines(base.parents[1])
    candidates = []
    units_per_class = {}
    lines_per_class = {}
    for label, paths in files.items():
        units: dict[str, list[Path]] = {}
        for path in paths:
            units.setdefault(sprite_unit(path.relative_to(base / label)), []).append(path)
        units_per_class[label] = len(units)
        lines_per_class[label] = len({lines.get(f"{label}|{unit}", unit) for unit in units})
        for unit, frames in sorted(units.items()):
            rng = _rng(spec.draw_as or spec.name, label, unit)
            keep = sorted(rng.choice(len(frames), min(len(frames), spec.frames_per_unit), replace=False).tolist())
            dropped = len(frames) - len(keep)
            if dropped:
                _leave_out(excluded, f"{label}/{unit}", f"frames over the cap of {spec.frames_per_unit} per unit",
                           f"{dropped} of {len(frames)}")
            for i in keep:
                rel = frames[i].relative_to(base / label)
                line = lines.get(f"{label}|{unit}", unit)
                candidates.append(Candidate(label, line, rel.as_posix().replace("/", "__"),
                                            frames[i].relative_to(source.root).as_posix(), _copy_to(frames[i]),
                                            subgroup=unit, source=frames[i]))
    merged = merge_near_copies(candidates)
    return Collected({"all": candidates}, "72×72 RGBA / palette with transparency", excluded,
                     extra={"units_per_class": units_per_class, "lines_per_class": lines_per_class,
                            "near_copy_merges": merged})


CARD_RANKS = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "jack", "queen", "king")
CARD_HEIGHT = 64
# Variants of one design (colour schemes of the same drawings) count as one deck in the split.
DECK_FAMILIES = {"svg-oxygen-air": "svg-oxygen", "svg-oxygen-white": "svg-oxygen", "svg-nicu-white": "svg-nicu",
                 "svg-nicu-ornamental": "svg-nicu", "svg-xskat-french": "svg-xskat", "svg-xskat-german": "svg-xskat"}
DECKS_LEFT_OUT = {"svg-xskat-german": "German-suited deck (acorns, leaves, hearts, bells): its card ids name "
                                      "French suits for other symbols"}


def _render_card(svg: Path, card: str, zoom: float) -> Image.Image:
    """One card rendered alone (rsvg-convert --export-id), cropped to its opaque pixels."""
    out = subprocess.run(["rsvg-convert", "--export-id", card, "--zoom", f"{zoom:.4f}", str(svg)],
                         capture_output=True, check=False)
    if out.returncode != 0:
        raise ValueError(out.stderr.decode(errors="replace").strip().splitlines()[-1][:120])
    image = Image.open(io.BytesIO(out.stdout)).convert("RGBA")
    box = image.getchannel("A").getbbox()
    if box is None:
        raise ValueError("rendered nothing")
    return image.crop(box)


def _render_deck(svg: Path) -> list[Image.Image]:
    """All 52 cards at CARD_HEIGHT px (rendered at twice that, then downsampled); ValueError if one looks wrong."""
    first = _render_card(svg, "1_club", 1.0)
    zoom = 2 * CARD_HEIGHT / first.height
    cards = []
    for suit in SUITS:
        for rank in CARD_RANKS:
            image = _render_card(svg, f"{rank}_{suit}", zoom)
            aspect = image.width / image.height
            if not 0.55 <= aspect <= 0.85:
                raise ValueError(f"{rank}_{suit} rendered {image.width}×{image.height}, not a portrait card")
            width = max(1, round(CARD_HEIGHT * aspect))
            cards.append(image.resize((width, CARD_HEIGHT), Image.Resampling.LANCZOS))
    return cards


def _png_image_writer(image: Image.Image) -> Callable[[Path], None]:
    return lambda dst: image.save(dst)


def collect_cards(spec: FolderSpec, source: Source) -> Collected:
    """Every deck rendered with rsvg-convert; decks that do not render cleanly are left out and listed."""
    _need_tool("rsvg-convert", "librsvg2-bin")
    base = source.root / PACKAGES[source.package]
    excluded: list[dict] = []
    candidates = []
    widths: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        for deck_dir in sorted(p for p in base.iterdir() if p.is_dir() and p.name.startswith("svg-")):
            deck = deck_dir.name
            if deck in DECKS_LEFT_OUT:
                _leave_out(excluded, deck, DECKS_LEFT_OUT[deck])
                continue
            svgz = sorted(deck_dir.glob("*.svgz"))
            if not svgz:
                _leave_out(excluded, deck, "no .svgz file")
                continue
            svg = Path(tmp) / f"{deck}.svg"
            svg.write_bytes(gzip.decompress(svgz[0].read_bytes()))
            try:
                cards = _render_deck(svg)
            except ValueError as error:
                _leave_out(excluded, deck, "rsvg-convert did not render it cleanly", str(error).replace(str(svg), deck))
                continue
            print(f"rendered {deck}", file=sys.stderr)
            for index, image in enumerate(cards):
                suit, rank = SUITS[index // 13], CARD_RANKS[index % 13]
                widths.append(image.width)
                candidates.append(Candidate(suit, DECK_FAMILIES.get(deck, deck), f"{deck[4:]}-{rank}.png",
                                            f"{svgz[0].relative_to(source.root).as_posix()}#{rank}_{suit}",
                                            _png_image_writer(image)))
    version = subprocess.run(["rsvg-convert", "--version"], capture_output=True, text=True).stdout.strip()
    size = f"{min(widths)}–{max(widths)}×{CARD_HEIGHT} RGBA" if widths else "none"
    decks = sorted({c.origin.split("/")[3] for c in candidates})
    licences = {deck: source.licence(f"carddecks/{deck}/{deck}.svgz") for deck in decks}  # per deck (DEP-5)
    summary = ", ".join(f"{name} ({sum(1 for v in licences.values() if v == name)} decks)"
                        for name in sorted(set(licences.values())))
    return Collected({"all": candidates}, size, excluded, licence=summary,
                     extra={"renderer": version, "decks": decks, "deck_licences": licences})


COLLECTORS = {"dataset-fashion-mnist": collect_fashion, "oxygen-icon-theme": collect_icons,
              "wesnoth-1.16-data": collect_sprites, "kdegames-card-data-kf5": collect_cards}


# ---------------------------------------------------------------- split, pool order, subsets


def round_robin(items: list[dict], rng: np.random.Generator) -> list[dict]:
    """Pictures (sub-groups, else groups) in a seeded order, items of each shuffled; then one item of each
    per round, so N images are N different pictures where the pool has them."""
    groups: dict[str, list[dict]] = {}
    for item in items:
        groups.setdefault(item.get("subgroup") or item["group"], []).append(item)
    names = sorted(groups)
    queues = []
    for g in rng.permutation(len(names)).tolist():
        members = sorted(groups[names[g]], key=lambda item: item["file"])
        queues.append([members[i] for i in rng.permutation(len(members)).tolist()])
    order = []
    for depth in range(max((len(q) for q in queues), default=0)):
        order += [q[depth] for q in queues if depth < len(q)]
    return order


def _cap_per_picture(items: list[Candidate], cap: int, rng: np.random.Generator) -> list[Candidate]:
    """At most `cap` (seeded) images of each picture, in name order; all of them when cap is 0."""
    if not cap:
        return items
    pictures: dict[str, list[Candidate]] = {}
    for item in items:
        pictures.setdefault(item.picture, []).append(item)
    kept = []
    for name in sorted(pictures):
        members = pictures[name]
        kept += [members[i] for i in sorted(rng.permutation(len(members))[:cap].tolist())]
    return kept


def _shared_test_groups(candidates: list[Candidate], spec: FolderSpec) -> set[str]:
    """For folders whose groups span classes (a deck holds every suit): one seeded set of test groups
    for all classes, so a deck's clubs are never in test while its spades train."""
    names = sorted({c.group for c in candidates})
    most = max(1, int(len(names) * spec.test_group_share))
    chosen: set[str] = set()
    for g in _rng(spec.draw_as or spec.name, "test", "shared").permutation(len(names)).tolist():
        counts = [sum(1 for c in candidates if c.label == label and c.group in chosen) for label in spec.classes]
        if min(counts) >= spec.test_per_class or len(chosen) >= most:
            break
        chosen.add(names[g])
    return chosen


def split_by_group(candidates: list[Candidate], spec: FolderSpec) -> tuple[list[Candidate], list[Candidate], int]:
    """Whole groups to the test set (seeded order) until it holds `test_per_class` images or
    `test_group_share` of the class's groups (so a class of few large groups keeps most for training and
    tests on fewer images); with `shared_groups` one set of test groups serves every class. Returns
    (train, test, images dropped: a test picture's images over `test_per_group` (seeded pick), or the last
    test group's overshoot; the dropped images go to neither side, so no group is split)."""
    shared = _shared_test_groups(candidates, spec) if spec.shared_groups else None
    train: list[Candidate] = []
    test: list[Candidate] = []
    dropped = 0
    for label in spec.classes:
        members = [c for c in candidates if c.label == label]
        groups = sorted({c.group for c in members})
        picked: list[Candidate] = []
        most = max(1, int(len(groups) * spec.test_group_share))
        taken = 0
        order = _rng(spec.draw_as or spec.name, "test", label).permutation(len(groups)).tolist()
        for g in order:
            items = sorted((c for c in members if c.group == groups[g]), key=lambda c: c.name)
            to_test = groups[g] in shared if shared is not None else len(picked) < spec.test_per_class and taken < most
            if to_test:
                taken += 1
                kept = _cap_per_picture(items, spec.test_per_group, _rng(spec.draw_as or spec.name, "cap", groups[g]))
                picked += kept
                dropped += len(items) - len(kept)
            else:
                train += items
        dropped += max(0, len(picked) - spec.test_per_class)
        test += picked[: spec.test_per_class]
        left = sum(1 for c in train if c.label == label)
        if min(len(picked), spec.test_per_class) < MIN_TEST or left < 5:
            sys.exit(f"{spec.name}: class {label!r} has {len(members)} images in {len(groups)} groups; not enough "
                     f"for {MIN_TEST} test images and 5 training images")
    return train, test, dropped


def subset_files(meta: dict, per_class: int, seed: int) -> dict[str, list[str]]:
    """The training files of the N-per-class subset for `seed` (all there are when the pool is smaller).

    Nested: for one seed, the first N of one fixed round-robin order. A minority class (unbalanced
    folders) gets ceil(N × fraction).
    """
    chosen = {}
    minority = meta.get("minority") or {}
    for index, label in enumerate(meta["classes"]):
        items = meta["train"][label]
        wanted = math.ceil(per_class * minority[label]) if label in minority else per_class
        order = round_robin(items, np.random.default_rng([seed, SUBSET_SALT, index]))
        chosen[label] = [item["file"] for item in order[:wanted]]
    return chosen


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def make_subset(folder: Path, per_class: int, seed: int, out: Path) -> dict:
    """Write OUT/train/<class>/ (the subset) and OUT/test/<class>/ (the folder's whole test set) as hard
    links (copies across file systems); returns what it holds. An existing identical subset is reused."""
    meta = read_meta(folder)
    chosen = subset_files(meta, per_class, seed)
    info = {"folder": meta["name"], "folder_key": meta["build_key"], "folder_content": meta["content_key"],
            "per_class_requested": per_class, "seed": seed,
            "train_per_class": {label: len(files) for label, files in chosen.items()},
            "test_per_class": {label: len(files) for label, files in meta["test"].items()},
            "train_files": chosen}
    existing = out / "subset.json"
    if existing.is_file() and json.loads(existing.read_text()) == info:
        return info
    with atomic_dir(out) as tmp:
        for files in chosen.values():
            for rel in files:
                _link_or_copy(folder / rel, tmp / rel)
        for files in meta["test"].values():
            for rel in files:
                _link_or_copy(folder / rel, tmp / rel)
        (tmp / "subset.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# ---------------------------------------------------------------- building


def content_key(root: Path) -> str:
    """sha256 over every train/ and test/ file (relative path and bytes): what a result was measured on."""
    digest = hashlib.sha256()
    for path in sorted(p for split in ("train", "test") for p in (Path(root) / split).rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def read_meta(folder: Path) -> dict:
    return json.loads((Path(folder) / "folder.json").read_text())


def _build_key(spec: FolderSpec, source: Source) -> str:
    payload = json.dumps([FORMAT, BUILD_SEED, repr(spec), source.package, source.version])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_folder(spec: FolderSpec, cache: Path, source_root: Path | None, force: bool = False) -> Path:
    """Write one folder into the cache (atomically), unless an identical build is already there."""
    source = fetch_source(spec.package, cache, source_root)
    target = cache / spec.name
    key = _build_key(spec, source)
    if not force and (target / "folder.json").is_file() and read_meta(target).get("build_key") == key:
        return target
    collected = COLLECTORS[spec.package](spec, source)
    if "all" in collected.candidates:
        train, test, dropped = split_by_group(collected.candidates["all"], spec)
    else:
        train, test, dropped = collected.candidates["train"], collected.candidates["test"], 0
    meta: dict = {"name": spec.name, "format": FORMAT, "build_key": key, "classes": list(spec.classes),
                  "train": {}, "test": {}, "minority": {}}
    with atomic_dir(target) as tmp:
        for label in spec.classes:
            pool = [{"file": f"train/{label}/{c.name}", "group": c.group, "subgroup": c.picture, "origin": c.origin,
                     "write": c.write}
                    for c in train if c.label == label]
            pool = round_robin(pool, _rng(spec.draw_as or spec.name, "pool", label))[: spec.train_cap]
            if spec.minority and spec.minority[0] == label:
                pool = pool[: math.ceil(len(pool) * spec.minority[1])]
                meta["minority"][label] = spec.minority[1]
            for item in pool:
                (tmp / item["file"]).parent.mkdir(parents=True, exist_ok=True)
                item.pop("write")(tmp / item["file"])
            meta["train"][label] = sorted(pool, key=lambda item: item["file"])
            tests = [c for c in test if c.label == label]
            for c in tests:
                (tmp / "test" / label).mkdir(parents=True, exist_ok=True)
                c.write(tmp / "test" / label / c.name)
            meta["test"][label] = sorted(f"test/{label}/{c.name}" for c in tests)
        groups = {label: len({item["group"] for item in meta["train"][label]}) for label in spec.classes}
        test_groups = {label: len({c.group for c in test if c.label == label}) for label in spec.classes}
        pictures = {"train": {k: len({item["subgroup"] for item in meta["train"][k]}) for k in spec.classes},
                    "test": {k: len({c.picture for c in test if c.label == k}) for k in spec.classes}}
        meta.update({
            "why": spec.why,
            "source_size": collected.source_size,
            "available": {"train": {k: len(v) for k, v in meta["train"].items()},
                          "test": {k: len(v) for k, v in meta["test"].items()}},
            "groups": {"train": groups, "test": test_groups},
            "pictures": pictures,
            "source": {"package": source.package, "version": source.version, "origin": source.origin,
                       "licence": collected.licence or source.licence(), "path": PACKAGES[source.package]},
            "draw": {"build_seed": BUILD_SEED, "test_per_class": spec.test_per_class, "train_cap": spec.train_cap,
                     "icon_size": spec.icon_size or None, "frames_per_unit": spec.frames_per_unit or None,
                     "test_per_group": spec.test_per_group or None, "draws_shared_with": spec.draw_as,
                     "dropped_from_test_groups": dropped},
            "excluded": collected.excluded,
            **collected.extra,
        })
        meta["content_key"] = content_key(tmp)
        if source.copyright.is_file():
            shutil.copyfile(source.copyright, tmp / "COPYRIGHT")
        (tmp / "folder.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        (tmp / "PROVENANCE.md").write_text(provenance(meta))
    return target


def provenance(meta: dict) -> str:
    """The folder's story in words, for whoever opens it."""
    src, draw = meta["source"], meta["draw"]
    lines = [
        f"# {meta['name']}", "",
        meta["why"], "",
        f"- Source: Debian package `{src['package']}` {src['version']} ({src['origin']}), files under "
        f"`/{src['path']}`.",
        f"- Licence: {src['licence']} (the package's Debian copyright file is copied here as COPYRIGHT).",
        f"- Images: {meta['source_size']}, written as PNG without changes to their pixels"
        + (" (cards: rendered from SVG, see below)." if "renderer" in meta else "."),
        f"- Classes: {', '.join(meta['classes'])}.",
        f"- Test: a fixed set of up to {draw['test_per_class']} images per class, disjoint from train/; whole groups "
        "(near-copies: icon variants, a unit's advancement line, one deck design) are on one side only"
        + (f", at most {draw['test_per_group']} test images of one picture." if draw.get("test_per_group") else "."),
        f"- Train: a pool of up to {draw['train_cap']} images per class; `benchmarks/folders.py subset` draws "
        "nested, seeded N-per-class subsets from it, pictures (an icon, a unit, a card) round-robin.",
        f"- Drawn with seed {draw['build_seed']} (folder format {meta['format']}); rebuilding gives the same files.",
    ]
    if meta["minority"]:
        lines.append(f"- Unbalanced: {', '.join(f'{k} keeps {v:g} of the images' for k, v in meta['minority'].items())}"
                     " (in the pool and in every subset); the test set stays balanced.")
    if "excluded_builtin_indices" in meta:
        lines.append("- The official indices that builtin:fashion-mnist-mini uses are excluded "
                     f"({meta['excluded_builtin_indices']['train']} train, {meta['excluded_builtin_indices']['test']} "
                     "test).")
    if "renderer" in meta:
        lines.append(f"- Rendered with {meta['renderer']} (`--export-id`), cropped to the card, resized to "
                     f"{CARD_HEIGHT} px high. Decks: {', '.join(meta['decks'])}.")
    lines += ["", "| class | train images (groups / pictures) | test images (groups / pictures) |", "|---|---:|---:|"]
    for label in meta["classes"]:
        cells = [f"{meta['available'][side][label]} ({meta['groups'][side][label]} / {meta['pictures'][side][label]})"
                 for side in ("train", "test")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    reasons: dict[str, list[dict]] = {}
    for entry in meta["excluded"]:
        reasons.setdefault(entry["reason"], []).append(entry)
    if reasons:
        lines += ["", f"Left out of the source ({len(meta['excluded'])} entries; folder.json lists them all):", ""]
    for reason, entries in reasons.items():
        shown = "; ".join(e["item"] + (f" ({e['detail']})" if e["detail"] else "") for e in entries[:8])
        lines.append(f"- {reason}: {len(entries)} — {shown}{'; …' if len(entries) > 8 else ''}")
    return "\n".join(lines) + "\n"


def table(cache: Path, names: list[str]) -> str:
    """One Markdown row per built folder: classes, images per class available, source size, licence."""
    rows = ["| folder | classes | train images per class (min–max) | test per class | groups train/test "
            "| source size | package | licence |", "|---|---:|---|---|---|---|---|---|"]
    for name in names:
        if not (cache / name / "folder.json").is_file():
            rows.append(f"| {name} | not built | | | | | | |")
            continue
        meta = read_meta(cache / name)
        train, test = meta["available"]["train"], meta["available"]["test"]
        groups = meta["groups"]
        rows.append(
            f"| {name} | {len(meta['classes'])} | {min(train.values())}–{max(train.values())} | "
            f"{min(test.values())}–{max(test.values())} | {sum(groups['train'].values())}/"
            f"{sum(groups['test'].values())} | {meta['source_size']} | {meta['source']['package']} "
            f"{meta['source']['version']} | {meta['source']['licence']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write the folders into the cache")
    build.add_argument("--folders", nargs="+", default=list(FOLDERS), choices=list(FOLDERS), metavar="NAME")
    build.add_argument("--source-root", type=Path, help="a tree where the packages are already unpacked")
    build.add_argument("--force", action="store_true", help="rebuild even when an identical build exists")
    show = sub.add_parser("table", help="print what each built folder holds")
    show.add_argument("--folders", nargs="+", default=list(FOLDERS), choices=list(FOLDERS), metavar="NAME")
    subset = sub.add_parser("subset", help="write one N-per-class training subset with the test set")
    subset.add_argument("folder", choices=list(FOLDERS))
    subset.add_argument("--per-class", type=int, required=True)
    subset.add_argument("--seed", type=int, default=0)
    subset.add_argument("--out", type=Path, required=True)
    for p in (build, show, subset):
        p.add_argument("--cache", type=Path, default=default_cache(), help="default: %(default)s")
    args = parser.parse_args()
    if args.command == "build":
        for name in args.folders:
            if FOLDERS[name].package == "kdegames-card-data-kf5" and shutil.which("rsvg-convert") is None:
                print(f"skipping {name}: rsvg-convert not found (apt-get install librsvg2-bin)", file=sys.stderr)
                continue
            print(f"{name}: {build_folder(FOLDERS[name], args.cache, args.source_root, args.force)}", file=sys.stderr)
        print(table(args.cache, args.folders))
    elif args.command == "table":
        print(table(args.cache, args.folders))
    else:
        info = make_subset(args.cache / args.folder, args.per_class, args.seed, args.out)
        print(json.dumps({k: v for k, v in info.items() if k != "train_files"}, indent=1))


if __name__ == "__main__":
    main()
