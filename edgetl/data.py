"""Image folders: listing, labels, deterministic stratified splits, robust decoding and preprocessing.

Framework-free (Pillow + numpy) so both backends, the exporter and the verifier apply exactly the same
preprocessing that the checkpoint manifest describes.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from edgetl.errors import UserError
from edgetl.labels import check_labels

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")

# A truncated file must fail loudly so that it is skipped, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

MAX_DECODED_PIXELS = 64_000_000
"""The most pixels one image may hold as decoded; a larger one is skipped with its size and this limit.

Counted at the scale the file is decoded at: a JPEG at 1/8 (its DCT draft), so a 200-megapixel phone JPEG
decodes at 3 MP, but every pixel of a PNG, WebP, TIFF, BMP or GIF. 64 MP takes the 12 MP (4032 × 3024)
photos of a phone, its 48-50 MP sensor modes (8160 × 6120) and a 61 MP full-frame camera's frame in any
format, and sits below Pillow's decompression-bomb warning (89.5 MP). Decoded, such an image holds 192 MB
(256 MB with alpha) for a moment before it is reduced to the run's size. An 11000 × 11000 PNG (121 MP, a few
hundred kB on disk) took a tiny fine-tuning run from 0.47 to 1.45 GB at its peak, for a picture the model
sees at 224 px at most.
"""

# exif_transpose's transposition for each EXIF orientation
_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_90}
# 8 bits a band, straight or premultiplied alpha: averaging their pixels, as reduce does, is right
_REDUCIBLE = ("L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


def too_large(width: int, height: int, scale: int = 1) -> str | None:
    """Why an image of this size is not decoded, or None: over MAX_DECODED_PIXELS at 1/`scale` of its sides."""
    pixels = math.ceil(width / scale) * math.ceil(height / scale)
    if pixels <= MAX_DECODED_PIXELS:
        return None
    size = f"{width}x{height} pixels ({width * height / 1e6:.0f} MP)"
    if scale > 1:
        size += f", {pixels / 1e6:.0f} MP at 1/{scale} scale,"
    return (f"too large: {size} over the {MAX_DECODED_PIXELS / 1e6:.0f} MP an image may hold decoded "
            "(edgetl.data.MAX_DECODED_PIXELS); downscale it")


def _reduced(image: Image.Image, factor: int) -> Image.Image:
    """`image` (loaded) shrunk `factor` times by averaging, then turned upright as `ImageOps.exif_transpose`
    would turn it. Only the small image is converted and turned: the full-size pixels are copied once at
    most (a palette expanded, alpha premultiplied), where the full-size path copies them two or three times."""
    try:
        turn = _TURNS.get(image.getexif().get(0x0112))
    except Exception:  # a damaged EXIF block: left as it is
        turn = None
    if "transparency" in image.info or image.mode not in _REDUCIBLE:  # palette indices cannot be averaged
        has_alpha = "transparency" in image.info or "A" in image.getbands()
        image = image.convert("RGBA" if has_alpha else "L" if image.mode == "1" else "RGB")
    image = image.reduce(factor)
    return image.transpose(turn) if turn is not None else image


@dataclass
class DatasetListing:
    """What a data folder holds: labels, the three splits as (relative path, label) and skipped files."""

    root: Path
    source: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    split_origin: str  # "folders" when train/val/test trees were given, else how the split was made
    skipped: list[dict[str, str]] = field(default_factory=list)  # files that could have been images, and why not
    ignored: list[dict[str, str]] = field(default_factory=list)  # hidden entries, empty class folders, stray files
    warnings: list[str] = field(default_factory=list)  # what the user should know before training, one line each

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class per split, for the manifest."""
        table: dict[str, dict[str, int]] = {}
        for split, records in self.splits.items():
            per_class = dict.fromkeys(self.classes, 0)
            for _, label in records:
                per_class[self.classes[label]] += 1
            table[split] = per_class
        return table

    def drop(self, bad: dict[str, str]) -> None:
        """Remove files that failed to decode from every split and record why."""
        if not bad:
            return
        for split in self.splits:
            self.splits[split] = [(p, y) for p, y in self.splits[split] if p not in bad]
        self.skipped.extend({"path": p, "reason": r} for p, r in sorted(bad.items()))

    def to_json(self) -> dict:
        return {
            "root": str(self.root),
            "source": self.source,
            "classes": self.classes,
            "split_origin": self.split_origin,
            "splits": {k: [[p, y] for p, y in v] for k, v in self.splits.items()},
        }

    @classmethod
    def from_json(cls, payload: dict) -> DatasetListing:
        return cls(
            root=Path(payload["root"]),
            source=payload["source"],
            classes=list(payload["classes"]),
            splits={k: [(p, int(y)) for p, y in v] for k, v in payload["splits"].items()},
            split_origin=payload["split_origin"],
        )


