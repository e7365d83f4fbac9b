"""Reading many module files at once: compressed ones on every CPU (up to MAX_THREADS).

On a compressed tree (Debian 13's ``.ko.xz``) a cold index spends about 85 % of its CPU
time in liblzma, the same work depmod does. lzma, zlib and zstandard release the GIL
while they work, so threads decompress on every CPU while one of them parses (parsing
holds the GIL, and is the smaller part). Uncompressed modules are mapped and parsed,
which is all Python: they are read in this thread, in order, as before. A thread holds at
most one module's bytes at a time, so memory grows by one decompressed module per thread
(at most MAX_THREADS), not by the tree.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..elf import ModuleInfo, read_module
from ..errors import ModuleParseError
from ..names import compression_of

# Fewer compressed files than this are read in this thread: starting threads for a
# handful of files (an update of a few modules) costs more than it saves.
_MIN_PARALLEL_FILES = 16
# At most this many threads: each may hold one module's bytes, up to the module cap
# (inputs.MAX_MODULE_BYTES) for a decompression bomb, so a tree of bombs costs at most
# this many caps at once. Beyond 4 the parsing, which holds the GIL, is what is left.
MAX_THREADS = 4


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def thread_count(cpus: int) -> int:
    """How many threads read compressed modules on a machine with ``cpus`` usable CPUs."""
    return max(1, min(cpus, MAX_THREADS))


def _read_one(path: Path) -> ModuleInfo | ModuleParseError:
    try:
        return read_module(path)
    except ModuleParseError as exc:
        return exc


def read_modules(
    moddir: Path, relpaths: Sequence[str], workers: int | None = None
) -> Generator[ModuleInfo | ModuleParseError, None, None]:
    """read_module for each of ``relpaths`` (under ``moddir``), in their order: its
    ModuleInfo, or the ModuleParseError it raised. Compressed files are read by up to
    ``workers`` threads (default: thread_count(usable_cpus())), at most a few dozen
    files ahead of the caller."""
    workers = thread_count(usable_cpus()) if workers is None else max(1, workers)
    compressed = sum(1 for relpath in relpaths if compression_of(relpath) is not None)
    if workers == 1 or compressed < _MIN_PARALLEL_FILES:
        for relpath in relpaths:
            yield _read_one(moddir / relpath)
        return
    with ThreadPoolExecutor(max_workers=workers,
                            thread_name_prefix="kmodtrim-read") as pool:
        # A bounded window of submitted reads keeps every thread busy while only a few
        # results (small ModuleInfos, never module bytes) wait for the caller.
        window = 16 * workers
        ahead: deque[Future[ModuleInfo | ModuleParseError] | Path] = deque()
        for relpath in relpaths:
            path = moddir / relpath
            if compression_of(relpath) is None:
                ahead.append(path)  # read in order, in this thread
            else:
                ahead.append(pool.submit(_read_one, path))
            if len(ahead) >= window:
                yield _result(ahead.popleft())
        while ahead:
            yield _result(ahead.popleft())


def _result(item: Future[ModuleInfo | ModuleParseError] | Path
            ) -> ModuleInfo | ModuleParseError:
    return _read_one(item) if isinstance(item, Path) else item.result()
