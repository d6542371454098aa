"""Console output shared by the stages: one rich console (stderr for progress, stdout for tables), and the one
way to keep native libraries quiet while they work."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Output that is not a terminal (a CI log, `| tee`) has no width to detect: rich would assume 80 columns and cut
# the tables' key columns to "88.…"; such output gets room for the widest table instead (COLUMNS still decides).
_PIPED_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
console = Console(stderr=True, highlight=False, soft_wrap=True,
                  width=None if sys.stderr.isatty() or os.environ.get("COLUMNS") else 160)
stdout = Console(highlight=False, width=_PIPED_WIDTH)


def progress() -> Progress:
    """A progress display for long loops; transient so logs stay readable in CI."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


@contextlib.contextmanager
def quiet_native(fds: tuple[int, ...] = (1, 2)) -> Iterator[None]:
    """Silence what libraries print while they work: C++ output on file descriptors 1/2 (TensorFlow, absl,
    LiteRT's delegate banner, cpuinfo), and Python prints, warnings and log records below ERROR.

    edgetl prints one-line errors and tables, which that chatter would break; exceptions still propagate
    unchanged, so callers print before and after. EDGETL_DEBUG=1 lets everything through.
    """
    if os.environ.get("EDGETL_DEBUG") == "1":
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in fds}
    previous = logging.root.manager.disable
    sink = io.StringIO()
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            for fd in fds:
                os.dup2(devnull.fileno(), fd)
            yield
    finally:
        logging.disable(previous)
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
