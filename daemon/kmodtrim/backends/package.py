"""The package-manager backend protocol, detection, and what dpkg and rpm backends share.

A backend keeps the package manager truthful about files kmodtrim moved to its stash: it
tells the package manager not to install those paths again (dpkg ``path-exclude``, rpm
``%_netsharedpath``), says which package owns a path, brings files back through the package
manager, and shows the package manager's own verification of a package.  For a package
whose every file is trimmed it also describes the package (enough to rebuild it offline),
asks whether removing it alone would be accepted, removes it, rebuilds it from a tree of
its files and installs that archive again.

Paths are absolute paths inside ``root`` ("/lib/modules/KVER/kernel/…"); the live system is
``Path("/")``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .. import fsutil
from ..errors import CommandError, InputError, StoreError
from ..store import RemovedPackage

# Package managers run with a fixed, system-only PATH: dpkg insists on finding ldconfig and
# start-stop-daemon, and nothing from /usr/local should stand in for a system tool.
PM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


class PackageManagerBusy(CommandError):
    """The package manager's lock is held (another transaction, or we run inside one)."""

    dbus_name = "org.kmodtrim.KmodTrim1.Error.Busy"


@dataclass(frozen=True)
class VerifyProblem:
    """One line of ``dpkg --verify`` / ``rpm -V``: the path and what is wrong with it
    (``missing`` or the tool's flag string such as ``??5??????`` / ``S.5....T.``)."""

    path: str
    what: str


# Files a package may own besides the trimmed ones and still be removed whole: its
# documentation, which nothing loads and which comes back with the package.
DOC_PREFIXES = ("/usr/share/doc/", "/usr/share/man/", "/usr/share/lintian/",
                "/usr/share/licenses/")


def is_doc(path: str) -> bool:
    """Whether ``path`` is package documentation (see DOC_PREFIXES)."""
    return path.startswith(DOC_PREFIXES)


@dataclass(frozen=True)
class PackageDescription:
    """An installed package as its package manager describes it, before a whole removal:
    ``metadata`` is what rebuilding it needs for the header (backend-specific, JSON-able),
    ``control`` the package manager's own files for it (name -> in-root path: dpkg's
    maintainer scripts, md5sums, …), ``paths`` every path it lists (files and
    directories)."""

    name: str
    version: str
    arch: str
    metadata: dict[str, Any]
    control: dict[str, str]
    paths: list[str]


class PackageBackend(Protocol):
    """What the executor needs from a package manager."""

    name: str

    def owners(self, root: Path, paths: Sequence[str]) -> dict[str, str | None]: ...

    def package_files(self, root: Path, package: str) -> list[str]: ...

    def read_exclusions(self, root: Path) -> set[str]: ...

    def write_exclusions(self, root: Path, paths: Collection[str]) -> None: ...

    def reinstall(self, root: Path, packages: Sequence[str],
                  archives: Mapping[str, Path] | None = None) -> None: ...

    def remove_packages(self, root: Path, packages: Sequence[str]) -> None: ...

    def wait_for_lock(self, root: Path, timeout: float) -> None: ...

    def verify(self, root: Path, packages: Sequence[str]) -> list[VerifyProblem]: ...

    # Whether package_state tells a package left part-way by an interrupted operation
    # (dpkg: half-installed, …) from a whole one; when not, recovery reinstalls.
    partial_states: bool

    def package_state(self, root: Path, package: str) -> str: ...

    def describe_package(self, root: Path, package: str) -> PackageDescription: ...

    def removal_refusal(self, root: Path, packages: Sequence[str]) -> str | None: ...

    def build_archive(self, package: RemovedPackage, tree: Path, control: Path,
                      out_dir: Path) -> Path: ...

    def install_archives(self, root: Path, archives: Sequence[Path]) -> None: ...


