"""Whole packages: one whose every file is trimmed (documentation aside) leaves through
the package manager, and comes back rebuilt from the stash when any of its files is wanted.

Its files, control files and header are stashed and journaled before it is removed, so a
restore (or an undo) rebuilds it locally and installs it again — offline, whatever state
an interrupted dpkg or rpm left it in. Package commands run only once the package
manager's lock is free.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .. import fsutil
from ..backends.package import (
    PackageBackend,
    PackageDescription,
    PackageManagerBusy,
    is_doc,
    other_spelling,
)
from ..backends.select import backend_by_name
from ..errors import InputError, StashError
from ..records import Generation, RemovedPackage, StashedFile
from ..state.files import state_dir
from ..state.stash import Stash
from ..takeout import PutRequest
from .exclusions import has_package_manager
from .journal import Journal

# How long a package operation waits for the package manager's lock (apt, dnf or another
# dpkg/rpm) before the operation fails and is undone; deciding whether a package could be
# removed waits less, then trims it file by file instead.
PM_LOCK_TIMEOUT = 300.0
PM_CHECK_TIMEOUT = 30.0
ON_DEMAND_LOCK_WAIT = 3.0  # a restore modprobe waits for (Options.on_demand)


@dataclass(frozen=True)
class PackagePlan:
    remove: tuple[PackageDescription, ...] = ()
    reinstall: tuple[RemovedPackage, ...] = ()
    notes: tuple[str, ...] = ()
    returned: tuple[str, ...] = ()  # removed packages installed again by someone else


def spellings(paths: Iterable[str]) -> set[str]:
    """``paths`` under both usrmerge spellings."""
    out = set()
    for path in paths:
        out.add(path)
        alt = other_spelling(path)
        if alt is not None:
            out.add(alt)
    return out


def _split_listing(root: Path, paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """A package's listed paths as (directories, other files). A path is a directory when
    the package lists something under it or it is a real directory in the tree (a listed
    /lib on a usrmerged root is a directory to the package, a symlink in the tree)."""
    parents = {path.rsplit("/", 1)[0] for path in paths}
    dirs, files = [], []
    for path in paths:
        full = root / path.lstrip("/")
        if path in parents or (full.is_dir() and not full.is_symlink()):
            dirs.append(path)
        else:
            files.append(path)
    return dirs, files


def _is_module(path: str) -> bool:
    return "/modules/" in path and ".ko" in path.rsplit("/", 1)[-1]


def plan_packages(root: Path, backend: PackageBackend, current: Generation, new_paths: set[str],
                   owners: dict[str, str | None], *, enabled: bool,
                   candidates: set[str] | None = None) -> PackagePlan:
    """Which packages this transition removes whole and which it reinstalls.

    A removed package comes back when any of its files (documentation aside) is no longer
    to be out of the tree. An installed package owning a path of ``new_paths`` is removed
    when every non-directory path it lists is in ``new_paths`` (either usrmerge spelling)
    or is documentation — a kernel image package owning /boot/vmlinuz never is — and the
    package manager agrees that removing it removes nothing else. Otherwise its files are
    trimmed one by one, with a note saying why. ``candidates`` limits removals to those
    names (a rollback re-removes only what its target had removed).
    Raises CommandError when the package manager cannot be queried.
    """
    if not has_package_manager(backend):
        return PackagePlan()
    spelled = spellings(new_paths)
    notes: list[str] = []
    # One installed again outside kmodtrim (apt/dnf) is not reinstalled (that could be a
    # downgrade): it is simply no longer recorded as removed.
    returned = tuple(p.name for p in current.packages
                     if backend.package_state(root, p.name) == "installed")
    notes += [f"package {name} was installed again meanwhile; it is no longer recorded as "
              "removed" for name in returned]
    reinstall = tuple(p for p in current.packages if p.name not in returned
                      and any(not is_doc(f.path) and f.path not in spelled for f in p.files))
    if not enabled:
        return PackagePlan(reinstall=reinstall, notes=tuple(notes), returned=returned)
    out = {p.name for p in current.packages} - set(returned)
    names = {pkg for path, pkg in owners.items() if pkg and path in new_paths} - out
    if candidates is not None:
        names &= candidates
    whole: list[PackageDescription] = []
    for name in sorted(names):
        if gone(backend.package_state(root, name)):
            continue  # not installed (any more): nothing to remove
        _dirs, files = _split_listing(root, backend.package_files(root, name))
        trimmed = [f for f in files if f in spelled]
        staying = [f for f in files if f not in spelled and not is_doc(f)]
        if trimmed and not staying:
            try:
                whole.append(backend.describe_package(root, name))
            except InputError as exc:
                notes.append(f"package {name} stays installed ({exc.message}); its files "
                             "are excluded one by one")
        elif trimmed and not any(_is_module(f) for f in staying):
            notes.append(f"package {name} stays installed: it also owns {staying[0]}"
                         + (f" and {len(staying) - 1} more file(s)" if len(staying) > 1 else "")
                         + f"; its {len(trimmed)} trimmed file(s) are excluded one by one")
    if not whole:
        return PackagePlan(reinstall=reinstall, notes=tuple(notes), returned=returned)
    try:
        backend.wait_for_lock(root, PM_CHECK_TIMEOUT)
    except PackageManagerBusy as exc:
        notes.append(f"{backend.name} is busy ({exc.message}); package(s) "
                     f"{', '.join(d.name for d in whole)} trimmed file by file instead")
        return PackagePlan(reinstall=reinstall, notes=tuple(notes), returned=returned)
    if backend.removal_refusal(root, [d.name for d in whole]) is not None:
        accepted = []
        for desc in whole:
            refusal = backend.removal_refusal(root, [desc.name])
            if refusal is None:
                accepted.append(desc)
            else:
                notes.append(f"package {desc.name} stays installed ({backend.name}: {refusal}); "
                             "its files are excluded one by one")
        if accepted and backend.removal_refusal(root, [d.name for d in accepted]) is not None:
            notes.append(f"packages {', '.join(d.name for d in accepted)} stay installed "
                         "(they cannot be removed together); their files are excluded one by one")
            accepted = []
        whole = accepted
    return PackagePlan(tuple(whole), reinstall, tuple(notes), returned)


def package_items(root: Path, remove: Sequence[PackageDescription], spelled: set[str]
                   ) -> list[PutRequest]:
    """What else must be stashed before packages leave whole: their files outside the
    trimmed set (documentation) and their control files."""
    items = []
    for desc in remove:
        _dirs, files = _split_listing(root, desc.paths)
        for path in files:
            if path not in spelled and fsutil.lexists(root, path):
                items.append(PutRequest(path, "package", None, None, desc.name))
        for name, path in sorted(desc.control.items()):
            items.append(PutRequest(path, "package-control", name, None, desc.name))
    return items


def capture(root: Path, desc: PackageDescription, backend: PackageBackend,
             entries: dict[str, StashedFile], extra: Sequence[StashedFile]) -> RemovedPackage:
    """The record a package is rebuilt from: ``entries`` maps every trimmed path (both
    spellings) to its stash entry, ``extra`` are the entries _package_items stashed."""
    dirs, files = _split_listing(root, desc.paths)
    own = {e.path: e for e in extra if e.kind == "package" and e.package == desc.name}
    recorded, absent = [], []
    for path in files:
        entry = own.get(path) or entries.get(path)
        if entry is None:
            absent.append(path)
        else:
            recorded.append(entry if entry.path == path else replace(entry, path=path))
    modes = []
    for path in dirs:
        try:
            modes.append((path, os.stat(root / path.lstrip("/")).st_mode & 0o7777))
        except OSError:
            modes.append((path, 0o755))
    return RemovedPackage(
        name=desc.name, version=desc.version, arch=desc.arch, backend=backend.name,
        metadata=desc.metadata, files=tuple(recorded),
        control=tuple(e for e in extra
                      if e.kind == "package-control" and e.package == desc.name),
        dirs=tuple(modes), absent=tuple(absent))


def rebuild_dir(root: Path) -> Path:
    return state_dir(root) / "rebuild"


def rebuild(root: Path, backend: PackageBackend, packages: Sequence[RemovedPackage]) -> list[Path]:
    """Rebuild ``packages`` from the stash into archives under the state directory (so a
    restore needs no network). Raises StashError (missing blob, disk full), CommandError."""
    work = rebuild_dir(root)
    shutil.rmtree(work, ignore_errors=True)
    stash = Stash(root)
    archives = []
    for number, package in enumerate(packages):
        base = work / str(number)
        tree, control = base / "tree", base / "control"
        try:
            tree.mkdir(parents=True)
            control.mkdir()
            for path, _mode in package.dirs:
                (tree / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            for entry in package.files:
                stash.restore_to(entry, tree)
            for entry in package.control:
                stash.restore_to(replace(entry, path=f"/{entry.module}"), control)
            for path, mode in sorted(package.dirs, reverse=True):
                os.chmod(tree / path.lstrip("/"), mode)
        except (OSError, StashError) as exc:
            reason = exc.message if isinstance(exc, StashError) else exc.strerror or str(exc)
            raise StashError(f"cannot rebuild package {package.name}: {reason}",
                             hint=f"free space under {state_dir(root)} and try again") from None
        archives.append(backend.build_archive(package, tree, control, base))
    return archives


def package_manager(backend: PackageBackend, removed: Sequence[RemovedPackage]) -> PackageBackend:
    """The backend that runs package operations: the configured one or — when kmodtrim
    now runs without a package manager but removed packages whole before — the package
    manager that removed them, so that bringing their files back reinstalls them."""
    if has_package_manager(backend) or not removed:
        return backend
    return backend_by_name(removed[0].backend)


def run_package_op(root: Path, backend: PackageBackend, op: Callable[[], None],
                   lock_wait: float = PM_LOCK_TIMEOUT) -> None:
    """Run one package-manager command, never while its lock is held by someone else
    (waited for ``lock_wait`` seconds at most; then PackageManagerBusy)."""
    backend.wait_for_lock(root, lock_wait)
    op()


def gone(state: str) -> bool:
    return state in ("not-installed", "config-files")


def undo_packages(root: Path, backend: PackageBackend, journal: Journal,
                   current: Generation) -> None:
    """Packages an interrupted transition was reinstalling go out again; packages it was
    removing come back, rebuilt from the copies it stashed before the removal started.
    Whatever state dpkg/rpm was killed in (half-installed, unpacked, …) ends consistent:
    installed as before, or not installed. With ROOT's exclusions already those of the
    state being returned to."""
    if not has_package_manager(backend):
        return
    if journal.packages_reinstalling:
        records = {p.name: p for p in current.packages}
        states = {name: backend.package_state(root, name)
                  for name in journal.packages_reinstall}
        # dpkg refuses to remove a package it left half-installed, and rpm may have left
        # files of a package it had not registered yet: install it whole first.
        broken = [records[n] for n, state in states.items() if n in records and (
            not backend.partial_states or state == "half-installed")]
        if broken:
            archives = rebuild(root, backend, broken)
            run_package_op(root, backend, lambda: backend.install_archives(root, archives))
        reinstalled = {p.name for p in broken}
        back = [name for name, state in states.items()
                if not gone(state) or name in reinstalled]
        if back:
            run_package_op(root, backend, lambda: backend.remove_packages(root, back))
    if journal.packages_removing:
        captured = {p.name: p for p in journal.packages_captured}
        left = [captured[name] for name in journal.packages_remove
                if name in captured and (not backend.partial_states
                                         or backend.package_state(root, name) != "installed")]
        if left:
            archives = rebuild(root, backend, left)
            run_package_op(root, backend, lambda: backend.install_archives(root, archives))
