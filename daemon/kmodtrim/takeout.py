"""What a trim asks to take out of the tree (``PutRequest``) and where a file out of the
tree comes back from (``Source``): the plain data the restore-source decision
(sources/decide.py) works on, apart from the records' model (records.py) so that a plan
decides without loading it."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Source(StrEnum):
    """Where a file out of the tree comes back from (sources/)."""

    STASH = "stash"  # a local copy in the stash (state/stash.py)
    ARCHIVE = "archive"  # the package archive: ``package`` at exactly ``version``


@dataclass(frozen=True)
class PutRequest:
    """One file to take out: its in-root path and what the manifest says of it
    (``package``: for a removed package's own files; the executor fills in the owner of
    the others). With ``source`` ARCHIVE it is only described (hashed, recorded in the
    manifest with its package ``version``), not copied: the archive brings it back."""

    path: str
    kind: str = "module"
    module: str | None = None
    kernel: str | None = None
    package: str | None = None
    source: Source = Source.STASH
    version: str | None = None