class NoPackageBackend:
    """No package manager (or one kmodtrim does not know): nothing to keep truthful."""

    name = "none"

    def owners(self, root: Path, paths: Sequence[str]) -> dict[str, str | None]:
        return dict.fromkeys(paths)

    def package_files(self, root: Path, package: str) -> list[str]:
        return []

    def read_exclusions(self, root: Path) -> set[str]:
        return set()

    def write_exclusions(self, root: Path, paths: Collection[str]) -> None:
        return None

    def reinstall(self, root: Path, packages: Sequence[str],
                  archives: Mapping[str, Path] | None = None) -> None:
        return None

    def remove_packages(self, root: Path, packages: Sequence[str]) -> None:
        return None

    def wait_for_lock(self, root: Path, timeout: float) -> None:
        return None

    def verify(self, root: Path, packages: Sequence[str]) -> list[VerifyProblem]:
        return []

    partial_states = True

    def package_state(self, root: Path, package: str) -> str:
        return "not-installed"

    def describe_package(self, root: Path, package: str) -> PackageDescription:
        raise InputError(f"package {package} is not installed (no package manager)")

    def removal_refusal(self, root: Path, packages: Sequence[str]) -> str | None:
        return "no package manager"

    def build_archive(self, package: RemovedPackage, tree: Path, control: Path,
                      out_dir: Path) -> Path:
        raise CommandError(f"cannot rebuild {package.name}: no package manager")

    def install_archives(self, root: Path, archives: Sequence[Path]) -> None:
        if archives:
            raise CommandError("cannot install packages: no package manager")


# ---------------------------------------------------------------------------------------
# Shared helpers


def is_live(root: Path) -> bool:
    """Whether ``root`` is the running system's root, where the package manager's own
    configuration and defaults apply without any help from us."""
    try:
        return os.path.samefile(root, "/")
    except OSError:
        return False


def in_root(root: Path, path: str) -> Path:
    """The host path of the in-root absolute path ``path``."""
    return root / path.lstrip("/")


def other_spelling(path: str) -> str | None:
    """The same file under the other side of usrmerge: /lib/… ↔ /usr/lib/…, else None."""
    if path.startswith("/usr/lib/"):
        return path[len("/usr"):]
    if path.startswith("/lib/"):
        return "/usr" + path
    return None


def check_paths(paths: Collection[str], *, forbidden: str = "\n") -> list[str]:
    """The paths sorted; raises InputError for a relative path or one containing a
    character from ``forbidden`` (which the package manager's config cannot express)."""
    for path in paths:
        if not path.startswith("/"):
            raise InputError(f"{path!r}: not an absolute path inside the root")
        bad = [c for c in forbidden if c in path]
        if bad:
            raise InputError(f"{path!r}: contains {bad[0]!r}, which the package manager's "
                             "configuration cannot express", hint="rename or keep this file")
    return sorted(set(paths))


def write_config(root: Path, name: str, text: str | None) -> None:
    """Atomically replace ROOT/``name`` with ``text`` (temp file, fsync, rename); ``None``
    removes it. Never follows a link out of the root (an image root's etc/dpkg may point
    anywhere). Raises CommandError when the file cannot be written."""
    inroot = "/" + name.lstrip("/")
    try:
        if text is None:
            fsutil.unlink(root, inroot)
            return
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            if fsutil.read_bytes(root, inroot).decode("utf-8", "replace") == text:
                return  # idempotent: don't touch a file that already says this
        fsutil.write_file(root, inroot, text.encode("utf-8"))
    except (OSError, StoreError) as exc:
        reason = exc.message if isinstance(exc, StoreError) else exc.strerror or str(exc)
        raise CommandError(f"cannot write {root / name}: {reason}",
                           hint="check that the file system is writable and not full") from exc


def parse_verify(text: str) -> list[VerifyProblem]:
    """Parse ``dpkg --verify`` / ``rpm -V`` output.

    Lines look like ``missing     /p``, ``??5?????? c /p`` or ``S.5....T.  c /p``: a status
    token, an optional one-letter file attribute, then the path.
    """
    problems = []
    for line in text.splitlines():
        token, _, rest = line.partition(" ")
        slash = rest.find("/")
        if not token or slash < 0:
            continue
        problems.append(VerifyProblem(rest[slash:], token))
    return problems


def wait_for_fcntl_locks(lock_files: Sequence[Path], timeout: float, what: str) -> None:
    """Wait until nobody holds a write lock on any of ``lock_files`` (absent files are
    free); see wait_for_lock_holders. Raises PackageManagerBusy."""
    wait_for_lock_holders(lambda: fcntl_lock_holder(lock_files), timeout, what)


