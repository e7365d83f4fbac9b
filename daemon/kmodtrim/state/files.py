"""kmodtrim's state files, whatever they hold: where they live, the rule that only root
may have written them (check_trusted), directories and files created with explicit modes,
atomic replacement (temp file, fsync, rename, fsync of the directory) and bounded JSON
reading. store.py (generations, journal, lock, observations) and the stash build on it."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..errors import StoreError, UntrustedStateError

STATE_DIR = "var/lib/kmodtrim"
DIR_MODE = 0o755  # state directories, whatever the umask
FILE_MODE = 0o644  # state files


def state_dir(root: Path) -> Path:
    return root / STATE_DIR


def journal_path(root: Path) -> Path:
    """The write-ahead journal of the running operation (absent when idle)."""
    return state_dir(root) / "journal.json"


def stash_dir(root: Path) -> Path:
    """The stash (state/stash.py): ``packs/`` and ``objects/``."""
    return state_dir(root) / "stash"


def _untrusted(path: Path, st: os.stat_result) -> str | None:
    """Why ``path`` (already lstat'ed) cannot be trusted as kmodtrim state, or None."""
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if st.st_uid not in (0, os.geteuid()):
        return f"it is owned by uid {st.st_uid}, not root"
    if st.st_mode & 0o022:
        return f"it is writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def check_trusted(root: Path, path: Path) -> None:
    """Refuse state at ``path`` (and every directory from ROOT/var down to it) that someone
    other than root could have planted: a symbolic link, another owner, or group- or
    world-writable. Missing components are fine (nothing to trust yet).

    Raises StoreError naming the offending path and what to do.
    """
    try:
        parts = path.relative_to(root).parts
        current = root
    except ValueError:  # not under root: check the file and its own directory
        parts = (path.parent.name, path.name)
        current = path.parent.parent
    for part in parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"cannot check {current}: {exc.strerror or exc}") from None
        why = _untrusted(current, st)
        if why is not None:
            raise UntrustedStateError(
                f"refusing kmodtrim state at {current}: {why}",
                hint="kmodtrim only trusts state that only root can write; inspect it, "
                     "then fix its owner and mode (chown root: and chmod go-w) or remove it",
            )


def make_dirs(path: Path, mode: int = DIR_MODE) -> None:
    """Create ``path`` and missing parents with ``mode`` exactly, whatever the umask."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, mode)
            os.chmod(directory, mode)


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
    mode: int = FILE_MODE,
    owner: tuple[int, int] | None = None,
    mtime_ns: int | None = None,
    durable: bool = True,
) -> None:
    """Write ``data`` beside ``path`` and rename it over ``path``: a reader or a crash sees
    the old file or the new one, never a part. ``durable`` fsyncs the file and directory
    (callers writing thousands of files sync once instead). Missing directories are made
    with DIR_MODE. Raises OSError, leaving no temporary file behind."""
    import tempfile

    make_dirs(path.parent)
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


def atomic_write_bytes(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data`` durably (see replace_file).

    Raises StoreError (e.g. disk full) with the old file untouched.
    """
    try:
        replace_file(path, data, mode=mode)
    except OSError as exc:
        raise StoreError(
            f"cannot write {path}: {exc.strerror or exc}",
            hint="free space (or fix permissions) under that directory and try again",
        ) from None


def encode_json(doc: Any) -> bytes:
    """A state file's bytes: compact, for only then does json use its C encoder
    (manifests list thousands of files)."""
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def atomic_write_json(path: Path, doc: Any) -> None:
    atomic_write_bytes(path, encode_json(doc))


# A damaged manifest is never a reason to move things aside by hand: the stash's own
# records rebuild it (salvage.py) at the next change command.
_DAMAGED_HINT = ("keep the file; kmodtrim rebuilds the state from the stash's own records "
                 "at the next change command (kmodtrim status shows what it found)")
STATE_FILE_LIMIT = 256 << 20  # a manifest of every module of several kernels is ~10 MB


def read_json(path: Path, root: Path | None = None) -> Any:
    """Parse a state file, after checking it (and, given ``root``, its directories) can be
    trusted. Raises FileNotFoundError, or StoreError naming the file if it is untrusted,
    not a regular file, too big or corrupt."""
    data = read_state_bytes(path, root)
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise StoreError(f"{path}: unreadable kmodtrim state ({_short(exc)})") from None


def read_state_bytes(path: Path, root: Path | None = None) -> bytes:
    """A state file's bytes, checked as read_json checks them. Raises FileNotFoundError,
    StoreError."""
    check_trusted(root if root is not None else path.parent, path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreError(f"{path}: cannot read kmodtrim state ({exc.strerror or exc})",
                         hint="check the file's permissions (reading state needs no root, "
                              "changing it does)") from None
    try:
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{path}: not a regular file")
            if st.st_size > STATE_FILE_LIMIT:
                raise StoreError(f"{path}: {st.st_size} bytes, more than kmodtrim state "
                                 f"can be ({STATE_FILE_LIMIT >> 20} MiB)")
            return f.read(STATE_FILE_LIMIT + 1)
    except OSError as exc:
        raise StoreError(f"{path}: unreadable kmodtrim state ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "…"
