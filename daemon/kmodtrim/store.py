"""kmodtrim's persistent state under ROOT/var/lib/kmodtrim: generations, journal, lock,
observations. Every write is atomic (temp file, fsync, rename, fsync of the directory;
state/files.py, which also holds the trust rule every state file is read under).

Layout::

    var/lib/kmodtrim/
      lock                  flock'ed by the running operation; holds its description
      journal.json          write-ahead journal of the running operation (absent when idle)
      generations/N.json    one manifest per generation (0 is implicit: nothing trimmed)
      observations.json     modules seen loaded, per boot
      stash/packs/, objects/ content-addressed copies of removed files (state/stash.py)
      rebuild/              packages being rebuilt from the stash (only during an operation)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import (
    BusyError,
    NoSuchGenerationError,
    PermissionDeniedError,
    StoreError,
)
from .records import GENERATION_ZERO, Generation, RemovedPackage, StashedFile
from .state.files import (
    _DAMAGED_HINT,
    DIR_MODE,
    FILE_MODE,
    STATE_DIR,
    STATE_FILE_LIMIT,
    atomic_write_bytes,
    atomic_write_json,
    check_trusted,
    encode_json,
    fsync_dir,
    journal_path,
    make_dirs,
    read_json,
    replace_file,
    state_dir,
)
from .state.observations import (
    HowSeen,
    forget_restored,
    observations_path,
    read_observations,
    read_restored,
    read_supplied,
    record_observation,
    record_restored,
    record_supplied,
)
from .state.summary import (
    HISTORY_KEYS,
    generation_numbers,
    generations_dir,
    manifest_path,
    summary_document,
    summary_of,
    summary_path,
)

__all__ = [  # re-exported: callers import them from here
    "DIR_MODE",
    "FILE_MODE",
    "GENERATION_ZERO",
    "HISTORY_KEYS",
    "STATE_DIR",
    "STATE_FILE_LIMIT",
    "Generation",
    "HowSeen",
    "RemovedPackage",
    "StashedFile",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_trusted",
    "forget_restored",
    "fsync_dir",
    "generation_numbers",
    "generations_dir",
    "journal_path",
    "make_dirs",
    "observations_path",
    "read_json",
    "read_observations",
    "read_restored",
    "read_supplied",
    "record_observation",
    "record_restored",
    "record_supplied",
    "replace_file",
    "state_dir",
    "summary_of",
]

log = logging.getLogger("kmodtrim.store")

# ---------------------------------------------------------------------------------------
# The operation lock


@contextlib.contextmanager
def operation_lock(root: Path, description: str) -> Iterator[None]:
    """Hold the one-operation-at-a-time lock for ``root``.

    Raises BusyError naming the running operation (its description, pid and start time).
    """
    directory = state_dir(root)
    check_trusted(root, directory / "lock")
    try:
        make_dirs(directory)
        fd = os.open(directory / "lock",
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except PermissionError:
        raise PermissionDeniedError(
            f"{description}: permission denied on {directory}",
            hint="changing the system's modules needs root (run it with sudo), or go "
                 "through kmodtrimd, which asks polkit") from None
    except OSError as exc:
        raise StoreError(f"cannot use the state directory {directory}: "
                         f"{exc.strerror or exc}",
                         hint="it must be a directory only root can write") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            raise BusyError(
                f"another kmodtrim operation is running: {holder}",
                hint="wait for it to finish (kmodtrim history shows the result)",
            ) from None
        os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):  # only informs BusyError; a full disk may refuse
            os.pwrite(fd, f"{description} (pid {os.getpid()}, since {_now()})\n".encode(), 0)
        _sweep_temporaries(directory)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _sweep_temporaries(directory: Path) -> None:
    """Remove what a killed writer of the journal or a manifest left (only the lock
    holder writes those, so nothing in flight is touched)."""
    for folder, prefix in ((directory, ".journal.json."), (directory / "generations", ".")):
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if name.startswith(prefix) and name.endswith(".kmodtrim"):
                    with contextlib.suppress(OSError):
                        os.unlink(folder / name)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------
# Generations


# Manifests never change once written: each is read once per process (keyed by its inode,
# size and mtime, so a file replaced meanwhile is read again).
# At most a few: a long-running kmodtrimd must not keep every manifest it ever read.
_GENERATIONS: dict[str, tuple[tuple[int, int, int], Generation]] = {}
_GENERATIONS_KEPT = 4


def load_generation(root: Path, number: int) -> Generation:
    """Generation ``number``. Raises NoSuchGenerationError or StoreError."""
    if number == 0:
        return GENERATION_ZERO
    path = manifest_path(root, number)
    try:
        st = os.stat(path)
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = _GENERATIONS.get(str(path))
        if cached is not None and cached[0] == key:
            check_trusted(root, path)
            return cached[1]
    except OSError:
        key = None
    try:
        doc = read_json(path, root)
    except FileNotFoundError:
        known = ", ".join(str(n) for n in generation_numbers(root))
        raise NoSuchGenerationError(
            f"no generation {number} (known: {known})", hint="kmodtrim history lists them"
        ) from None
    try:
        generation = Generation.from_json(doc)
    except StoreError as exc:
        raise StoreError(f"{path}: not a valid generation manifest: {exc.message}",
                         hint=_DAMAGED_HINT) from None
    if key is not None:
        _GENERATIONS.pop(str(path), None)
        _GENERATIONS[str(path)] = (key, generation)
        while len(_GENERATIONS) > _GENERATIONS_KEPT:  # the oldest read goes first
            del _GENERATIONS[next(iter(_GENERATIONS))]
    return generation


def current_generation(root: Path) -> Generation:
    return load_generation(root, generation_numbers(root)[-1])


def write_generation(root: Path, generation: Generation) -> None:
    """Write generation's manifest, then its summary (state/summary.py), which names the
    manifest's size and CRC-32: a summary that does not match its manifest is not used."""
    data = encode_json(generation.to_json())
    atomic_write_bytes(manifest_path(root, generation.number), data)
    atomic_write_json(summary_path(root, generation.number),
                      summary_document(generation, data))


def module_history(root: Path, path: str) -> dict[str, int | None]:
    """The generation that last took ``path`` out and the one that last put it back."""
    taken: int | None = None
    back: int | None = None
    for number in generation_numbers(root)[1:]:
        try:
            g = load_generation(root, number)
        except StoreError:
            continue
        if path in g.stashed:
            taken = number
        if path in g.restored:
            back = number
    return {"trimmed_in": taken, "restored_in": back}


# ---------------------------------------------------------------------------------------
# Journal


def read_journal(root: Path) -> dict[str, Any] | None:
    try:
        doc = read_json(journal_path(root), root)
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict):
        raise StoreError(f"{journal_path(root)}: not a journal")
    return doc


def write_journal(root: Path, doc: dict[str, Any]) -> None:
    atomic_write_json(journal_path(root), doc)


def clear_journal(root: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        journal_path(root).unlink()
        fsync_dir(state_dir(root))
