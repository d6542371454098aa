"""Where edgetl keeps things between runs, and how a stage writes its folder so the user's data is safe.

The rules every stage follows (README, "Your data is safe"):

- `claim_output`: a stage replaces only a folder that edgetl made for that same stage (its manifest says
  so), never its own input or a folder that holds it; anything else is refused with one line.
- `atomic_dir`: the new folder is built under a hidden temporary name beside the final one and takes its
  place in one step (Linux: an atomic exchange of the two names) only when complete, so a failed or
  interrupted stage leaves the previous output exactly as it was and no final name ever holds a partial
  folder. A run killed outright (SIGKILL, power loss) leaves its hidden temporary folder behind; the next
  run of that stage for the same folder removes it (`clean_stale`), and only folders whose owner process
  is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgetl.errors import MachineFailed, UserError, disk_full, interrupt_requested, machine_failure


def cache_dir() -> Path:
    """$EDGETL_CACHE, else $XDG_CACHE_HOME/edgetl, else ~/.cache/edgetl."""
    if os.environ.get("EDGETL_CACHE"):
        return Path(os.environ["EDGETL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgetl"


_created: list[Path] = []  # folders this process made for its output, removed again if they stay empty


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create `path` (and parents) or fail with one line naming it."""
    path = Path(path)
    missing = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if missing is not None and missing not in _created:
            _created.append(missing)
        if not os.access(path, os.W_OK | os.X_OK):  # a check that writes nothing, so nothing can be left behind
            code = errno.EROFS if os.statvfs(path).f_flag & os.ST_RDONLY else errno.EACCES
            raise OSError(code, os.strerror(code), str(path))
    except OSError as error:
        raise UserError(
            f"{what} {str(path)!r} is not writable ({error.strerror or error}); choose a folder you can write to"
        ) from None
    return path


def remove_empty_created() -> None:
    """After a failed run: remove the output folders it created that are still empty (no files at any depth), so
    bad input leaves no trace; a folder holding anything stays."""
    for top in reversed(_created):
        for folder, _, files in sorted(os.walk(top, topdown=False), reverse=True):
            if not files:
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
    _created.clear()


# ------------------------------------------------------------------------------ which folders a stage may replace


