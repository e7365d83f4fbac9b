"""Which package manager a transition talks to, and keeping its exclusions (dpkg
``path-exclude``, rpm ``%_netsharedpath``) equal to what is out of the tree."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from ..backends.package import NoPackageBackend, PackageBackend
from ..backends.select import backend_by_name, detect_backend
from ..records import Generation, StashedFile


def resolve_backend(root: Path, option: str) -> PackageBackend:
    """The backend the ``backend`` option names: ``auto`` detects the root's package
    manager, ``stash`` is none (NoPackageBackend). Raises InputError for an unknown one."""
    if option == "stash":
        return NoPackageBackend()
    return detect_backend(root) if option == "auto" else backend_by_name(option)


def has_package_manager(backend: PackageBackend) -> bool:
    return backend.name != "none"


def exclusion_backends(current: Generation, backend: PackageBackend,
                       removed: Sequence[StashedFile]) -> tuple[str, ...]:
    """The package managers whose exclusions a new state with ``removed`` out of the tree
    has written: this operation's, and every earlier one's (they are rewritten too) —
    none once nothing is out any more (their exclusions are then empty)."""
    if not removed:
        return ()
    names = set(current.exclusion_backends)
    if has_package_manager(backend):
        names.add(backend.name)
    return tuple(sorted(names))


def write_all_exclusions(root: Path, backend: PackageBackend, paths: set[str],
                         recorded: Iterable[str]) -> None:
    """Make the exclusions of this operation's backend and of every backend that wrote
    some before (``recorded``) say exactly ``paths``: state a generation wrote is undone
    by the backend that wrote it, whatever the policy says now."""
    backend.write_exclusions(root, paths)
    for name in sorted(set(recorded) - {backend.name}):
        backend_by_name(name).write_exclusions(root, paths)
