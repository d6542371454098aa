"""Manifests: what a stage folder holds, where it came from, and the figures measured making it.

Every stage writes one; the next stage reads and checks it before doing any work, so a wrong or
incomplete folder fails with one line instead of deep inside a framework.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from edgetl import __version__
from edgetl.errors import UserError

SCHEMA_VERSION = 1
CHECKPOINT_KIND = "edgetl.checkpoint"
CHECKPOINT_FILES = ("manifest.json", "labels.txt", "history.json", "splits.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the libraries that shaped an artifact (absent ones are left out)."""
    found = {"edgetl": __version__, "python": platform.python_version()}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_labels(path: Path, labels: list[str]) -> None:
    path.write_text("".join(f"{label}\n" for label in labels))


def read_labels(path: Path) -> list[str]:
    return [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _file_name(value: object) -> bool:
    """A plain file name inside the folder: no path, no '..', nothing hidden."""
    return (isinstance(value, str) and bool(value) and "/" not in value and "\\" not in value
            and not value.startswith(".") and "\x00" not in value)


def _numbers(count: int, positive: bool = False):
    return lambda value: (isinstance(value, list) and len(value) == count
                          and all(_number(v) and (v > 0 or not positive) for v in value))


def _backbone(value: object) -> bool:
    from edgetl.backbones import BACKBONES

    return isinstance(value, str) and value in BACKBONES


# (dotted field, test, what would be valid): what every reader of a checkpoint relies on.
CHECKPOINT_FIELDS: tuple[tuple[str, object, str], ...] = (
    ("framework", lambda v: v in ("torch", "keras"), "torch or keras"),
    ("weights_file", _file_name, "a file name in the checkpoint folder"),
    ("weights_sha256", lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v),
     "64 hex digits"),
    ("model", lambda v: isinstance(v, dict), "an object"),
    ("model.backbone", _backbone, "a backbone edgetl knows (mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, "
     "efficientnet_lite0)"),
    ("model.width", lambda v: _number(v) and v > 0, "a positive number"),
    ("model.image_size", lambda v: _integer(v) and v >= 8, "an integer of pixels (8 or more)"),
    ("model.num_classes", lambda v: _integer(v) and v >= 2, "an integer, 2 or more"),
    ("labels", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    ("preprocess", lambda v: isinstance(v, dict), "an object"),
    ("preprocess.color", lambda v: v == "RGB", "RGB"),
    ("preprocess.resize.height", lambda v: _integer(v) and v >= 1, "a positive integer"),
    ("preprocess.resize.width", lambda v: _integer(v) and v >= 1, "a positive integer"),
    ("preprocess.scale", lambda v: _number(v) and v > 0, "a positive number"),
    ("preprocess.mean", _numbers(3), "3 numbers"),
    ("preprocess.std", _numbers(3, positive=True), "3 positive numbers"),
    ("preprocess.layout", lambda v: v in ("NCHW", "NHWC"), "NCHW or NHWC"),
    ("data.splits_file", _file_name, "a file name in the checkpoint folder"),
    ("metrics.test.top1", lambda v: _number(v) and 0 <= v <= 1, "a number from 0 to 1"),
)


def _lookup(payload: dict, dotted: str) -> tuple[bool, object]:
    value: object = payload
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return False, None
        value = value[key]
    return True, value


def _short(value: object) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def schema_problems(payload: dict, schema: tuple[tuple[str, object, str], ...]) -> list[str]:
    """One phrase per field that is missing or of the wrong kind (a field under a broken parent is not repeated)."""
    problems: list[str] = []
    broken: list[str] = []
    for dotted, test, valid in schema:
        if any(dotted.startswith(parent + ".") for parent in broken):
            continue
        present, value = _lookup(payload, dotted)
        if not present:
            problems.append(f"{dotted} is missing")
        elif not test(value):  # type: ignore[operator]
            problems.append(f"{dotted} is {_short(value)} (valid: {valid})")
        else:
            continue
        broken.append(dotted)
    return problems


def _load_object(path: Path, what: str) -> dict:
    """A JSON file that must hold one object; anything else is one UserError line naming it."""
    try:
        payload = json.loads(Path(path).read_text())
    except UnicodeDecodeError:
        raise UserError(f"{what} {str(path)!r} is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{what} {str(path)!r} is not valid JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(payload, dict):
        raise UserError(f"{what} {str(path)!r} holds a JSON {type(payload).__name__}, not an object")
    return payload


def read_checkpoint_manifest(folder: Path) -> dict:
    """Load and check a checkpoint folder's manifest; every problem is one UserError line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {str(folder)!r} does not exist; give RUN/checkpoint from edgetl finetune")
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"checkpoint folder {str(folder)!r} is incomplete: missing {', '.join(missing)}")
    manifest = _load_object(folder / "manifest.json", "checkpoint manifest")
    if manifest.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"{str(folder)!r} holds a {manifest.get('kind')!r} manifest, not an edgetl checkpoint")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"checkpoint manifest {str(folder / 'manifest.json')!r}: schema_version "
            f"{manifest.get('schema_version')!r} is not supported by edgetl {__version__}; supported: {SCHEMA_VERSION}"
        )
    problems = schema_problems(manifest, CHECKPOINT_FIELDS)
    if problems:
        raise UserError(f"checkpoint manifest {str(folder / 'manifest.json')!r} is damaged: {'; '.join(problems)}")
    from edgetl.labels import check_labels

    check_labels(manifest["labels"], f"checkpoint manifest {str(folder / 'manifest.json')!r}",
                 "fine-tune again from a data folder whose class folder names are usable labels")
    weights = folder / manifest["weights_file"]
    if not weights.is_file():
        raise UserError(f"checkpoint folder {str(folder)!r} is incomplete: missing {manifest['weights_file']}")
    return manifest


SPLITS = ("train", "val", "test")


def _record_problem(record: object, classes: int) -> str | None:
    if not (isinstance(record, list) and len(record) == 2):
        return f"{_short(record)} is not [relative path, label index]"
    rel, label = record
    if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/") or "\x00" in rel:
        return f"path {_short(rel)} is not a relative path inside the data folder"
    if not _integer(label) or not 0 <= label < classes:
        return f"label {_short(label)} of {rel!r} is not an index from 0 to {classes - 1}"
    return None


def read_splits(path: Path, labels: list[str]) -> dict:
    """Load and check a checkpoint's splits.json against its labels; returns the payload
    (DatasetListing.from_json takes it). Every problem is one UserError line."""
    payload = _load_object(path, "splits file")
    problems = schema_problems(payload, (
        ("root", lambda v: isinstance(v, str) and bool(v), "the data folder's path"),
        ("source", lambda v: isinstance(v, str), "a string"),
        ("split_origin", lambda v: isinstance(v, str), "a string"),
        ("classes", lambda v: v == labels, f"the checkpoint's labels {_short(labels)}"),
        ("splits", lambda v: isinstance(v, dict) and all(isinstance(v.get(s), list) for s in SPLITS),
         "an object with train, val and test lists"),
    ))
    if not problems:
        for split in SPLITS:
            bad = next((p for p in (_record_problem(r, len(labels)) for r in payload["splits"][split]) if p), None)
            if bad:
                problems.append(f"splits.{split}: {bad}")
    if problems:
        raise UserError(f"splits file {str(path)!r} is damaged: {'; '.join(problems)}; fine-tune again to "
                        "rewrite it")
    return payload
