"""Which files a trim keeps a local copy of, and which it leaves to the package archive:
a pure decision over plain data (the engine gathers the facts, sources/archive.py asks the
archive).

The safety rule comes first and no setting overrides it: a file the archive cannot serve
at exactly its installed version (no owning package, the version gone from the archive, no
archive configured) never leaves the tree without a local copy. Then the policy's
``[stash] keep``:

- ``all``: a local copy of everything (offline machines; what kmodtrim did before sources);
- ``none``: only what the safety rule keeps (the smallest images);
- ``likely``: also what a VM is likely to need offline — its hot-plug storage and NIC
  drivers and filesystems (sources/likely.py) — while those copies fit ``budget_mib``.

This module imports nothing heavy: the policy model reads its names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

StashKeep = Literal["likely", "all", "none"]
STASH_KEEP: tuple[StashKeep, ...] = get_args(StashKeep)
DEFAULT_KEEP: StashKeep = "likely"
# Per trim (one kernel). With the default presets and a recorded VM observation the stash
# of a "likely" trim measured 1.1 MiB on Debian 13's generic kernel (.ko.xz) and 1.3 MiB
# on Debian 12's (.ko, zstd): 16 MiB binds only when a policy drops the cloud-boot or
# filesystems presets and their modules leave the tree.
DEFAULT_BUDGET_MIB = 16


@dataclass(frozen=True)
class Candidate:
    """A file a trim takes out: its in-root path and size, whether the archive serves its
    package at exactly its installed version (checked now), and whether it belongs to the
    families a VM is likely to need offline."""

    path: str
    size: int
    served: bool
    likely: bool = False


def choose_local_copies(candidates: Iterable[Candidate], keep: StashKeep,
                        budget_bytes: int) -> frozenset[str]:
    """The paths of ``candidates`` that go to the stash; the others come back from the
    archive. What the archive cannot serve always goes to the stash, budget or not (and
    counts against the budget first); with ``likely``, likely-needed files follow, smallest
    first (more of them fit), ties by path, each while the running total stays within
    ``budget_bytes``."""
    items = list(candidates)
    if keep == "all":
        return frozenset(c.path for c in items)
    local = {c.path for c in items if not c.served}
    if keep == "likely":
        used = sum(c.size for c in items if not c.served)
        for c in sorted((c for c in items if c.served and c.likely),
                        key=lambda c: (c.size, c.path)):
            if used + c.size <= budget_bytes:
                local.add(c.path)
                used += c.size
    return frozenset(local)
