"""Where edgetl keeps things between runs, and how it writes folders so nothing is ever half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgetl.errors import UserError


def cache_dir() -> Path:
    """$EDGETL_CACHE, else $XDG_CACHE_HOME/edgetl, else ~/.cache/edgetl."""
    if os.environ.get("EDGETL_CACHE"):
        return Path(os.environ["EDGETL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgetl"


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create `path` (and parents) or fail with one line naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".edgetl-probe-"):
            pass
    except OSError as error:
        raise UserError(
            f"{what} {str(path)!r} is not writable ({error.strerror or error}); choose a folder you can write to"
        ) from None
    return path


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    On any exception the temporary folder is removed and `final` (if it existed) is left as it was,
    so an interrupted stage never leaves a folder that looks complete.
    """
    final = Path(final)
    ensure_writable_dir(final.parent, "output folder")
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a file under a temporary name, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