def load_rgb(path: Path, draft: int | None = None) -> Image.Image:
    """Decode any supported file to an upright 8-bit RGB image, as a photo viewer shows it.

    First frame of animations, EXIF orientation applied, alpha (and palette or colour-key transparency)
    composited on white, palette/grayscale/CMYK/YCbCr/LAB converted. 16-bit, 32-bit integer and float
    grayscale are scaled to 8 bits by their own range (Pillow's convert("RGB") would clip them to 0/255).
    `draft`: the smallest side the caller needs; a JPEG is then decoded at the largest DCT scale (1/2, 1/4
    or 1/8) that still gives both sides at least that, four to sixty times less work on a phone photo. Other
    formats have no scaled decoding: an image at least twice `draft` on both sides is reduced by an integer
    factor as soon as it is decoded, so its full-size pixels are held once, not three times.
    Raises OSError/ValueError for unreadable files, DecodeError for one over MAX_DECODED_PIXELS.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns on odd EXIF / palette transparency; not our user's problem
        with Image.open(path) as image:
            image.seek(0)
            header = image.size
            if draft is not None:
                image.draft(None, (draft, draft))  # a no-op for formats without scaled decoding
            problem = too_large(*image.size)  # the size it decodes at, draft applied
            if problem:
                raise DecodeError(problem)
            image.load()
            if image.mode.startswith("I") or image.mode == "F":  # before exif_transpose: its copy has no TIFF tags
                image = _gray_to_8bit(image)
            factor = min(image.width // draft, image.height // draft) if draft and image.size == header else 1
            image = _reduced(image, factor) if factor >= 2 else ImageOps.exif_transpose(image)
            if image.mode == "La":  # premultiplied alpha: Pillow converts it only to LA
                image = image.convert("LA")
            if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
                rgba = image.convert("RGBA")
                canvas = Image.new("RGB", rgba.size, (255, 255, 255))
                canvas.paste(rgba, mask=rgba.getchannel("A"))
                return canvas
            return image.convert("RGB")


# An image is kept, decoded, at no more than this much above the input size on either side: the random
# resized crop (at least 80% of the area, so at least 0.89 of a side) then still samples the crop down.
CACHE_MARGIN = 1.15


def cache_side(image_size: int) -> int:
    """The largest side, in pixels, that an image is kept at for a model input of `image_size`."""
    return int(math.ceil(image_size * CACHE_MARGIN))


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as `load_rgb` returns it, read from the header alone (EXIF rotation
    counted, except an EXIF block that a PNG stores after its pixels: finding it means decoding them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as image:
            width, height = image.size
            try:  # Image's own getexif: a PNG's decodes every pixel to look for EXIF after them
                turned = Image.Image.getexif(image).get(0x0112) in (5, 6, 7, 8)
            except Exception:  # a damaged EXIF block: exif_transpose ignores it too
                turned = False
    return (height, width) if turned else (width, height)


def decode_small(path: Path, side: int, size: tuple[int, int] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as uint8 HWC pixels with each side at most `side`, and the (width, height) it was decoded at.

    Each side is reduced on its own (to `size` when given): the model input is the whole
    image resized to a square, so a side needs no more pixels than the input has. The decoded size keeps the
    image's proportions, so augmentation samples its crops in them.
    """
    image = load_rgb(path, draft=side)
    source = image.size
    target = size or (min(image.width, side), min(image.height, side))
    if image.size != target:
        image = image.resize(target, Image.Resampling.BILINEAR)
    return np.asarray(image), source


