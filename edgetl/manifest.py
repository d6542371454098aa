"""Manifests: what a stage folder holds, where it came from, and the figures measured making it.

Every stage writes one; the next stage reads and checks it before doing any work, so a wrong or
incomplete folder fails with one line instead of deep inside a framework.
"""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from edgetl import __version__
from edgetl.contracts import CHECKPOINT_KIND as CHECKPOINT_KIND  # re-exported: the fine-tuning stage writes it
from edgetl.contracts import SCHEMA_VERSION as SCHEMA_VERSION
from edgetl.contracts import CheckpointManifest, SplitsFile, damaged, load_object
from edgetl.errors import UserError
from edgetl.labels import check_labels

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


def _read_checkpoint(folder: Path) -> tuple[dict, CheckpointManifest]:
    """The checkpoint folder's manifest as written and as its typed record, after every check: the folder's
    files, each field (contracts.CheckpointManifest, all problems in one UserError line), the labels, the
    weights file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {str(folder)!r} does not exist; give RUN/checkpoint from edgetl finetune")
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"checkpoint folder {str(folder)!r} is incomplete: missing {', '.join(missing)}")
    where = f"{CheckpointManifest.TITLE} {str(folder / 'manifest.json')!r}"
    payload = load_object(folder / "manifest.json", CheckpointManifest.TITLE)
    manifest = CheckpointManifest.from_json(payload, where)
    check_labels(manifest.labels, where,
                 "fine-tune again from a data folder whose class folder names are usable labels")
    if not (folder / manifest.weights_file).is_file():
        raise UserError(f"checkpoint folder {str(folder)!r} is incomplete: missing {manifest.weights_file}")
    return payload, manifest


def read_checkpoint_manifest(folder: Path) -> dict:
    """Load and check a checkpoint folder's manifest (see `read_checkpoint`); returns it as written."""
    return _read_checkpoint(folder)[0]


def read_checkpoint(folder: Path) -> CheckpointManifest:
    """The checkpoint folder's manifest as the typed contract the later stages read; every problem is one
    UserError line naming the file and each damaged field."""
    return _read_checkpoint(folder)[1]


def read_splits(path: Path, labels: list[str] | tuple[str, ...]) -> dict:
    """Load and check a checkpoint's splits.json (contracts.SplitsFile) against its labels; returns the payload
    (DatasetListing.from_json takes it). Every problem is one UserError line."""
    path = Path(path)
    payload = load_object(path, SplitsFile.TITLE)
    splits, problems = SplitsFile.parse(payload)
    if splits is not None:
        problems += splits.classes_problems(labels)
    if problems:
        raise damaged(f"{SplitsFile.TITLE} {str(path)!r}", problems, SplitsFile.FIX)
    return payload
