"""Exit statuses and the exceptions that carry them: the one place where an error becomes a status.

Every edgetl process (the CLI, the workers of a multi-process fine-tune) ends through `exit_status`, so
the same failure gives the same status and the same single line everywhere:

- 0: done; 1: a stage ran and failed (`StageFailed`: every export failed, the disk filled up);
- 2: bad input (`UserError`: a path, a flag value, a file that is not what it should be);
- 3: the quality gate (`QualityFailed`: an int8 file lost more top-1 than allowed, after writing it);
- 130: interrupted (Ctrl-C), after the stage removed its temporary folders;
- 143: terminated (SIGTERM: `kill`, a job scheduler, a container stop), with the same clean-up as Ctrl-C.

Anything else is a bug and keeps its traceback. Messages name the value received and what would be valid.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import signal
import threading
from collections.abc import Iterator

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_QUALITY = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class UserError(Exception):
    """Bad input: a path, a flag value, a file that is not what it should be."""

    exit_code = EXIT_USAGE


class StageFailed(UserError):
    """The input was fine but the stage could not make its output; the previous output is unchanged."""

    exit_code = EXIT_FAILED


class QualityFailed(UserError):
    """Everything was written, but a measured figure missed the limit the user set."""

    exit_code = EXIT_QUALITY


def one_of(value: object, valid: list[str] | tuple[str, ...], what: str) -> str:
    """Message for an unknown choice, listing the valid ones."""
    return f"unknown {what} {value!r}; valid: {', '.join(valid)}"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so every clean-up that Ctrl-C gets runs for it too."""


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    """`error`, then what it was raised from or while handling, and so on (each once)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _interrupted(error: BaseException) -> int | None:
    """EXIT_INTERRUPTED or EXIT_TERMINATED when `error` is Ctrl-C or SIGTERM, or a CLI library's Abort raised
    while handling one; None otherwise."""
    for link in _chain(error):
        if isinstance(link, KeyboardInterrupt):
            return EXIT_TERMINATED if isinstance(link, Terminated) else EXIT_INTERRUPTED
    return None


def is_interruption(status: int) -> bool:
    """A status that a signal from the user or the system caused (no `error:` prefix on its line)."""
    return status in (EXIT_INTERRUPTED, EXIT_TERMINATED)


def interruption_line(status: int) -> str:
    what = "terminated (SIGTERM)" if status == EXIT_TERMINATED else "interrupted"
    return f"{what}; the running stage published nothing and its previous output is unchanged"


def disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


# errno values that say the machine failed (its disk, its memory), not the file being made: an export that meets
# one publishes nothing, however many of its files were fine, so the previous output stays
MACHINE_ERRNOS = (*DISK_FULL_ERRNOS, errno.EIO, errno.EROFS, errno.ENOMEM, errno.ENXIO, errno.ENODEV)
# how libraries that wrap the C error in their own exception say it (torch.save's PytorchStreamWriter, LiteRT's
# and ExecuTorch's C++ writers, numpy's savez)
_MACHINE_TEXTS = ("no space left on device", "input/output error", "disk quota exceeded", "read-only file system",
                  "file write failed", "cannot allocate memory")


def machine_failure(error: BaseException) -> BaseException | None:
    """The error in `error`'s chain that says the machine failed (a full disk, an I/O error, no memory), or None.

    A stage that isolates failures file by file (one export failing must not cost the others) re-raises these:
    they are not the file's fault, and every file made after one is suspect.
    """
    for link in _chain(error):
        if isinstance(link, (MachineFailed, MemoryError)) or (isinstance(link, OSError) and
                                                              link.errno in MACHINE_ERRNOS):
            return link
        if not isinstance(link, UserError) and any(text in str(link).lower() for text in _MACHINE_TEXTS):
            return link
    return None


class MachineFailed(StageFailed):
    """The machine failed under a stage (a full disk, an I/O error, a killed helper process): nothing published."""


def machine_line(error: BaseException) -> str:
    """One line for a machine failure: what failed, where, and that the previous output is unchanged."""
    if isinstance(error, MachineFailed):
        return " ".join(str(error).split())
    if isinstance(error, MemoryError):
        what = "out of memory"
    elif isinstance(error, OSError) and error.strerror:
        what = error.strerror[0].lower() + error.strerror[1:]
    else:
        what = " ".join(str(error).split())[:200]
    where = f" writing {error.filename!r}" if getattr(error, "filename", None) else ""
    remedy = "free some space and run again" if disk_full(error) or "space" in what.lower() else "run again"
    return f"{what}{where}; the running stage published nothing and its previous output is unchanged; {remedy}"


def exit_status(error: BaseException) -> tuple[int, str] | None:
    """(exit status, one line) for an error edgetl reports itself; None for a bug (keep the traceback)."""
    if isinstance(error, UserError):
        return error.exit_code, " ".join(str(error).split()) or type(error).__name__
    signalled = _interrupted(error)
    if signalled is not None:
        return signalled, interruption_line(signalled)
    failed = machine_failure(error)  # a full disk, an I/O error, no memory
    if failed is not None:
        return EXIT_FAILED, machine_line(failed)
    return None


def combined_status(codes: list[int]) -> int:
    """One exit status for several processes that failed (a launcher's workers): the one a user acts on first.

    Interrupted beats bad input, then the quality gate, a failed stage, and last terminated: a launcher stops
    the other workers with SIGTERM once one has failed, so their 143 says less than the first one's status. A
    worker killed by a signal (negative code) counts as interrupted for SIGINT, terminated for SIGTERM, else as
    failed.
    """
    statuses = {EXIT_INTERRUPTED if code in (EXIT_INTERRUPTED, -2) else EXIT_TERMINATED if code == -15
                else code if code > 0 else EXIT_FAILED for code in codes if code != EXIT_OK}
    for status in (EXIT_INTERRUPTED, EXIT_USAGE, EXIT_QUALITY, EXIT_FAILED, EXIT_TERMINATED):
        if status in statuses:
            return status
    return max(statuses, default=EXIT_OK)


def forget_interrupt() -> None:
    """Let a handled Ctrl-C end with status 130 under `python -m` too.

    CPython 3.11 marks a KeyboardInterrupt that passed through Python code a C extension ran with
    PyRun_String (pybind11's py::exec does) as unhandled, and at exit a `python -m` process then kills itself
    with SIGINT (status -2) even after edgetl handled the interrupt and asked for 130. Where the mark exists
    it is cleared; elsewhere this does nothing.
    """
    with contextlib.suppress(AttributeError, ValueError, OSError):
        ctypes.c_int.in_dll(ctypes.pythonapi, "_Py_UnhandledKeyboardInterrupt").value = 0


_interrupts = {"count": 0, "status": 0}


def _on_sigint(signum: int, frame: object) -> None:
    _interrupts["count"] += 1
    _interrupts["status"] = _interrupts["status"] or EXIT_INTERRUPTED
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as Python's own handler does


def _on_sigterm(signum: int, frame: object) -> None:
    _interrupts["count"] += 1
    _interrupts["status"] = _interrupts["status"] or EXIT_TERMINATED
    raise Terminated


def watch_interrupts() -> None:
    """Count Ctrl-C presses and SIGTERMs as well as raising KeyboardInterrupt (Terminated), so none is lost.

    A KeyboardInterrupt raised while Python runs a finaliser, or caught by a library's bare `except:`, would
    vanish and the stage would publish as if nothing happened; atomic_dir and the CLI check the count too.
    SIGTERM's default action kills at once and would leave temporary folders until the next run.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
        signal.signal(signal.SIGTERM, _on_sigterm)


def interrupt_requested() -> bool:
    return _interrupts["count"] > 0


def requested_status() -> int:
    """The status of the first signal received (130 or 143); 0 when none was."""
    return _interrupts["status"]