def _tag(image: Image.Image, number: int) -> float | None:
    """A numeric TIFF tag (BitsPerSample 258, SampleFormat 339, SMin/SMaxSampleValue 340/341), if the file has it."""
    value = (getattr(image, "tag_v2", None) or {}).get(number)
    if isinstance(value, tuple):
        value = value[0] if value else None
    return float(value) if isinstance(value, int | float) else None


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer or float grayscale as 8-bit L, keeping each pixel's place in the file's range.

    Integers are scaled by their bit depth (the file's BitsPerSample; 16 when an untagged image fits it),
    signed ones shifted first. Floats use the file's SMin/SMaxSampleValue, else [0, 1] when every value lies
    there (the usual float convention), else they are taken as 0-255 values; NaN becomes black.
    """
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = values.astype(np.float64) / 257.0
    elif image.mode == "I":
        bits = int(_tag(image, 258) or (16 if values.size and values.min() >= 0 and values.max() <= 65535 else 32))
        if _tag(image, 339) == 2:  # signed integers
            wide = values.astype(np.float64) + float(1 << (bits - 1))
        elif bits == 32:  # Pillow holds unsigned 32-bit samples in int32
            wide = values.astype(np.int32).view(np.uint32).astype(np.float64)
        else:
            wide = values.astype(np.float64)
        scaled = wide / float((1 << bits) - 1) * 255.0
    else:  # "F"
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        low, high = _tag(image, 340), _tag(image, 341)
        if low is not None and high is not None and high > low:
            scaled = (values - low) / (high - low) * 255.0
        elif finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            scaled = values * 255.0
        else:
            scaled = values
        scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8))


def _relative(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def _inside(real: str, top: str) -> bool:
    """Whether the resolved path `real` is the folder `top` (resolved) or lies below it."""
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class _Entry:
    """A folder entry that `stat` reached: its path, what it is, and whether the entry itself is a symlink."""

    path: Path
    info: os.stat_result
    link: bool

    @property
    def key(self) -> tuple[int, int]:
        """The file or folder itself, whichever path reached it (hard links and symlinks share it)."""
        return (self.info.st_dev, self.info.st_ino)


@dataclass(frozen=True)
class _File:
    """An image file found in a class folder; `linked` when a symlink on its path inside the class reached it."""

    path: Path
    key: tuple[int, int]
    linked: bool


def _read_folder(folder: Path, base: Path, listing: _Found) -> tuple[list[_Entry], list[_Entry]]:
    """One level of `folder`: its sub-folders and regular files, symlinks followed.

    Hidden entries (a leading dot) are ignored and listed; dangling or looping symlinks, unreadable entries
    and special files (fifos, devices) are skipped and listed with the reason.
    """
    folders: list[_Entry] = []
    files: list[_Entry] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        listing.skip(folder, base, f"folder cannot be read ({error.strerror})")
        return folders, files
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            hidden_dir = entry.is_dir() and not entry.is_symlink()
            listing.ignore(path, base, "hidden folder" if hidden_dir else "hidden file")
            continue
        try:
            info = path.stat()
        except OSError as error:
            if not entry.is_symlink():
                listing.skip(path, base, f"cannot be read ({error.strerror})")
            elif error.errno == errno.ELOOP:
                listing.skip(path, base, "symlink loop (it resolves to itself)")
            else:
                listing.skip(path, base, f"dangling symlink (its target {os.readlink(path)!r} does not exist)")
            continue
        if stat.S_ISDIR(info.st_mode):
            folders.append(_Entry(path, info, entry.is_symlink()))
        elif stat.S_ISREG(info.st_mode):
            files.append(_Entry(path, info, entry.is_symlink()))
        else:
            listing.skip(path, base, "not a regular file (a fifo, socket or device)")
    return folders, files


@dataclass
class _Found:
    """What a walk of the data folder found besides images: skipped and ignored entries, with reasons, and
    every folder walked so far (by identity, with the path it was first walked at)."""

    skipped: list[dict[str, str]] = field(default_factory=list)
    ignored: list[dict[str, str]] = field(default_factory=list)
    walked: dict[tuple[int, int], str] = field(default_factory=dict)

    def skip(self, path: Path, base: Path, reason: str) -> None:
        self.skipped.append({"path": _relative(path, base), "reason": reason})

    def ignore(self, path: Path, base: Path, reason: str) -> None:
        self.ignored.append({"path": _relative(path, base), "reason": reason})


def _leaves(path: Path, base: Path, found: _Found) -> None:
    found.skip(path, base, f"symlink leaves its class folder (it points to {os.readlink(path)!r}): a class "
                           "folder's images are the files inside it")


def _images_under(folder: Path, base: Path, found: _Found) -> list[_File]:
    """Every image file under the class folder `folder` at any depth, each file and folder taken once.

    Hidden entries are ignored. A symlink is followed while it stays inside the class folder (resolved);
    one that leaves it is skipped and listed, since the images it reaches belong to another class or to
    none. A folder already walked is not walked again: a link to a folder that holds it is a loop, a link to
    another one reaches the same files twice; both are skipped and listed. Folders reached without a
    symlink are walked first, so a file is listed at its own place rather than through a link.

    Walked with a stack, not recursion: a folder nested thousands of levels deep is listed like any other,
    in the same order (depth first, names sorted, a folder's files before its sub-folders).
    """
    top = os.path.realpath(folder)
    images: list[_File] = []
    pending: list[tuple[_Entry, str, bool]] = [(_Entry(folder, folder.stat(), False), top, False)]
    linked: list[tuple[_Entry, str, bool]] = []  # symlinked folders, walked once no other folder is left
    while pending or linked:
        here, real, via_link = pending.pop() if pending else linked.pop(0)
        first = found.walked.get(here.key)
        if first is not None:
            rel = _relative(here.path, base)
            if rel.startswith(first + "/"):
                found.skip(here.path, base, "symlink loop (it points back to a folder that holds it)")
            else:
                found.skip(here.path, base, f"symlink to the folder {first!r}, already listed: its images are "
                                            "taken once, from there")
            continue
        found.walked[here.key] = _relative(here.path, base)
        folders, files = _read_folder(here.path, base, found)
        for entry in files:
            if entry.path.suffix.lower() not in IMAGE_EXTENSIONS:
                found.skip(entry.path, base, f"not an image extension ({entry.path.suffix or 'none'})")
            elif entry.link and not _inside(os.path.realpath(entry.path), top):
                _leaves(entry.path, base, found)
            else:
                images.append(_File(entry.path, entry.key, via_link or entry.link))
        below: list[tuple[_Entry, str, bool]] = []
        for entry in folders:
            if not entry.link:
                below.append((entry, os.path.join(real, entry.path.name), via_link))
                continue
            target = os.path.realpath(entry.path)
            if _inside(target, top):
                linked.append((entry, target, True))
            else:
                _leaves(entry.path, base, found)
        pending += reversed(below)
    return images


def _once(records: list[tuple[_File, int]], base: Path, found: _Found, names: list[str],
          taken: dict[tuple[int, int], str]) -> list[tuple[_File, int]]:
    """`records` with every file listed at most once: one image never carries two labels nor sits twice in the
    data (where it could land in train and in test).

    A file reached at several paths (symlinks inside its class folder, hard links) of one class keeps its
    own place, or the first path when every one is a link; in several classes it is skipped at each, since
    no label is the right one. `taken`: files listed (or refused) by an earlier split, updated here.
    """
    groups: dict[tuple[int, int], list[tuple[_File, int]]] = {}
    for file, label in records:
        groups.setdefault(file.key, []).append((file, label))
    kept: list[tuple[_File, int]] = []
    for file, label in records:
        group = groups[file.key]
        if file.key in taken:
            found.skip(file.path, base, f"the same file as {taken[file.key]!r} (a symlink or hard link): a file "
                                        "is listed once")
            continue
        labels = sorted({names[other] for _, other in group})
        if len(labels) > 1:
            found.skip(file.path, base, f"the same file is in the class folders {', '.join(labels)} (a hard "
                                        "link): an image cannot carry two labels")
            continue
        best = min(group, key=lambda item: item[0].linked)[0]  # its own place, else the first link
        if best is not file:
            found.skip(file.path, base, f"the same file as {_relative(best.path, base)!r}, reached twice (a "
                                        "symlink or hard link): a file is listed once")
            continue
        kept.append((file, label))
    for key, group in groups.items():
        taken.setdefault(key, _relative(group[0][0].path, base))
    return kept


def _class_dirs(root: Path, base: Path, found: _Found) -> list[Path]:
    """The class folders of `root` (hidden ones ignored); files lying beside them are ignored and listed."""
    folders, files = _read_folder(root, base, found)
    for entry in files:
        found.ignore(entry.path, base, "not inside a class folder")
    return [entry.path for entry in folders]


def _check_distinct(folders: list[Path], base: Path) -> None:
    """Refuse class folders that are one folder, or one inside another, through a symlink.

    Refused, not skipped: the folder names are the labels the user means the model to give, so dropping
    one would ship a model without a class they expect, and keeping both would give each shared image two
    labels (or, across train/, val/ and test/, put it in two splits). Only the user knows which name is right.
    """
    resolved = sorted((Path(os.path.realpath(folder)).parts, _relative(folder, base), folder.is_symlink())
                      for folder in folders)
    for (outer, outer_rel, outer_link), (inner, inner_rel, inner_link) in zip(resolved, resolved[1:], strict=False):
        if inner[: len(outer)] != outer:
            continue  # in this order a folder's descendants follow it directly: neighbours suffice
        note = ""
        if inner_link != outer_link:  # name the symlink first
            link, other = (inner_rel, outer_rel) if inner_link else (outer_rel, inner_rel)
            how = ("is a symlink to" if inner == outer else "is a symlink into" if inner_link
                   else "is a symlink to a folder that holds")
        else:  # a symlink higher up (a split folder, say)
            link, other = sorted((outer_rel, inner_rel))
            how = "is the same folder as" if inner == outer else "holds" if link == outer_rel else "lies inside"
            note = " (through a symlink)"
        where = "sit in two splits" if link.rsplit("/", 1)[-1] == other.rsplit("/", 1)[-1] else "carry two labels"
        raise UserError(f"class folder {link!r} {how} class folder {other!r}{note}: their images would {where}; "
                        f"remove the symlink, or give {link!r} images of its own")


def _list_tree(root: Path, base: Path, classes: list[str], found: _Found) -> list[tuple[_File, int]]:
    """(image, label) for every image under root/<class>/, at any depth."""
    records: list[tuple[_File, int]] = []
    for label, name in enumerate(classes):
        folder = root / name
        if folder.is_dir():
            records += [(file, label) for file in _images_under(folder, base, found)]
    return records


def _check_class_names(names: list[str], where: Path) -> None:
    check_labels(names, f"data folder {str(where)!r}",
                 "the class folder names are the labels: rename that folder")


def _probe(base: Path, records: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[dict[str, str]]]:
    """Header check of every file (cheap: no pixel decoding), sizes over MAX_DECODED_PIXELS skipped with the
    reason; full decode errors are caught later."""
    good: list[tuple[str, int]] = []
    bad: list[dict[str, str]] = []
    for rel, label in records:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(base / rel) as image:
                    problem = too_large(*image.size, 8 if image.format in ("JPEG", "MPO") else 1)  # its draft
            if problem:
                bad.append({"path": rel, "reason": problem})
                continue
            good.append((rel, label))
        except Exception as error:  # Pillow raises several types for garbage files
            bad.append({"path": rel, "reason": f"unreadable: {type(error).__name__}: {error}"[:200]})
    return good, bad


def _stratified_take(
    records: list[tuple[str, int]], fraction: float, rng: np.random.Generator, num_classes: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split off `fraction` of every class (at least one image each) deterministically."""
    kept: list[tuple[str, int]] = []
    taken: list[tuple[str, int]] = []
    for label in range(num_classes):
        members = sorted(r for r in records if r[1] == label)
        order = rng.permutation(len(members))
        n_take = max(1, int(round(fraction * len(members))))
        taken += [members[i] for i in order[:n_take]]
        kept += [members[i] for i in order[n_take:]]
    return sorted(kept), sorted(taken)


def _missing_classes(listed: dict[str, list[tuple[str, int]]], classes: list[str]) -> list[str]:
    """One warning, printed now, for each given val/ or test/ tree that has no readable image of some class.

    Not an error: a user may hold back a class on purpose. But nothing else would tell them: validation
    would pick the weights blind to that class, and the test figures would say nothing about it.
    """
    notes: list[str] = []
    for split, effect in (("val", "the weights are chosen without seeing how it fares"),
                          ("test", "the test figures say nothing about it")):
        if split not in listed:
            continue
        lacking = [name for label, name in enumerate(classes) if not any(y == label for _, y in listed[split])]
        if lacking:
            which = ", ".join(repr(name) for name in lacking)
            notes.append(f"{split}/ has no image of class{'es' if len(lacking) > 1 else ''} {which} that train/ "
                         f"has: {effect}")
    if notes:
        from rich.markup import escape

        from edgetl.ui import console  # here: decoding workers import this module and print nothing

        for note in notes:
            console.print(f"[yellow]warning: {escape(note)}[/]")
    return notes


def scan_folder(
    root: Path, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1, source: str | None = None
) -> DatasetListing:
    """List an ImageFolder tree (or train/val/test trees) and make the splits that are not given."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder {str(root)!r} does not exist; give a folder with one sub-folder per class")
    if not root.is_dir():
        raise UserError(f"data path {str(root)!r} is not a folder; give a folder with one sub-folder per class")
    found = _Found()
    given = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if given and "train" not in given:
        raise UserError(f"{str(root)!r} has {', '.join(given)} but no train/ folder; add train/ or use one tree")
    train_root = given.get("train", root)
    if given:
        folders, files = _read_folder(root, root, found)
        for entry in files:
            found.ignore(entry.path, root, "not inside train/, val/ or test/")
        for entry in folders:
            if entry.path.name not in SPLITS:
                found.ignore(entry.path, root, "not a train/, val/ or test/ folder")
    candidates = {path.name: path for path in _class_dirs(train_root, root, found)}
    if not candidates:
        raise UserError(f"data folder {str(train_root)!r} has no class sub-folders; expected one folder per class")
    present = {split: {path.name: path for path in _class_dirs(folder, root, found)}
               for split, folder in given.items() if split != "train"}
    _check_distinct([*candidates.values(), *(path for folders in present.values() for path in folders.values())],
                    root)
    names = list(candidates)
    taken: dict[tuple[int, int], str] = {}
    found_train = [(file, index) for index, path in enumerate(candidates.values())
                   for file in _images_under(path, root, found)]
    images: dict[str, list[_File]] = {name: [] for name in names}
    for file, index in _once(found_train, root, found, names, taken):
        images[names[index]].append(file)
    classes = [name for name in candidates if images[name]]
    for name in candidates:
        if not images[name]:  # an empty folder is not a class
            found.ignore(candidates[name], root, "empty class folder (no image files): not a class")
    _check_class_names(classes, train_root)
    if not classes:
        raise UserError(f"data folder {str(train_root)!r} holds no readable images: no class folder has image files "
                        f"({', '.join(IMAGE_EXTENSIONS)}); expected one folder of images per class")
    if len(classes) < 2:
        raise UserError(f"data folder {str(train_root)!r} has a single class ({classes[0]!r}); need at least 2")
    for split, folders in present.items():
        extra = sorted(set(folders) - set(candidates))
        if extra:
            raise UserError(f"{split}/ has classes not in train/: {', '.join(extra)}; valid: {', '.join(classes)}")
        for name in sorted(set(folders) - set(classes)):
            found.ignore(folders[name], root, f"class {name!r} has no images in train/: not a class")

    listed: dict[str, list[tuple[str, int]]] = {}
    skipped = found.skipped
    for split in list(given) or ["train"]:
        if split == "train":
            files = [(file, classes.index(name)) for name in classes for file in images[name]]
        else:
            files = _once(_list_tree(given[split], root, classes, found), root, found, classes, taken)
        records, unreadable = _probe(root, [(_relative(file.path, root), label) for file, label in files])
        skipped += unreadable
        listed[split] = records

    counts = {name: sum(1 for _, y in listed["train"] if y == i) for i, name in enumerate(classes)}
    if sum(counts.values()) == 0:
        raise UserError(f"data folder {str(train_root)!r} holds no readable images ({', '.join(IMAGE_EXTENSIONS)})")
    needed = 1 + ("val" not in listed) + ("test" not in listed)
    for name, count in counts.items():
        if count < needed:
            raise UserError(
                f"class {name!r} has {count} readable training image(s); the train/val/test split needs at "
                f"least {needed} per class"
            )

    notes = _missing_classes(listed, classes)
    rng = np.random.default_rng(seed)
    train = listed["train"]
    origin = "folders" if given else f"stratified, seed {seed}"
    if "test" not in listed:
        train, listed["test"] = _stratified_take(train, test_fraction, rng, len(classes))
    if "val" not in listed:
        # val_fraction is of the whole folder; when test was carved above, rescale to what is left
        share = val_fraction if "test" in given else val_fraction / (1.0 - test_fraction)
        train, listed["val"] = _stratified_take(train, share, rng, len(classes))
        if given:
            origin = f"folders; val carved from train (stratified, seed {seed})"
    listed["train"] = train
    return DatasetListing(root=root, source=source or str(root), classes=classes,
                          splits={s: listed[s] for s in SPLITS}, split_origin=origin, skipped=skipped,
                          ignored=found.ignored, warnings=notes)


# ---------------------------------------------------------------- preprocessing


def preprocess_spec(image_size: int, mean: tuple[float, ...], std: tuple[float, ...], layout: str = "NCHW") -> dict:
    """The contract between training, export, verification and the apps: how pixels become a tensor."""
    return {
        "color": "RGB",
        "resize": {"height": image_size, "width": image_size, "method": "bilinear", "keep_aspect": False},
        "scale": 1.0 / 255.0,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "layout": layout,
        "dtype": "float32",
    }


def to_array(image: Image.Image, spec: dict) -> np.ndarray:
    """Resize and normalise one RGB image as `spec` says; returns CHW or HWC float32."""
    size = (spec["resize"]["width"], spec["resize"]["height"])
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32) * np.float32(spec["scale"])
    pixels = (pixels - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1) if spec["layout"] == "NCHW" else pixels)


def _augment_draws(width: int, height: int, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool,
                                                                              float, float]:
    """One draw of the stage-2 augmentation for an image of this size: crop box, flip, contrast, brightness."""
    area = width * height * rng.uniform(0.8, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = int(min(width, round(np.sqrt(area * ratio))))
    crop_h = int(min(height, round(np.sqrt(area / ratio))))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    flip = bool(rng.random() < 0.5)
    contrast = rng.uniform(0.85, 1.15)
    brightness = rng.uniform(-0.1, 0.1) * 255
    return (left, top, left + crop_w, top + crop_h), flip, contrast, brightness


def _jitter(image: Image.Image, flip: bool, contrast: float, brightness: float) -> Image.Image:
    if flip:
        image = ImageOps.mirror(image)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = (pixels - pixels.mean()) * contrast + pixels.mean() + brightness
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Light augmentation for stage 2: random resized crop (80-100% area), flip, brightness/contrast."""
    box, flip, contrast, brightness = _augment_draws(*image.size, rng)
    return _jitter(image.crop(box), flip, contrast, brightness)


def render(pixels: np.ndarray, source: tuple[int, int], spec: dict, rng: np.random.Generator | None = None
           ) -> np.ndarray:
    """The model input from decoded pixels (`decode_small`): resized as `spec` says, augmented when `rng` is given.

    The crop is drawn in the proportions the image was decoded at (`source`, width and height) and cut and
    resized in one step from the kept pixels, so the augmentation is the one `augment` applies to the full
    image; brightness and contrast then work on the input-sized picture only.
    """
    image = Image.fromarray(pixels)
    size = (spec["resize"]["width"], spec["resize"]["height"])
    if rng is None:
        return to_array(image, spec)
    (left, top, right, bottom), flip, contrast, brightness = _augment_draws(*source, rng)
    sx, sy = image.width / source[0], image.height / source[1]
    image = image.resize(size, Image.Resampling.BILINEAR, box=(left * sx, top * sy, right * sx, bottom * sy))
    return to_array(_jitter(image, flip, contrast, brightness), spec)


# ---------------------------------------------------------------- streaming decode (framework-free)


class DecodeError(Exception):
    """A file that could not be decoded, with the reason recorded when it was first tried."""


def error_text(error: BaseException) -> str:
    """How a decode failure is recorded (manifest `data.skipped`): type and message, at most 200 characters."""
    if isinstance(error, DecodeError):
        return str(error)
    return f"{type(error).__name__}: {error}"[:200] or "decode failed"


def model_input(root: Path, rel: str, spec: dict, rng: np.random.Generator | None = None, images=None) -> np.ndarray:
    """One image as the model takes it: from `images` (an `ImageCache`) when given, else decoded now the same
    way (JPEG draft, each side at most `cache_side`), so every stage sees the same pixels."""
    if images is not None:
        pixels, source = images.get(rel)
    else:
        pixels, source = decode_small(root / rel, cache_side(max(spec["resize"]["width"], spec["resize"]["height"])))
    return render(pixels, source, spec, rng)


def decode_records(
    root: Path, records: list[tuple[str, int]], spec: dict, indices: list[int] | np.ndarray,
    augment_seed: int | None = None, epoch: int = 0, images=None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode, augment and preprocess `records[indices]` into one batch (layout from `spec`).

    A file that fails yields zeros and its error text, so one bad file is skipped and recorded instead of
    ending the run; augmentation is keyed by (seed, epoch, index) so it does not depend on which process
    decodes it. `images`: the run's `ImageCache`, read instead of the files.
    """
    size = spec["resize"]
    shape = (3, size["height"], size["width"]) if spec["layout"] == "NCHW" else (size["height"], size["width"], 3)
    batch = np.zeros((len(indices), *shape), np.float32)
    labels = np.zeros(len(indices), np.int64)
    errors = []
    for row, index in enumerate(indices):
        rel, label = records[int(index)]
        labels[row] = label
        rng = None if augment_seed is None else np.random.default_rng([augment_seed, epoch, int(index)])
        try:
            batch[row] = model_input(root, rel, spec, rng, images)
        except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
            errors.append(error_text(error))
            continue
        errors.append("")
    return batch, labels, errors


def decode_kept(root: Path, records: list[tuple[str, int]], spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """All of `records` decoded without augmentation, files that fail to decode left out (fine-tuning
    already recorded them): the arrays that calibration, QAT and recovery read once and keep."""
    batch, labels, errors = decode_records(root, records, spec, np.arange(len(records)))
    kept = np.array([not error for error in errors], dtype=bool)
    return batch[kept], labels[kept]


_STREAM_STATE: dict = {}


def _stream_init(root: Path, records: list[tuple[str, int]], spec: dict) -> None:
    _STREAM_STATE.update(root=root, records=records, spec=spec)


def _stream_task(task: tuple[np.ndarray, int | None, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    indices, augment_seed, epoch = task
    state = _STREAM_STATE
    return decode_records(state["root"], state["records"], state["spec"], indices, augment_seed, epoch)


class BatchStream:
    """Batches decoded in worker processes, in order, with at most 2 × workers batches in flight.

    For backends without a data loader of their own (keras). Only file names travel to the workers and
    only the batches in flight are held in memory, whatever the size of the folder. Workers are spawned
    (never forked from a process that runs TensorFlow) and live as long as the stream. With the run's
    `ImageCache` (`images`) the batches are cut from decoded pixels in this process: that costs a fraction
    of a millisecond an image, less than handing a batch over from a worker.
    """

    def __init__(self, root: Path, records: list[tuple[str, int]], spec: dict, workers: int, images=None) -> None:
        self.root, self.records, self.spec, self.workers = root, records, spec, workers
        self.images = images
        self.pool = None
        if workers > 0 and images is None:
            import multiprocessing

            self.pool = multiprocessing.get_context("spawn").Pool(workers, _stream_init, (root, records, spec))

    def batches(self, index_batches: list[np.ndarray], augment_seed: int | None = None, epoch: int = 0):
        """Yield (indices, x, y, errors) for each list of indices, in the order given."""
        if self.pool is None:
            for indices in index_batches:
                yield (indices, *decode_records(self.root, self.records, self.spec, indices, augment_seed, epoch,
                                                self.images))
            return
        from collections import deque

        pending: deque = deque()
        queue = iter(index_batches)
        for indices in queue:
            pending.append((indices, self.pool.apply_async(_stream_task, ((indices, augment_seed, epoch),))))
            if len(pending) >= 2 * self.workers:
                break
        while pending:
            indices, result = pending.popleft()
            following = next(queue, None)
            if following is not None:
                pending.append((following, self.pool.apply_async(_stream_task, ((following, augment_seed, epoch),))))
            yield (indices, *result.get())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self) -> BatchStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
