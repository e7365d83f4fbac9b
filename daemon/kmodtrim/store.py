"""kmodtrim's persistent state under ROOT/var/lib/kmodtrim: generations, journal, lock,
observations. Every write is atomic (temp file, fsync, rename, fsync of the directory).

Layout::

    var/lib/kmodtrim/
      lock                  flock'ed by the running operation; holds its description
      journal.json          write-ahead journal of the running operation (absent when idle)
      generations/N.json    one manifest per generation (0 is implicit: nothing trimmed)
      observations.json     modules seen loaded, per boot
      stash/packs/, objects/ content-addressed copies of removed files (backends/stash.py)
      rebuild/              packages being rebuilt from the stash (only during an operation)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import BusyError, NoSuchGenerationError, StoreError

STATE_DIR = "var/lib/kmodtrim"
log = logging.getLogger("kmodtrim.store")


def state_dir(root: Path) -> Path:
    return root / STATE_DIR


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(
    path: Path,
    data: bytes,
    *,
    mode: int = 0o644,
    owner: tuple[int, int] | None = None,
    mtime_ns: int | None = None,
    durable: bool = True,
) -> None:
    """Write ``data`` beside ``path`` and rename it over ``path``: a reader or a crash sees
    the old file or the new one, never a part. ``durable`` fsyncs the file and directory
    (callers writing thousands of files sync once instead). Raises OSError, leaving no
    temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".kmodtrim")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if owner is not None:
            with contextlib.suppress(PermissionError):
                os.chown(tmp, *owner)
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` durably (see replace_file).

    Raises StoreError (e.g. disk full) with the old file untouched.
    """
    try:
        replace_file(path, data, mode=mode)
    except OSError as exc:
        raise StoreError(
            f"cannot write {path}: {exc.strerror or exc}",
            hint="free space (or fix permissions) under that directory and try again; "
                 "nothing was changed",
        ) from None


def atomic_write_json(path: Path, doc: Any) -> None:
    # Compact: only then does json use its C encoder (manifests list thousands of files).
    atomic_write_bytes(path, (json.dumps(doc, separators=(",", ":")) + "\n").encode())


def read_json(path: Path) -> Any:
    """Parse a state file. Raises StoreError naming the file if it is corrupt."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise StoreError(
            f"{path}: unreadable kmodtrim state ({exc})",
            hint="move the file aside; kmodtrim will start from what remains",
        ) from None


# ---------------------------------------------------------------------------------------
# The operation lock


@contextlib.contextmanager
def operation_lock(root: Path, description: str) -> Iterator[None]:
    """Hold the one-operation-at-a-time lock for ``root``.

    Raises BusyError naming the running operation (its description, pid and start time).
    """
    directory = state_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
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
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------
# Generations


@dataclass(frozen=True)
class StashedFile:
    """A file kmodtrim took out of the tree, with everything needed to put it back."""

    path: str  # in-root absolute path
    size: int
    sha256: str
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    kind: str = "module"  # "module" or "firmware"
    module: str | None = None  # module name (for modules)
    kernel: str | None = None
    package: str | None = None  # owning package, if any
    link: str | None = None  # a symlink's target (then there is no blob)

    @staticmethod
    def from_json(doc: dict[str, Any]) -> StashedFile:
        return StashedFile(**doc)


@dataclass(frozen=True)
class RemovedPackage:
    """A whole package kmodtrim removed through the package manager, with everything needed
    to rebuild it offline (dpkg-repack style) and install it again.

    ``files`` are every non-directory path the package owns, as it spells them, each with
    its stash copy (files already trimmed share the blob of their ``removed`` entry);
    ``control`` are the package manager's own files for it (dpkg: maintainer scripts,
    md5sums, … with ``module`` holding the control file's name), also stashed; ``dirs``
    the directories it lists with their modes; ``absent`` paths it lists that were already
    missing from the tree for another reason (e.g. documentation a site ``path-exclude``
    keeps out) and that a rebuilt package therefore lacks; ``metadata`` what the backend
    needs for the package's header (dpkg: the control paragraph; rpm: header tags)."""

    name: str  # as the package manager names it (dpkg ``name`` or ``name:arch``)
    version: str
    arch: str
    backend: str  # "dpkg" or "rpm"
    metadata: dict[str, Any] = field(default_factory=dict)
    files: tuple[StashedFile, ...] = ()
    control: tuple[StashedFile, ...] = ()
    dirs: tuple[tuple[str, int], ...] = ()
    absent: tuple[str, ...] = ()

    @property
    def blobs(self) -> set[str]:
        """The stash blobs a rebuild of this package reads."""
        return {f.sha256 for f in self.files + self.control if f.link is None}

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "arch": self.arch,
            "backend": self.backend, "metadata": dict(self.metadata),
            "files": [dict(f.__dict__) for f in self.files],
            "control": [dict(f.__dict__) for f in self.control],
            "dirs": [[path, mode] for path, mode in self.dirs],
            "absent": list(self.absent),
        }

    @staticmethod
    def from_json(doc: dict[str, Any]) -> RemovedPackage:
        return RemovedPackage(
            name=doc["name"], version=doc["version"], arch=doc["arch"],
            backend=doc["backend"], metadata=dict(doc.get("metadata", {})),
            files=tuple(StashedFile.from_json(f) for f in doc.get("files", ())),
            control=tuple(StashedFile.from_json(f) for f in doc.get("control", ())),
            dirs=tuple((str(d[0]), int(d[1])) for d in doc.get("dirs", ())),
            absent=tuple(doc.get("absent", ())),
        )


@dataclass(frozen=True)
class Generation:
    """One numbered state of the trimmed files. ``removed`` is the whole state (every file
    out of the tree), not only this generation's changes."""

    number: int
    created: str
    action: str  # "untrimmed", "apply", "rollback", "restore"
    description: str
    removed: tuple[StashedFile, ...] = ()
    stashed: tuple[str, ...] = ()  # paths this generation took out
    restored: tuple[str, ...] = ()  # paths this generation put back
    kernels: tuple[str, ...] = ()  # kernels whose trees changed
    rollback_to: int | None = None
    keep_reasons: dict[str, str] = field(default_factory=dict)
    regen: dict[str, Any] = field(default_factory=dict)
    # Whole packages out of the system (the whole state, like ``removed``), and the
    # package operations this generation ran.
    packages: tuple[RemovedPackage, ...] = ()
    packages_removed: tuple[str, ...] = ()
    packages_reinstalled: tuple[str, ...] = ()

    @property
    def removed_bytes(self) -> int:
        return sum(f.size for f in self.removed)

    @property
    def referenced_blobs(self) -> set[str]:
        """Every stash blob this state needs: removed files and removed packages."""
        blobs = {f.sha256 for f in self.removed}
        for package in self.packages:
            blobs |= package.blobs
        return blobs

    def to_json(self) -> dict[str, Any]:
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["removed"] = [dict(entry.__dict__) for entry in self.removed]
        for key in ("stashed", "restored", "kernels", "packages_removed",
                    "packages_reinstalled"):
            doc[key] = list(doc[key])
        doc["packages"] = [p.to_json() for p in self.packages]
        doc["keep_reasons"] = dict(self.keep_reasons)
        doc["regen"] = dict(self.regen)
        doc["removed_bytes"] = self.removed_bytes
        return doc

    @staticmethod
    def from_json(doc: dict[str, Any]) -> Generation:
        doc = dict(doc)
        doc.pop("removed_bytes", None)
        doc["removed"] = tuple(StashedFile.from_json(f) for f in doc.get("removed", ()))
        for key in ("stashed", "restored", "kernels", "packages_removed",
                    "packages_reinstalled"):
            doc[key] = tuple(doc.get(key, ()))
        doc["packages"] = tuple(RemovedPackage.from_json(p) for p in doc.get("packages", ()))
        return Generation(**doc)


GENERATION_ZERO = Generation(0, "", "untrimmed", "the tree as installed")


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


def load_generation(root: Path, number: int) -> Generation:
    """Generation ``number``. Raises NoSuchGenerationError or StoreError."""
    if number == 0:
        return GENERATION_ZERO
    path = generations_dir(root) / f"{number}.json"
    try:
        doc = read_json(path)
    except FileNotFoundError:
        known = ", ".join(str(n) for n in generation_numbers(root))
        raise NoSuchGenerationError(
            f"no generation {number} (known: {known})", hint="kmodtrim history lists them"
        ) from None
    try:
        return Generation.from_json(doc)
    except (TypeError, KeyError, ValueError) as exc:
        raise StoreError(f"{path}: not a generation manifest ({exc})") from None


def current_generation(root: Path) -> Generation:
    return load_generation(root, generation_numbers(root)[-1])


def write_generation(root: Path, generation: Generation) -> None:
    atomic_write_json(generations_dir(root) / f"{generation.number}.json", generation.to_json())


# ---------------------------------------------------------------------------------------
# Journal


def journal_path(root: Path) -> Path:
    return state_dir(root) / "journal.json"


def read_journal(root: Path) -> dict[str, Any] | None:
    try:
        doc = read_json(journal_path(root))
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


def _observations_doc(root: Path) -> dict[str, Any]:
    """The whole observations file. A corrupt one is moved aside
    (``observations.json.corrupt-TIME``, logged) and treated as empty."""
    path = observations_path(root)
    try:
        doc = read_json(path)
        if (not isinstance(doc, dict) or not isinstance(doc.get("boots"), dict)
                or not isinstance(doc.get("supplied", {}), dict)):
            raise StoreError(f"{path}: unexpected structure")
        return doc
    except FileNotFoundError:
        return {"boots": {}}
    except StoreError as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.warning("%s; set aside as %s, starting from no observations", exc.message, aside)
        return {"boots": {}}


def read_observations(root: Path) -> dict[str, dict[str, Any]]:
    """boot id → {"first_seen": epoch, "last_seen": epoch, "modules": [names]}."""
    boots: dict[str, dict[str, Any]] = _observations_doc(root)["boots"]
    return boots


def read_supplied(root: Path) -> dict[str, str]:
    """Module name → where it came from, for observations an admin supplied to an applied
    trim (``--observed FILE``): later kernels are trimmed with them too."""
    supplied: dict[str, str] = _observations_doc(root).get("supplied", {})
    return supplied


def record_supplied(root: Path, names: dict[str, str]) -> None:
    """Remember supplied observations (name → source), in addition to earlier ones."""
    doc = _observations_doc(root)
    supplied = doc.setdefault("supplied", {})
    for name, source in names.items():
        supplied.setdefault(name, source)
    atomic_write_json(observations_path(root), doc)


def record_observation(
    root: Path, boot_id: str, modules: list[str], now: float | None = None
) -> None:
    """Add modules seen loaded during boot ``boot_id`` (union with what was recorded)."""
    now = time.time() if now is None else now
    doc = _observations_doc(root)
    boot = doc["boots"].setdefault(boot_id, {"first_seen": now, "last_seen": now, "modules": []})
    boot["last_seen"] = now
    boot["modules"] = sorted(set(boot["modules"]) | set(modules))
    atomic_write_json(observations_path(root), doc)
