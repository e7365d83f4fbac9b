"""Putting files back from where their records say they come back from: the stash, or the
package archive (archive.py). Everything that must come from the archive is fetched and
verified first (``prepare``), so a download or digest failure stops an operation before
anything is written to the tree; then each file is placed as a stash restore places it
(beside its destination first, never through a link that leaves the root: fsutil)."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from .. import fsutil
from ..errors import StashError
from ..inputs import MAX_MODULE_BYTES
from ..records import StashedFile
from ..state.stash import Stash
from ..takeout import Source
from .archive import fetch, fetch_dir
from .payload import DEFAULT_DOWNLOAD, DownloadLimits


class Restorer:
    """Restores files of one root from their sources; ``close`` (or the context) removes
    the downloads."""

    def __init__(self, root: Path, stash: Stash | None = None,
                 limits: DownloadLimits = DEFAULT_DOWNLOAD) -> None:
        self.root = root
        self.stash = stash or Stash(root)
        self.limits = limits  # each archive download's
        self._fetched: dict[str, Path] = {}

    def __enter__(self) -> Restorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prepare(self, entries: Iterable[StashedFile]) -> int:
        """Fetch and verify every archive-sourced file among ``entries`` (nothing is
        written to the tree); returns how many. Raises ArchiveError naming a file."""
        wanted = [e for e in entries
                  if e.source is Source.ARCHIVE and e.link is None and e.path not in self._fetched]
        if wanted:
            if not self._fetched:
                sweep(self.root)  # what an interrupted restore left
            self._fetched.update(fetch(self.root, wanted, fetch_dir(self.root), self.limits))
        return len(wanted)

    def restore(self, entry: StashedFile) -> None:
        """Put ``entry`` back, byte-identical, with its mode, owner and mtime. An archive
        file must have been prepared. Raises StashError (DamagedCopyError for a damaged
        stash copy)."""
        if entry.source is not Source.ARCHIVE or entry.link is not None:
            self.stash.restore(entry)
            return
        copy = self._fetched.get(entry.path)
        if copy is None:
            raise StashError(f"cannot restore {entry.path}: not fetched from the archive")
        try:
            with open(copy, "rb") as f:
                data = f.read(MAX_MODULE_BYTES + 1)
            fsutil.write_file(self.root, entry.path, data, mode=entry.mode,
                              owner=(entry.uid, entry.gid), mtime_ns=entry.mtime_ns,
                              durable=False)
        except OSError as exc:
            raise StashError(f"cannot restore {entry.path}: {exc.strerror or exc}",
                             hint="free space on the module file system and try again"
                             ) from None

    def close(self) -> None:
        if self._fetched:
            sweep(self.root)
            self._fetched.clear()


def sweep(root: Path) -> None:
    """Remove what an interrupted restore downloaded."""
    shutil.rmtree(fetch_dir(root), ignore_errors=True)
