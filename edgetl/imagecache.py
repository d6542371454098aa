"""Every image of a run decoded once: uint8 pixels kept a little above the input size, in memory or mapped.

Stage 1's features, the input-size search, every stage-2 epoch and each evaluation read their pixels from
here instead of the files (`data.model_input`), so a phone photo is decoded once per run and at JPEG draft
scale, not once per epoch at 12 megapixels.

The size rule: an image takes `width × height × 3` bytes with each side at most `data.cache_side(size)`
(1.15 × the largest input size the run uses), so at most 3 × side² bytes: 65.7 kB at 128 px (side 148),
200 kB at 224 px (side 258); a 28 × 28 image keeps its 2.4 kB. The pixels stay in memory while they take
at most `MEMORY_SHARE` of the memory available (and `MEMORY_CAP`); a larger cache is a file, mapped, in a
hidden folder of the run's output folder that is removed when the run ends (by the next run, when a
killed one left it). Several processes of one run on a machine share one mapped file: each decodes its
share of the images into it.

Framework-free (numpy + Pillow), so both backends read the same pixels.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from edgetl.data import DecodeError, decode_small, error_text, upright_size
from edgetl.errors import UserError
from edgetl.machine import available_memory, usable_cores
from edgetl.paths import scratch_dir

MEMORY_SHARE = 0.25  # of the memory available when the run starts
MEMORY_CAP = 2 << 30
FALLBACK_SHARE = 0.6  # a cache that cannot be written to disk may take this much of it instead
# Below this many source pixels, decoding in this process is quicker than starting worker processes.
POOL_MIN_PIXELS = 100e6
MEMORY_LIMIT_ENV = "EDGETL_CACHE_MEMORY_MAX"  # bytes; overrides the rule above (0: always a file)


def memory_limit() -> int:
    """The largest cache held in memory rather than in a mapped file."""
    if os.environ.get(MEMORY_LIMIT_ENV, "").strip():
        return max(0, int(os.environ[MEMORY_LIMIT_ENV]))
    return int(min(MEMORY_CAP, MEMORY_SHARE * available_memory()))


@dataclass(frozen=True)
class Share:
    """Which images this process decodes: every `count`-th from `index`, into a file the others share."""

    index: int = 0
    count: int = 1
    node: int = 0


def _decode_task(task: tuple[str, int, tuple[int, int]]) -> tuple[np.ndarray | None, tuple[int, int], str]:
    path, side, size = task
    try:
        pixels, source = decode_small(Path(path), side, size)
        return pixels, source, ""
    except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, DecompressionBombError...
        return None, (0, 0), error_text(error)


@dataclass
class ImageCache:
    """The decoded pixels of a run's images, one flat uint8 buffer with an index by relative path."""

    side: int
    pixels: np.ndarray  # flat uint8: in memory or a numpy memmap
    offsets: np.ndarray  # (n,) int64 start of each image in `pixels`
    sizes: np.ndarray  # (n, 2) int32 stored width, height
    sources: np.ndarray  # (n, 2) int32 width, height the image was decoded at (its proportions)
    errors: list[str]
    index: dict[str, int]
    record: dict = field(default_factory=dict)

    def get(self, rel: str) -> tuple[np.ndarray, tuple[int, int]]:
        """Pixels (HWC uint8) and decoded size of one image; DecodeError when its file failed to decode."""
        i = self.index[rel]
        if self.errors[i]:
            raise DecodeError(self.errors[i])
        width, height = (int(v) for v in self.sizes[i])
        start = int(self.offsets[i])
        pixels = self.pixels[start : start + width * height * 3].reshape(height, width, 3)
        return pixels, (int(self.sources[i][0]), int(self.sources[i][1]))

    def failures(self) -> dict[str, str]:
        return {rel: self.errors[i] for rel, i in self.index.items() if self.errors[i]}


