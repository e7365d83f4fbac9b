"""Writes under a root that never leave it.

Every file kmodtrim puts back, unlinks or creates in a tree it manages goes through these
functions. They walk the path from the root one component at a time with ``openat`` and
``O_NOFOLLOW``; a component that is a symbolic link is resolved *inside* the root the way a
``chroot`` would (an absolute target starts again at the root, ``..`` stops at the root), so
an image root from an untrusted source cannot redirect a write outside itself, and the
usrmerge links (``lib -> usr/lib``) of a real root keep working. The last component is never
followed: a link there is replaced or removed as the link it is.

Temporary files are named after their destination (``.NAME.kmodtrim-tmp``), never at random,
so crash recovery knows exactly which leftovers to sweep (``sweep_temporaries``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Iterator
from pathlib import Path

from .errors import StoreError

_MAX_LINKS = 40  # as the kernel's own limit on links followed in one lookup
TEMP_SUFFIX = ".kmodtrim-tmp"


class UnsafePathError(StoreError):
    """A path kmodtrim was asked to write is not a plain path under its root."""


def check_relative(path: str) -> list[str]:
    """The components of in-root absolute ``path`` ("/lib/modules/…"). Raises
    UnsafePathError unless it is absolute and normalised (no ``..``, ``.``, ``//``, NUL)."""
    if (not isinstance(path, str) or not path.startswith("/") or "\0" in path
            or posixpath.normpath(path) != path or path == "/"):
        raise UnsafePathError(
            f"refusing path {path[:200]!r}: not a normalised absolute path"
            if isinstance(path, str) else f"refusing path {path!r}: not a string")
    parts = path.split("/")[1:]
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"refusing path {path[:200]!r}: not a normalised absolute path")
    return parts


def temp_name(name: str) -> str:
    """The temporary name a file ``name`` is written under before its rename."""
    return f".{name}{TEMP_SUFFIX}"


def _open_dir(name: str, dir_fd: int) -> int:
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                   dir_fd=dir_fd)


@contextlib.contextmanager
def open_parent(root: Path, path: str, *, create: bool = False,
                dir_mode: int = 0o755) -> Iterator[tuple[int, str]]:
    """Yield (descriptor of the directory holding in-root ``path``, its last component).

    Missing directories are made (with ``dir_mode``) when ``create``; otherwise a missing
    one raises FileNotFoundError. Raises UnsafePathError for a path that is not normalised
    or whose links loop, OSError for other failures.
    """
    with _open_chain(root, path, create, dir_mode) as (fds, name):
        yield fds[-1], name


@contextlib.contextmanager
def _open_chain(root: Path, path: str, create: bool = False,
                dir_mode: int = 0o755) -> Iterator[tuple[list[int], str]]:
    """open_parent's walk: yields the descriptors of the directories from the root (or
    from where the last absolute link restarted) down to ``path``'s, and its last
    component."""
    parts = check_relative(path)
    name = parts[-1]
    pending = list(reversed(parts[:-1]))  # components still to walk, next one last
    if create:
        os.makedirs(root, dir_mode, exist_ok=True)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fds = [root_fd]  # fds[-1] is the directory reached so far
    links = 0
    try:
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if len(fds) > 1:
                    os.close(fds.pop())
                continue
            try:
                fds.append(_open_dir(part, fds[-1]))
                continue
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_mode, dir_fd=fds[-1])
                    os.chmod(part, dir_mode, dir_fd=fds[-1])  # whatever the umask
                fds.append(_open_dir(part, fds[-1]))
                continue
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
            st = os.lstat(part, dir_fd=fds[-1])
            if not stat.S_ISLNK(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
            links += 1
            if links > _MAX_LINKS:
                raise UnsafePathError(f"refusing path {path}: too many symbolic links")
            target = os.readlink(part, dir_fd=fds[-1])
            if target.startswith("/"):
                while len(fds) > 1:
                    os.close(fds.pop())
            pending.extend(reversed(target.split("/")))
        yield fds, name
    finally:
        for fd in fds:
            os.close(fd)


# A few files are flushed one by one; beyond this many, one sync() of everything costs
# less than an fsync (a journal commit) each.
SYNC_EACH_MAX = 64


def make_durable(root: Path, paths: list[str]) -> None:
    """Flush the files at in-root ``paths`` and every directory leading to them to disk,
    as ``os.sync()`` would, without writing back everything else the machine has pending
    (a module restored on demand waited for other programs' writes). Over SYNC_EACH_MAX
    paths, ``os.sync()``. A link is flushed as its directory entry; a missing path as its
    directory. Raises OSError (an I/O error while flushing)."""
    if len(paths) > SYNC_EACH_MAX:
        os.sync()
        return
    flushed: set[tuple[int, int]] = set()  # directories (st_dev, st_ino)
    for path in paths:
        try:
            with _open_chain(root, path) as (fds, name):
                try:
                    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                 | os.O_CLOEXEC, dir_fd=fds[-1])
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.ELOOP:  # ELOOP: a link, flushed with its directory
                        raise
                else:
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                for dfd in reversed(fds):
                    st = os.fstat(dfd)
                    if (st.st_dev, st.st_ino) not in flushed:
                        flushed.add((st.st_dev, st.st_ino))
                        os.fsync(dfd)
        except FileNotFoundError:
            continue  # its directory is gone too: nothing of it to flush