def manifest_kind(path: Path) -> str | None:
    """The `kind` an edgetl manifest declares, or None when the file is missing or not an edgetl manifest."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    kind = payload.get("kind") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


def claim_output(out: Path, kind: str, inputs: Iterable[Path | None] = (), manifest: str = "manifest.json",
                 option: str = "--out", keep_out_of: Iterable[Path | None] = ()) -> Path:
    """Check, before any work, that a stage may write `out`; returns it.

    `out` may be missing, an empty folder, or a folder whose `manifest` declares `kind` (edgetl made it for
    this stage). It may never be one of `inputs` or a folder above one (replacing it would delete the input),
    nor lie inside a folder of `keep_out_of` (a data folder: the output would become part of the data).
    """
    out = Path(out)
    target = out.resolve()
    for source in inputs:
        if source is None:
            continue
        held = Path(source).resolve()
        if held == target or target in held.parents:
            relation = "is" if held == target else "holds"
            raise UserError(f"{option} {str(out)!r} {relation} this stage's input {str(source)!r}; replacing it "
                            "would delete that input: choose another folder")
    for folder in keep_out_of:
        if folder is not None and Path(folder).resolve() in (target, *target.parents):
            raise UserError(f"{option} {str(out)!r} is inside the data folder {str(folder)!r}; the output would "
                            "become part of the data: choose a folder outside it")
    if out.is_symlink():
        raise UserError(f"{option} {str(out)!r} is a symbolic link; give the folder itself")
    check_not_locked(out, option)  # refused now if another run is writing it, not after all the work
    if not out.exists():
        return out
    if not out.is_dir():
        raise UserError(f"{option} {str(out)!r} exists and is not a folder; choose a folder path")
    if os.path.ismount(out):
        raise UserError(f"{option} {str(out)!r} is a mount point; edgetl puts a finished folder in place of the "
                        "previous one by renaming, which a mount point cannot be: give a folder inside it, e.g. "
                        f"{str(out / out.name if out.name else out / 'out')!r}")
    if not any(out.iterdir()):
        return out
    found = manifest_kind(out / manifest)
    if found == kind:
        foreign = files_not_made(out)
        if foreign:
            shown = ", ".join(repr(name) for name in foreign[:5]) + (f" and {len(foreign) - 5} more"
                                                                    if len(foreign) > 5 else "")
            raise UserError(f"{option} {str(out)!r} holds {len(foreign)} file(s) edgetl did not write ({shown}); "
                            "replacing the folder would delete them: move them out, or choose another folder")
        return out
    why = f"no edgetl {manifest}" if found is None else f"its {manifest} is an {found!r} folder"
    raise UserError(f"{option} {str(out)!r} holds files that edgetl did not make for this stage ({why}); edgetl "
                    f"replaces only a folder it made ({kind}): choose a new or empty folder")


CONTENTS_FILE = ".edgetl-contents.json"  # what a stage wrote into its folder, to tell a user's own files apart


def _entries(folder: Path, known: set[str] | None = None) -> list[str]:
    """Relative paths under `folder`, folders included; with `known`, only the topmost ones not in it."""
    found: list[str] = []
    for top, dirs, files in os.walk(folder):
        base = Path(top).relative_to(folder)
        for name in sorted(files):
            rel = (base / name).as_posix()
            if known is None or rel not in known:
                found.append(rel)
        for name in sorted(dirs):
            rel = (base / name).as_posix()
            if known is not None and rel not in known:
                found.append(rel + "/")
                dirs.remove(name)  # a user's own folder: name it once, not every file inside
            elif known is None:
                found.append(rel + "/")
    return found


def record_contents(folder: Path) -> None:
    """Write CONTENTS_FILE: every path this stage wrote, so a later run can tell what a user added since."""
    names = [name.rstrip("/") for name in _entries(folder)]
    (Path(folder) / CONTENTS_FILE).write_text(json.dumps(sorted(set(names) | {CONTENTS_FILE}), indent=0) + "\n")


def files_not_made(folder: Path) -> list[str]:
    """The paths in an edgetl folder that its stage did not write (a user's notes, a copied photo).

    A folder from before CONTENTS_FILE existed has no record: everything in it is taken as edgetl's, as then.
    """
    try:
        known = json.loads((Path(folder) / CONTENTS_FILE).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(known, list):
        return []
    return _entries(Path(folder), {str(name) for name in known})


# ------------------------------------------------------------------------------ one run per output folder

_held: dict[str, int] = {}
# claim_output's check locks and releases at once without writing its pid (as do the ranks of one distributed run
# checking the folder together): a lock held by an unnamed process is waited for this long before refusing
_UNNAMED_HOLDER_WAIT_S = 2.0
_LOCK_OWNER = re.compile(r"^\d+@[A-Za-z0-9.-]+$")  # what lock_output writes: pid@host


def _lock_path(final: Path) -> Path:
    return final.parent / f".{final.name}.lock"


_TEMPORARY_PART = re.compile(r"^\..+\.tmp-\d+-\d+@.+-[A-Za-z0-9_]{8}$")


def _inside_temporary(final: Path) -> bool:
    """A folder built inside another stage's temporary folder (a sweep's exports) is private to that run: no
    other run can reach it, so it needs no lock (and leaves no lock file in the published folder)."""
    return any(_TEMPORARY_PART.match(part) for part in final.parent.parts)


def _refuse_held(final: Path, fd: int, option: str, patience: float) -> None:
    """Raise the one-line refusal for a lock held by a run that signed it (or by an unnamed holder past
    `patience`); return when the holder is unnamed and may be waited for (the caller closes `fd`)."""
    owner = os.read(fd, 64).decode(errors="replace").strip()
    if not owner and time.monotonic() < patience:  # a check's brief shared lock, or a holder about to sign
        time.sleep(0.02)
        return
    raise UserError(f"{option} {str(final)!r} is being written by another edgetl run (process {owner or 'unknown'}); "
                    "wait for it to finish, or choose another folder")


def _refuse_foreign(path: Path, fd: int) -> None:
    """Refuse a file under the lock's name that edgetl did not write (it holds no pid@host, or is no file)."""
    held = os.read(fd, 256) if stat.S_ISREG(os.fstat(fd).st_mode) else b"not a file"
    if held and not _LOCK_OWNER.match(held.decode(errors="replace")):
        raise UserError(f"{str(path)!r} is not an edgetl lock file (it holds something else); edgetl would "
                        "overwrite it: move it away")


