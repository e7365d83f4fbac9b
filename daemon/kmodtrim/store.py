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
from collections.abc import Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from typing import Any

from .errors import (
    BusyError,
    NoSuchGenerationError,
    PermissionDeniedError,
    StoreError,
    UntrustedStateError,
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
    make_dirs,
    read_json,
    read_state_bytes,
    replace_file,
    state_dir,
)

__all__ = [  # re-exported: callers import them from here
    "DIR_MODE", "FILE_MODE", "GENERATION_ZERO", "STATE_DIR", "STATE_FILE_LIMIT", "Generation",
    "RemovedPackage", "StashedFile", "atomic_write_bytes", "atomic_write_json",
    "check_trusted", "fsync_dir", "make_dirs", "read_json", "replace_file", "state_dir",
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




def generations_dir(root: Path) -> Path:
    return state_dir(root) / "generations"


def generation_numbers(root: Path) -> list[int]:
    """Recorded generation numbers (0 always exists), ascending."""
    numbers = {0}
    with contextlib.suppress(OSError):
        for name in os.listdir(generations_dir(root)):
            stem, dot, ext = name.partition(".")
            if dot and ext == "json" and stem.isdigit():
                numbers.add(int(stem))
    return sorted(numbers)


# Manifests never change once written: each is read once per process (keyed by its inode,
# size and mtime, so a file replaced meanwhile is read again).
# At most a few: a long-running kmodtrimd must not keep every manifest it ever read.
_GENERATIONS: dict[str, tuple[tuple[int, int, int], Generation]] = {}
_GENERATIONS_KEPT = 4


def load_generation(root: Path, number: int) -> Generation:
    """Generation ``number``. Raises NoSuchGenerationError or StoreError."""
    if number == 0:
        return GENERATION_ZERO
    path = generations_dir(root) / f"{number}.json"
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
    """Write generation's manifest, then its summary (summary_of), which names the
    manifest's size and CRC-32: a summary that does not match its manifest is not used."""
    data = encode_json(generation.to_json())
    atomic_write_bytes(generations_dir(root) / f"{generation.number}.json", data)
    atomic_write_json(_summary_path(root, generation.number),
                      {"manifest": _fingerprint(data), **summary_of(generation)})


def _fingerprint(data: bytes) -> list[int]:
    """[size, CRC-32] of a manifest's bytes: whether a summary was written for it (state
    files are trusted, so this guards against a stale summary, not a forged one; CRC-32
    keeps OpenSSL's libcrypto out of kmodtrimd, which reads summaries)."""
    import zlib

    return [len(data), zlib.crc32(data)]


def _summary_path(root: Path, number: int) -> Path:
    return generations_dir(root) / f"{number}.summary.json"


_SUMMARY_TYPES = {"generation": int, "created": str, "action": str, "description": str,
                  "removed_files": int, "removed_bytes": int, "kernels": dict}
HISTORY_KEYS = tuple(k for k in _SUMMARY_TYPES if k != "kernels")  # what ``history`` lists


def summary_of(generation: Generation) -> dict[str, Any]:
    """A generation in short: what ``history`` lists (HISTORY_KEYS), and per kernel the
    names of its modules out of the tree, how many module files and how many bytes
    (what kmodtrimd's self-healing and metrics need)."""
    kernels: dict[str, dict[str, Any]] = {}
    for f in generation.removed:
        if f.kernel:
            entry = kernels.setdefault(f.kernel, {"modules": set(), "module_files": 0,
                                                  "bytes": 0})
            if f.kind == "module":
                entry["module_files"] += 1
                if f.module:
                    entry["modules"].add(f.module)
            entry["bytes"] += f.size
    for entry in kernels.values():
        entry["modules"] = sorted(entry["modules"])
    return {"generation": generation.number, "created": generation.created,
            "action": generation.action, "description": generation.description,
            "removed_files": len(generation.removed),
            "removed_bytes": generation.removed_bytes, "kernels": kernels}


def _valid_kernels(kernels: dict[str, Any]) -> bool:
    return all(isinstance(entry, dict) and isinstance(entry.get("modules"), list)
               and all(isinstance(m, str) for m in entry["modules"])
               and type(entry.get("module_files")) is int and type(entry.get("bytes")) is int
               for entry in kernels.values())


def generation_summary(root: Path, number: int) -> dict[str, Any]:
    """summary_of(generation ``number``), from its summary file when that was written for
    exactly the manifest there is (its size and CRC-32), else from the manifest. A
    manifest lists thousands of files: reading only the summaries keeps ``history`` fast
    and kmodtrimd small. Raises NoSuchGenerationError, StoreError."""
    if number > 0:
        try:
            summary = read_json(_summary_path(root, number), root)
            data = read_state_bytes(generations_dir(root) / f"{number}.json", root)
        except (FileNotFoundError, StoreError):
            summary = None
        if (isinstance(summary, dict) and summary.get("generation") == number
                and summary.get("manifest") == _fingerprint(data)
                and all(type(summary.get(key)) is kind for key, kind in _SUMMARY_TYPES.items())
                and _valid_kernels(summary["kernels"])):
            return {key: summary[key] for key in _SUMMARY_TYPES}
    return summary_of(load_generation(root, number))


def generation_rows(root: Path) -> list[dict[str, Any]]:
    """Every generation as ``history`` lists it, oldest first (the last is current)."""
    rows = [generation_summary(root, n) for n in generation_numbers(root)]
    current = rows[-1]["generation"]
    return [{**{key: row[key] for key in HISTORY_KEYS}, "current": row["generation"] == current}
            for row in rows]


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


def journal_path(root: Path) -> Path:
    return state_dir(root) / "journal.json"


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


# ---------------------------------------------------------------------------------------
# Observations (modules seen loaded, per boot)


def observations_path(root: Path) -> Path:
    return state_dir(root) / "observations.json"


def _check_observations(path: Path, doc: Any) -> dict[str, Any]:
    """``doc`` if it has the observations file's structure; raises StoreError."""
    def is_names(value: Any) -> bool:
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items())

    if not isinstance(doc, dict) or not isinstance(doc.get("boots"), dict):
        raise StoreError(f"{path}: unexpected structure")
    for boot in doc["boots"].values():
        if (not isinstance(boot, dict) or not isinstance(boot.get("modules"), list)
                or not all(isinstance(m, str) for m in boot["modules"])
                or not all(isinstance(boot.get(k, 0), int | float)
                           for k in ("first_seen", "last_seen"))
                or not all(_is_sighting(s) for s in _as_dict(boot.get("seen", {})))):
            raise StoreError(f"{path}: a boot record has an unexpected structure")
    for key in ("supplied", "restored"):
        if not is_names(doc.get(key, {})):
            raise StoreError(f"{path}: {key!r} is not a map of names")
    return doc