class Walk:
    """open_parent for many paths in a row: the descriptor of each directory reached is
    kept until the walk ends, so thousands of files in a few directories cost a few walks.
    Not for threads. Use as a context manager."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: dict[str, int] = {}

    def __enter__(self) -> Walk:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def parent(self, path: str) -> tuple[int, str]:
        """(descriptor of the directory holding ``path``, its last component), as
        open_parent gives them. Raises FileNotFoundError, OSError, UnsafePathError."""
        check_relative(path)
        directory, _, name = path.rpartition("/")
        fd = self._dirs.get(directory)
        if fd is None:
            with open_parent(self.root, path) as (found, _name):
                fd = os.dup(found)
            self._dirs[directory] = fd
        return fd, name

    def lexists(self, path: str) -> bool:
        try:
            fd, name = self.parent(path)
            os.lstat(name, dir_fd=fd)
            return True
        except (OSError, UnsafePathError):
            return False

    def unlink(self, path: str) -> bool:
        """Remove the file or link at ``path``; False if it was not there."""
        try:
            fd, name = self.parent(path)
            os.unlink(name, dir_fd=fd)
            return True
        except FileNotFoundError:
            return False


def describe(root: Path, path: str, limit: int) -> tuple[os.stat_result, bytes | str]:
    """One walk: the lstat of in-root ``path`` and its bytes (a regular file, at most
    ``limit``) or its link target. Raises OSError (EFBIG past the limit; EINVAL for a
    special file), UnsafePathError."""
    with open_parent(root, path) as (dfd, name):
        st = os.lstat(name, dir_fd=dfd)
        if stat.S_ISLNK(st.st_mode):
            return st, os.readlink(name, dir_fd=dfd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit >> 20} MiB", path)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dfd)
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit >> 20} MiB", path)
        return st, data


def resolve(root: Path, path: str) -> Path:
    """The real location of in-root ``path`` (its directories' links resolved inside the
    root), for reading and for tools that take a path. Raises OSError, UnsafePathError."""
    with open_parent(root, path) as (fd, name):
        return Path(os.readlink(f"/proc/self/fd/{fd}")) / name


def lexists(root: Path, path: str) -> bool:
    """True if in-root ``path`` exists (a dangling link counts). Never raises for a
    missing or unreachable path."""
    try:
        with open_parent(root, path) as (fd, name):
            os.lstat(name, dir_fd=fd)
            return True
    except (OSError, UnsafePathError):
        return False


def lstat(root: Path, path: str) -> os.stat_result:
    """lstat of in-root ``path``. Raises OSError, UnsafePathError."""
    with open_parent(root, path) as (fd, name):
        return os.lstat(name, dir_fd=fd)


def read_bytes(root: Path, path: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file at in-root ``path`` (a link or special file there is
    refused, never followed), at most ``limit`` of them. Raises OSError (EFBIG past the
    limit), UnsafePathError."""
    with open_parent(root, path) as (dfd, name):
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dfd)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            if limit is not None and st.st_size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit >> 20} MiB", path)
            data = f.read() if limit is None else f.read(limit + 1)
            if limit is not None and len(data) > limit:
                raise OSError(errno.EFBIG, f"larger than {limit >> 20} MiB", path)
            return data


def readlink(root: Path, path: str) -> str:
    """The target of the link at in-root ``path``. Raises OSError, UnsafePathError."""
    with open_parent(root, path) as (fd, name):
        return os.readlink(name, dir_fd=fd)


def unlink(root: Path, path: str) -> bool:
    """Remove the file or link at in-root ``path``; False if it was not there. Raises
    OSError (other than not found), UnsafePathError."""
    try:
        with open_parent(root, path) as (fd, name):
            os.unlink(name, dir_fd=fd)
            return True
    except FileNotFoundError:
        return False


def write_file(root: Path, path: str, data: bytes, *, mode: int = 0o644,
               owner: tuple[int, int] | None = None, mtime_ns: int | None = None,
               durable: bool = True) -> None:
    """Put ``data`` at in-root ``path`` atomically: written beside it as
    ``.NAME.kmodtrim-tmp`` (mode, owner and mtime set on the descriptor), then renamed over
    it. ``durable`` fsyncs the file and its directory. Missing directories are made.
    Raises OSError (leaving no temporary file behind), UnsafePathError."""
    with open_parent(root, path, create=True) as (dfd, name):
        tmp = temp_name(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)  # a leftover of a killed writer
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(fd, mode)
                if owner is not None:
                    with contextlib.suppress(PermissionError):
                        os.fchown(fd, *owner)
                if mtime_ns is not None:
                    os.utime(fd, ns=(mtime_ns, mtime_ns))
                if durable:
                    os.fsync(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        if durable:
            os.fsync(dfd)


def write_link(root: Path, path: str, target: str, *, owner: tuple[int, int] | None = None,
               mtime_ns: int | None = None) -> None:
    """Make in-root ``path`` a symbolic link to ``target`` atomically (the target is stored
    as it is; it is never followed here). Raises OSError, UnsafePathError."""
    with open_parent(root, path, create=True) as (dfd, name):
        tmp = temp_name(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dfd)
        os.symlink(target, tmp, dir_fd=dfd)
        try:
            if owner is not None:
                with contextlib.suppress(PermissionError):
                    os.chown(tmp, *owner, dir_fd=dfd, follow_symlinks=False)
            if mtime_ns is not None:
                os.utime(tmp, ns=(mtime_ns, mtime_ns), dir_fd=dfd, follow_symlinks=False)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise


def sweep_temporaries(root: Path, paths: Iterator[str] | list[str]) -> int:
    """Remove the temporary files a killed writer of any of ``paths`` may have left
    (``.NAME.kmodtrim-tmp`` beside each). Returns how many went. Never raises."""
    removed = 0
    for path in paths:
        try:
            with open_parent(root, path) as (fd, name):
                os.unlink(temp_name(name), dir_fd=fd)
                removed += 1
        except (OSError, UnsafePathError):
            pass
    return removed