def check_not_locked(final: Path, option: str = "--out") -> None:
    """Refuse `final` when another run holds its lock, without taking it.

    A shared lock, never signed and never created: the ranks of one distributed run check their checkpoint
    folder together, and must not refuse one another; a writer meeting such a check waits a moment.
    """
    final = Path(final).absolute()
    if str(final) in _held:
        return
    patience = time.monotonic() + _UNNAMED_HOLDER_WAIT_S
    while True:
        path = _lock_path(final)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UserError(f"{str(path)!r} is a symbolic link, not an edgetl lock file; move it away") from None
            return  # no lock file (nobody holds it), or one we cannot read: lock_output decides when writing
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                _refuse_held(final, fd, option, patience)
                continue
            _refuse_foreign(path, fd)
            return
        finally:
            os.close(fd)


def lock_output(final: Path, option: str = "--out") -> None:
    """Hold an exclusive lock on `final` until `release_output` (atomic_dir holds it while the stage writes).

    Two runs writing one folder would each publish over the other and report files that are gone: the second
    one is refused with one line. The lock is a hidden file beside the folder, locked with flock (the kernel
    drops it when the process dies) and removed when released; a file left by a killed run is taken over.
    """
    final = Path(final).absolute()
    if str(final) in _held or not final.parent.is_dir() or _inside_temporary(final):
        return
    path = _lock_path(final)
    patience = time.monotonic() + _UNNAMED_HOLDER_WAIT_S
    for _ in range(1000):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:  # a symlink under the lock's name is not ours to write through
                raise UserError(f"{str(path)!r} is a symbolic link, not an edgetl lock file; move it away") from None
            return  # a folder we cannot write to: the writability check names it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                _refuse_held(final, fd, option, patience)
            finally:
                os.close(fd)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file between our open and our lock: take the new one
            os.close(fd)
            continue
        try:
            _refuse_foreign(path, fd)
        except UserError:
            os.close(fd)  # a file of the user's under the lock's name: never overwritten, never removed
            raise
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}@{_host()}".encode())
        _held[str(final)] = fd
        return
    raise UserError(f"{option} {str(final)!r} is being locked and released by other processes without end; "
                    "choose another folder")


