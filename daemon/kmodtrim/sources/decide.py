"""Assigning each file a trim takes out its restore source: the facts (sizes, owning
package versions, what the archive serves) read here, the decision made by
choice.choose_local_copies."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import fsutil
from ..errors import StoreError
from ..takeout import PutRequest, Source

if TYPE_CHECKING:
    from .choice import StashKeep

MIB = 1 << 20


@dataclass(frozen=True)
class Assigned:
    """The requests with their sources, and the bytes each way (file sizes in the tree)."""

    requests: tuple[PutRequest, ...]
    local_bytes: int
    archive_bytes: int

    @property
    def archive_files(self) -> int:
        return sum(1 for r in self.requests if r.source is Source.ARCHIVE)


def assign_sources(root: Path, requests: Sequence[PutRequest], *, keep: StashKeep,
                   budget_mib: int, archive: bool,
                   likely: Callable[[PutRequest], bool]) -> Assigned:
    """``requests`` with ``source`` (and the package ``version``) set: the archive for what
    it serves and the stash policy ``keep`` leaves to it, the stash for the rest. Without
    an ``archive`` (no package manager with an archive family, or the policy's backend is
    the stash alone) every file keeps a local copy. Links always stay in the stash's
    records (they have no bytes to fetch)."""
    sizes: dict[str, int] = {}
    with fsutil.Walk(root) as walk:
        for r in requests:
            try:
                fd, name = walk.parent(r.path)
                st = os.lstat(name, dir_fd=fd)
            except (OSError, StoreError):
                continue
            sizes[r.path] = st.st_size if stat.S_ISREG(st.st_mode) else -1
    total = sum(s for s in sizes.values() if s > 0)
    files = [r for r in requests if sizes.get(r.path, -1) >= 0]
    if not archive or keep == "all" or not files:
        return Assigned(tuple(requests), total, 0)
    from .archive import origins, served  # only where the archive may serve files
    from .choice import Candidate, choose_local_copies

    owned = origins(root, [r.path for r in files])
    serving = served(root, set(owned.values()))
    candidates = [Candidate(r.path, sizes[r.path], served=owned.get(r.path) in serving,
                            likely=likely(r)) for r in files]
    local = choose_local_copies(candidates, keep, budget_mib * MIB)
    out = []
    for r in requests:
        origin = owned.get(r.path)
        if r.path in sizes and sizes[r.path] >= 0 and r.path not in local \
                and origin is not None:
            r = replace(r, source=Source.ARCHIVE, package=origin.package,
                        version=origin.version)
        out.append(r)
    archive_bytes = sum(sizes[r.path] for r in out if r.source is Source.ARCHIVE)
    return Assigned(tuple(out), total - archive_bytes, archive_bytes)


def recheck_archive(root: Path, requests: Sequence[PutRequest]) -> list[PutRequest]:
    """``requests`` that an earlier generation left to the archive (a rollback taking
    files out again), each kept so only if its package is still installed at that version
    and the archive still serves it; the others keep a local copy this time."""
    archived = [r for r in requests if r.source is Source.ARCHIVE]
    if not archived:
        return list(requests)
    from .archive import origins, served

    owned = origins(root, [r.path for r in archived])
    serving = served(root, set(owned.values()))
    out = []
    for r in requests:
        origin = owned.get(r.path)
        if r.source is Source.ARCHIVE and (
                origin is None or origin not in serving
                or (origin.package, origin.version) != (r.package, r.version)):
            r = replace(r, source=Source.STASH, version=None)
        out.append(r)
    return out
