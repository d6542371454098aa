"""What edgetl ships besides its code: export recipes, sweep recipes, app templates and golden_check.py (the
repo's top-level `export/` folder), and the standalone benchmark (`device_bench/`).

Both folders stay where a user of the repo looks for them; pyproject.toml maps them into this package
(`edgetl.assets.export`, `edgetl.assets.device_bench`), so a wheel carries them, and they are found through
importlib.resources, so an installed edgetl reads its own copy wherever it lives.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from edgetl.errors import UserError

FOLDERS = ("export", "device_bench")


def folder(name: str) -> Path:
    """The shipped folder `name` (export or device_bench) as a path on disk."""
    if name not in FOLDERS:
        raise ValueError(f"unknown asset folder {name!r}; valid: {', '.join(FOLDERS)}")
    try:
        root = resources.files(f"edgetl.assets.{name}")
    except ModuleNotFoundError:
        root = None
    # A wheel installs unpacked, so the resources are plain files; callers run and copy them as such.
    if not isinstance(root, Path) or not root.is_dir():
        raise UserError(f"edgetl's {name}/ files are missing from this installation ({root}); reinstall edgetl")
    return root


def file(name: str, *parts: str) -> Path:
    """One shipped file, e.g. file("export", "golden_check.py"); a missing one is one UserError line."""
    path = folder(name).joinpath(*parts)
    if not path.is_file():
        raise UserError(f"edgetl's {name}/{'/'.join(parts)} is missing from this installation; reinstall edgetl")
    return path


def copy_folder(name: str, target: Path) -> Path:
    """A copy of a shipped folder for a user (a bundle's device_bench/), without the packaging files."""
    shutil.copytree(folder(name), target, ignore=shutil.ignore_patterns("__init__.py", "__pycache__", "*.pyc"))
    return target