def release_output(final: Path) -> None:
    """Give up the lock of `lock_output` and remove its file (before closing it, so no one locks a removed file
    while another creates a new one)."""
    fd = _held.pop(str(Path(final).absolute()), None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(_lock_path(Path(final).absolute()))
    os.close(fd)


@atexit.register
def _release_all() -> None:
    for final in list(_held):
        release_output(Path(final))


# ---------------------------------------------------------------------------------------- temporary folders


def _process_start(pid: int) -> str:
    """When the process started (clock ticks since boot, /proc), to tell a live owner from a reused pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return "0"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "host"


def _owner_tag() -> str:
    """pid, start time and host of this process, as written into the names of its temporary folders."""
    return f"{os.getpid()}-{_process_start(os.getpid())}@{_host()}"


def _stale_pattern(final: Path) -> re.Pattern[str]:
    name = re.escape(final.name)
    return re.compile(rf"^\.{name}\.(?P<what>tmp|old)-(?P<pid>\d+)-(?P<start>\d+)@(?P<host>.+)-[A-Za-z0-9_]{{8}}$")


def _owner_alive(pid: int, start: str, host: str) -> bool:
    if host != _host():
        return True  # another machine's (a shared file system): not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return start == "0" or _process_start(pid) in (start, "0")


def clean_stale(final: Path) -> list[str]:
    """Remove what killed runs left beside `final`: temporary folders and files named for it whose owner
    process is gone. A killed swap (the previous folder moved aside, the new one not yet in place) is undone:
    the previous folder goes back under its name. Returns the names removed or restored."""
    final = Path(final)
    pattern = _stale_pattern(final)
    done: list[str] = []
    try:
        entries = sorted(final.parent.iterdir())
    except OSError:
        return done
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or _owner_alive(int(match["pid"]), match["start"], match["host"]):
            continue
        if match["what"] == "old" and not final.exists():
            entry.rename(final)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        done.append(entry.name)
    return done


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first: Path, second: Path) -> bool:
    """Swap two names in one atomic step (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _publish(tmp: Path, final: Path) -> None:
    """Put the finished `tmp` under the name `final`; the previous folder (if any) is removed afterwards."""
    if not final.exists():
        tmp.rename(final)
        return
    if os.path.ismount(final):
        raise UserError(f"{str(final)!r} is a mount point, which cannot be replaced by renaming; nothing was "
                        "published: give a folder inside it")
    if _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now names the previous folder
        return
    old = final.parent / f".{final.name}.old-{_owner_tag()}-{tmp.name[-8:]}"
    final.rename(old)
    try:
        tmp.rename(final)  # a kill between the two renames is undone by the next run's clean_stale
    except BaseException:
        old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(final: Path, check: Callable[[Path], None] | None = None, record: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; when the block ends without error it replaces `final` in one step.

    `check(tmp)` runs before that step and may raise to publish nothing (a stage whose every file failed).
    `record` writes CONTENTS_FILE (a stage's output, where a user may later add files of their own); a cache
    that is never a stage's output (the built-in data sets) leaves it out.
    On any exception (Ctrl-C included) the temporary folder is removed and `final` is left exactly as it
    was. Stale temporary folders that killed runs left for `final` are removed first.
    """
    final = Path(final)
    ensure_writable_dir(final.parent, "output folder")
    lock_output(final)
    clean_stale(final)
    try:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{_owner_tag()}-"))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the published folder gets the usual mode
            yield tmp
            if interrupt_requested():  # a Ctrl-C that some library swallowed still stops the publication
                raise KeyboardInterrupt
            if check is not None:
                check(tmp)
            if record:
                record_contents(tmp)
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        release_output(final)


@contextmanager
def scratch_dir(final: Path, sync: Callable[[Callable[[], object]], object] | None = None) -> Iterator[Path]:
    """A hidden working folder named for `final` beside it, removed when the block ends (Ctrl-C included).

    Named as `atomic_dir` names its temporary folders, so one that a killed run left is removed by the next
    run (`clean_stale`), and only when its owner process is gone. `sync(make)` runs `make` on one process
    and hands the result to all: processes of one run share the folder; its maker removes it. Raises OSError
    (in every process) when the folder cannot be made.
    """
    final = Path(final)

    def make() -> tuple:
        try:
            clean_stale(final)
            return ("ok", tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-{_owner_tag()}-"),
                    os.getpid())
        except OSError as error:
            return ("error", error.errno, error.strerror or str(error))

    made = sync(make) if sync is not None else make()
    if made[0] == "error":
        raise OSError(made[1], made[2])
    path = Path(made[1])
    try:
        yield path
    finally:
        if made[2] == os.getpid():
            shutil.rmtree(path, ignore_errors=True)


def stage_bytes(path: Path, payload: bytes) -> Path:
    """Write `payload` under a temporary name beside `path` (named as `clean_stale` finds what a killed run left)
    and return that name; `os.replace(staged, path)` puts it in place later, in one step."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{_owner_tag()}-")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a file under a temporary name, then rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{_owner_tag()}-")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets the mode open() would give
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextmanager
def room_for(folder: Path, what: str, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk (or quota) met inside the block into one line that names `folder`, the space `what` needs
    (when known) and the space that is free; other errors pass unchanged.

    Libraries that write in C++ (torch.save, the converters) wrap ENOSPC in their own exceptions; the free
    space after the failure tells a full disk apart from a file the library could not write for its own reasons.
    """
    try:
        yield
    except BaseException as error:
        if isinstance(error, (KeyboardInterrupt, UserError)):
            raise
        failed = machine_failure(error)
        free = _free_bytes(Path(folder))
        said = failed is not None and (disk_full(failed) or any(word in str(failed).lower()
                                                                 for word in ("space", "quota")))
        seen = free is not None and (free < (needed or 0) or free < 2**16)  # torch says "unexpected pos"
        if not (said or seen):
            raise
        size = f"about {needed / 1e6:.1f} MB" if needed else "more space"
        left = f", {free / 1e6:.1f} MB are free" if free is not None else ""
        raise MachineFailed(f"no space left on device in {str(folder)!r}: {what} needs {size}{left}; nothing was "
                            "published and the previous output is unchanged; free some space and run again") from error