def _plan(root: Path, rels: list[str], side: int, reuse: ImageCache | None
          ) -> tuple[np.ndarray, np.ndarray, float]:
    """Stored (width, height) of each image from its header (or the earlier cache), offsets in the buffer,
    and the pixels the files hold (what decoding them costs, before draft scaling)."""
    sizes = np.zeros((len(rels), 2), np.int64)
    source_pixels = 0.0
    for i, rel in enumerate(rels):
        if reuse is not None and rel in reuse.index and not reuse.errors[reuse.index[rel]]:
            width, height = (int(v) for v in reuse.sources[reuse.index[rel]])
        else:
            try:
                width, height = upright_size(root / rel)
                source_pixels += width * height
            except Exception:  # the decode reports it; keep a slot of the largest size
                width, height = side, side
        sizes[i] = (min(width, side), min(height, side))
    nbytes = sizes[:, 0] * sizes[:, 1] * 3
    offsets = np.zeros(len(rels), np.int64)
    offsets[1:] = np.cumsum(nbytes)[:-1]
    return sizes, offsets, source_pixels


def _allocate(total: int, folder: Path | None, create: bool) -> np.ndarray:
    """The flat buffer: memory, or a file of `total` bytes whose blocks are reserved now (a full disk fails
    here with ENOSPC, not later as a bus error while writing through the mapping)."""
    if folder is None:
        return np.empty(max(1, total), np.uint8)
    path = folder / "pixels.u8"
    if create:
        with open(path, "wb") as handle:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, max(1, total))
            else:
                handle.truncate(max(1, total))
    return np.memmap(path, np.uint8, mode="r+", shape=(max(1, total),))


def _attempt(make: Callable[[], object]) -> tuple:
    """("ok", None) or ("error", errno, text): an OSError as a value, to hand from one process to the others."""
    try:
        make()
        return ("ok", None)
    except OSError as error:
        return ("error", error.errno, error.strerror or str(error))