def _observations_doc(root: Path, *, for_update: bool = False) -> dict[str, Any]:
    """The whole observations file. A corrupt one is treated as empty (logged); before an
    update it is moved aside (``observations.json.corrupt-TIME``) — a reader never renames
    anything."""
    path = observations_path(root)
    try:
        return _check_observations(path, read_json(path, root))
    except FileNotFoundError:
        return {"boots": {}}
    except UntrustedStateError:
        raise  # not corrupt but planted: never read, never touched
    except StoreError as exc:
        if not for_update:
            log.warning("%s; ignoring it (the next change sets it aside)", exc.message)
            return {"boots": {}}
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.warning("%s; set aside as %s, starting from no observations", exc.message, aside)
        return {"boots": {}}


class HowSeen(StrEnum):
    """How a module was seen loaded (a boot record's ``seen`` says it per module)."""

    PROC_MODULES = "proc-modules"  # the /proc/modules snapshot at start-up or --record
    UEVENT = "uevent"  # a module's uevent while the daemon ran
    MODALIAS = "modalias"  # restored for a device's modalias (self-healing)


def _as_dict(value: Any) -> list[Any]:
    return list(value.values()) if isinstance(value, dict) else [None]


def _is_sighting(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("first"), int | float)
            and isinstance(value.get("last"), int | float)
            and isinstance(value.get("how"), list)
            and all(isinstance(h, str) for h in value["how"]))


def read_observations(root: Path) -> dict[str, dict[str, Any]]:
    """boot id → {"first_seen": epoch, "last_seen": epoch, "modules": [names]}, and since
    the fleet export, ``"seen"``: name → {"first", "last", "how": [HowSeen]} for the
    modules recorded since (older boot records lack it: their boot's times stand)."""
    boots: dict[str, dict[str, Any]] = _observations_doc(root)["boots"]
    return boots


def read_supplied(root: Path) -> dict[str, str]:
    """Module name → where it came from, for observations an admin supplied to an applied
    trim (``--observed FILE``): later kernels are trimmed with them too."""
    supplied: dict[str, str] = _observations_doc(root).get("supplied", {})
    return supplied


def read_restored(root: Path) -> dict[str, str]:
    """Module name → when and how it was restored: kept by later plans until forgotten."""
    restored: dict[str, str] = _observations_doc(root).get("restored", {})
    return restored


def _update_names(root: Path, key: str, add: dict[str, str], drop: Iterable[str] = (),
                  *, replace_existing: bool = False) -> None:
    doc = _observations_doc(root, for_update=True)
    names = doc.setdefault(key, {})
    for name, source in add.items():
        if replace_existing:
            names[name] = source
        else:
            names.setdefault(name, source)
    for name in drop:
        names.pop(name, None)
    atomic_write_json(observations_path(root), doc)


def record_supplied(root: Path, names: dict[str, str]) -> None:
    """Remember supplied observations (name → source), in addition to earlier ones."""
    _update_names(root, "supplied", names)


def record_restored(root: Path, names: dict[str, str]) -> None:
    """Remember modules restored by hand or on demand (name → how and when)."""
    _update_names(root, "restored", names, replace_existing=True)


def forget_restored(root: Path, names: set[str]) -> set[str]:
    """Stop keeping ``names`` for having been restored; returns those that were kept."""
    known = set(read_restored(root)) & names
    if known:
        _update_names(root, "restored", {}, known)
    return known


def record_observation(
    root: Path, boot_id: str, modules: list[str], now: float | None = None,
    how: HowSeen = HowSeen.PROC_MODULES,
) -> None:
    """Add modules seen loaded during boot ``boot_id`` (union with what was recorded),
    each with when (first and last) and ``how`` it was seen."""
    now = time.time() if now is None else now
    doc = _observations_doc(root, for_update=True)
    boot = doc["boots"].setdefault(boot_id, {"first_seen": now, "last_seen": now, "modules": []})
    boot["last_seen"] = now
    boot["modules"] = sorted(set(boot["modules"]) | set(modules))
    seen = boot.setdefault("seen", {})
    for name in modules:
        sighting = seen.setdefault(name, {"first": now, "last": now, "how": []})
        sighting["last"] = now
        sighting["how"] = sorted(set(sighting["how"]) | {str(how)})
    atomic_write_json(observations_path(root), doc)
