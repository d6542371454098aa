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
from edgetl.contracts import CHECKPOINT_KIND, SCHEMA_VERSION, CheckpointManifest
from edgetl.errors import UserError

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


def read_checkpoint_manifest(folder: Path) -> dict:
    """Load and check a checkpoint folder's manifest; every problem is one UserError line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {str(folder)!r} does not exist; give RUN/checkpoint from edgetl finetune")
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(f"checkpoint folder {str(folder)!r} is incomplete: missing {', '.join(missing)}")
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{str(folder / 'manifest.json')!r} is not valid JSON ({error.msg})") from None
    if manifest.get("kind") != CHECKPOINT_KIND:
        raise UserError(f"{str(folder)!r} holds a {manifest.get('kind')!r} manifest, not an edgetl checkpoint")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise UserError(
            f"checkpoint manifest schema_version {manifest.get('schema_version')!r} is not supported by edgetl "
            f"{__version__}; supported: {SCHEMA_VERSION}"
        )
    weights = folder / manifest["weights_file"]
    if not weights.is_file():
        raise UserError(f"checkpoint folder {str(folder)!r} is incomplete: missing {manifest['weights_file']}")
    return manifest


def read_checkpoint(folder: Path) -> CheckpointManifest:
    """The checkpoint folder's manifest as the typed contract the later stages read: the checks above, then
    every field (each problem one UserError line naming the file and the field)."""
    payload = read_checkpoint_manifest(folder)
    return CheckpointManifest.from_json(payload, repr(str(Path(folder) / "manifest.json")))