def _resized(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (pixels.shape[1], pixels.shape[0]) == tuple(size):
        return pixels
    return np.asarray(Image.fromarray(np.asarray(pixels)).resize(tuple(size), Image.Resampling.BILINEAR))


@contextlib.contextmanager
def open_cache(root: Path, rels: list[str], side: int, where: Path, *, share: Share = Share(),
               sync: Callable[[Callable[[], object]], object] | None = None,
               merge: Callable[[dict], dict] | None = None, reuse: ImageCache | None = None,
               progress: Callable[[int], None] | None = None) -> Iterator[ImageCache]:
    """Decode `rels` (paths under `root`) once and yield the cache; its file, if any, is removed at the end.

    `where`: the folder that holds a cache too large for memory (a hidden scratch folder is made in it).
    Several processes (`share.count` > 1) build one file together: `sync(fn)` runs fn on the first process and
    hands its result to all (and is a barrier); `merge` unions their decode failures. `reuse`: an earlier
    cache of a larger side whose pixels are resized instead of decoded again. `progress(n)` is told each n
    images done.
    """
    started = time.perf_counter()
    sync = sync or (lambda make: make())
    merge = merge or dict
    sizes, offsets, source_pixels = _plan(root, rels, side, reuse)
    total = int((sizes[:, 0] * sizes[:, 1] * 3).sum())
    limit = memory_limit()
    in_memory = share.count == 1 and total <= limit
    with contextlib.ExitStack() as stack:
        folder: Path | None = None
        fallback = ""
        if not in_memory:
            try:
                folder = stack.enter_context(scratch_dir(where / "image-cache", sync=sync))
                made = sync(lambda: _attempt(lambda: _allocate(total, folder, create=True)))
                if made[0] == "error":
                    raise OSError(made[1], made[2])
                pixels = _allocate(total, folder, create=False)
            except OSError as error:
                fits = share.count == 1 and total <= FALLBACK_SHARE * available_memory()
                if not fits:
                    reason = "no space left" if error.errno == errno.ENOSPC else (error.strerror or str(error))
                    raise UserError(f"the image cache cannot be written in {str(where)!r} ({reason}): it needs "
                                    f"{total / 1e6:.0f} MB there; free space or give --out on another disk") from None
                stack.close()
                folder, in_memory = None, True
                fallback = f"the cache folder in {str(where)!r} could not be written ({error.strerror or error})"
        if in_memory:
            pixels = _allocate(total, None, create=True)
        sources = np.zeros((len(rels), 2), np.int32)
        errors = [""] * len(rels)
        mine = list(range(share.index, len(rels), share.count))
        reused = [i for i in mine if reuse is not None and rels[i] in reuse.index
                  and not reuse.errors[reuse.index[rels[i]]]]
        for i in reused:
            old, source = reuse.get(rels[i])
            width, height = sizes[i]
            pixels[offsets[i] : offsets[i] + width * height * 3] = _resized(old, (width, height)).reshape(-1)
            sources[i] = source
        if progress and reused:
            progress(len(reused))
        todo = sorted(set(mine) - set(reused))
        workers = _decode(root, rels, side, todo, sizes, offsets, pixels, sources, errors, share, progress,
                          source_pixels / max(1, share.count))
        if folder is not None:
            pixels.flush()
        reused_set = set(reused)
        table = {rels[i]: (sources[i].tolist(), errors[i], i in reused_set) for i in mine}
        if share.count > 1:  # every process needs every image's decoded size and failure
            table = merge(table)
            for i, rel in enumerate(rels):
                sources[i], errors[i] = table[rel][:2]
            sync(lambda: None)
        resized = sum(1 for entry in table.values() if entry[2])
        cache = ImageCache(side=side, pixels=pixels, offsets=offsets, sizes=sizes.astype(np.int32), sources=sources,
                           errors=errors, index={rel: i for i, rel in enumerate(rels)})
        cache.record = {
            "where": "memory" if folder is None else "file",
            "bytes": total,
            "images": len(rels),
            "max_side": side,
            "memory_limit_bytes": limit,
            "decoded": len(table) - resized,
            "resized_from_search": resized,
            "decode_processes": workers,
            "failed": sum(1 for e in errors if e),
            "seconds": round(time.perf_counter() - started, 2),
        }
        if share.count > 1:
            cache.record["shared_by_processes"] = share.count
        if fallback:
            cache.record["fallback"] = fallback
        try:
            yield cache
        finally:
            cache.pixels = np.empty(0, np.uint8)  # unmapped before its folder goes
            del pixels


def _decode(root: Path, rels: list[str], side: int, todo: list[int], sizes: np.ndarray, offsets: np.ndarray,
            pixels: np.ndarray, sources: np.ndarray, errors: list[str], share: Share,
            progress: Callable[[int], None] | None, source_pixels: float) -> int:
    """Decode the images `todo` into `pixels`: in worker processes when the work is worth starting them
    (on the cores this process's share of the machine holds). Returns the number of decoding processes."""
    processes = max(1, usable_cores() // share.count)
    if processes < 2 or source_pixels < POOL_MIN_PIXELS or len(todo) < 4 * processes:
        processes = 1
    tasks = ((str(root / rels[i]), side, (int(sizes[i][0]), int(sizes[i][1]))) for i in todo)

    def store(i: int, result: tuple[np.ndarray | None, tuple[int, int], str]) -> None:
        decoded, source, error = result
        if error:
            errors[i] = error
        else:
            width, height = sizes[i]
            pixels[offsets[i] : offsets[i] + width * height * 3] = decoded.reshape(-1)
            sources[i] = source
        if progress:
            progress(1)

    if processes == 1:
        for i, task in zip(todo, tasks, strict=True):
            store(i, _decode_task(task))
        return 1
    # spawned, not forked: the parent may run torch's or TensorFlow's threads
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        try:
            for i, result in zip(todo, pool.map(_decode_task, tasks, chunksize=4), strict=True):
                store(i, result)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return processes