def fcntl_lock_holder(lock_files: Sequence[Path]) -> tuple[str, int] | None:
    """The first of ``lock_files`` someone holds a write lock on, and the holder's pid
    (0 when the kernel does not say); None when all are free.

    The probe asks with F_OFD_GETLK, which sees the classic fcntl() locks dpkg, apt and rpm
    take without taking a lock itself, and names the process holding one."""
    for path in lock_files:
        holder = _lock_holder(path)
        if holder is not None:
            return str(path), holder
    return None


def wait_for_lock_holders(held: Callable[[], tuple[str, int] | None], timeout: float,
                          what: str) -> None:
    """Wait until ``held()`` says nobody holds the package manager's lock (else it says
    which lock and the holder's pid, 0 if unknown), polling until ``timeout`` seconds have
    passed; kmodtrim takes no lock itself, so the caller can run the package manager.

    When the holder is a process kmodtrim runs under (a hook inside the package manager's
    own transaction), the lock cannot be released while kmodtrim waits, so it does not
    wait. Raises PackageManagerBusy on timeout, or at once in that case.
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    while (found := held()) is not None:
        lock, holder = found
        if holder and holder in ancestors():
            raise PackageManagerBusy(
                f"{what} is busy: {lock} is locked by pid {holder}, which kmodtrim runs "
                "under (a hook inside that package transaction)",
                hint="run the command again once the package transaction has finished")
        if time.monotonic() >= deadline:
            by = f"{_command_of(holder)} (pid {holder})" if holder else "another process"
            raise PackageManagerBusy(
                f"{what} is busy: {lock} is locked by {by} (waited {timeout:g} s)",
                hint="wait for the running package operation to finish and try again; "
                     "kmodtrim never runs the package manager from inside its transaction")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 1.0)


def _command_of(pid: int) -> str:
    """The command name of process ``pid`` (``apt-get``, ``dpkg``; "a process" if unreadable)."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read(64).decode("utf-8", "replace").strip() or "a process"
    except OSError:
        return "a process"


def ancestors() -> set[int]:
    """The pids of this process's parent, its parent, … up to pid 1."""
    found: set[int] = set()
    pid = os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rindex(b")") + 2:].split()[1])  # field 4: ppid
        except (OSError, ValueError, IndexError):
            break
    return found


def _lock_holder(path: Path) -> int | None:
    """None if nobody holds a write lock on ``path``; else the holder's pid, or 0 when the
    kernel does not say (an open-file-description lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PackageManagerBusy(f"cannot open lock file {path}: {exc.strerror or exc}") from exc
    try:
        # F_OFD_GETLK asks who would block a write lock without taking one.
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK))
    except OSError as exc:
        raise PackageManagerBusy(f"cannot probe lock {path}: {exc.strerror}") from exc
    finally:
        # Closing drops any fcntl() lock *this* process holds on the file; kmodtrim never
        # takes the package manager's locks itself, so there is nothing to lose.
        os.close(fd)
    kind, _whence, _start, _len, pid = struct.unpack(_FLOCK, answer)
    if kind == fcntl.F_UNLCK:
        return None
    return max(int(pid), 0)


# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (+ padding); OFD locks require l_pid == 0.  Whole file: start 0, len 0.
_FLOCK = "hhqqi4x"


def _flock(kind: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, 0, 0, 0)


class OwnerTable:
    """Owners of a set of paths, looked up under each path's own spelling and — on a
    usrmerged root — the other one; a match under the path's own spelling wins."""

    def __init__(self, root: Path, paths: Sequence[str]) -> None:
        self.queried: dict[str, str] = {p: p for p in paths}
        if (root / "lib").is_symlink():
            for p in paths:
                alt = other_spelling(p)
                if alt is not None:
                    self.queried.setdefault(alt, p)
        self.result: dict[str, str | None] = dict.fromkeys(paths)
        self._exact: set[str] = set()

    def record(self, path: str, package: str) -> None:
        """``package`` lists ``path``: credit it to the queried path it spells."""
        original = self.queried.get(path)
        if original is None or original in self._exact:
            return
        if path == original:
            self._exact.add(original)
            self.result[original] = package
        elif self.result[original] is None:
            self.result[original] = package
