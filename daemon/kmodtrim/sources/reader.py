"""Reading files out of the tree without putting them back — what the index needs of a
trimmed module it has no cached row for. A stash copy is read from the stash; files the
archive serves are fetched (each package once, on first use) into a private temporary
directory that goes away with the reader, and verified as a restore would verify them."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import StashError
from ..inputs import MAX_MODULE_BYTES
from ..records import StashedFile
from ..state.stash import Stash
from ..takeout import Source
from .archive import fetch


class OutOfTreeReader:
    """The bytes of files out of the tree of one root, from their sources."""

    def __init__(self, root: Path, entries: Sequence[StashedFile]) -> None:
        self.root = root
        self.stash = Stash(root)
        self._archived = [e for e in entries if e.source is Source.ARCHIVE and e.link is None]
        self._work: tempfile.TemporaryDirectory[str] | None = None
        self._fetched: dict[str, Path] | None = None

    def read(self, entry: StashedFile) -> bytes:
        """Raises StashError (ArchiveError when the archive cannot give it back)."""
        if entry.source is not Source.ARCHIVE:
            return self.stash.read(entry)
        if self._fetched is None:
            self._work = tempfile.TemporaryDirectory(prefix="kmodtrim-read-")
            self._fetched = fetch(self.root, self._archived, Path(self._work.name))
        copy = self._fetched.get(entry.path)
        if copy is None:
            raise StashError(f"cannot read {entry.path}: not fetched from the archive")
        with open(copy, "rb") as f:
            return f.read(MAX_MODULE_BYTES + 1)

    def close(self) -> None:
        if self._work is not None:
            self._work.cleanup()
            self._work = None
            self._fetched = None
