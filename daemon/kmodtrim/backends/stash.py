"""The local stash: removed files, compressed and content-addressed, so any restore works
offline and after the distribution dropped that kernel version.

A blob is ``stash/objects/AB/ABCDEF….zst`` named by the sha256 of the file's original bytes;
it is written to a temporary name and renamed, so a blob that exists is complete. Restore
verifies the hash before the file goes back, and writes it beside its destination first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from pathlib import Path

from ..errors import StashError
from ..store import StashedFile, replace_file, state_dir

_LEVEL = 1  # ~480 MB/s a core; level 3 saves under 1% more on modules


class Stash:
    """Content-addressed store of removed files under ROOT/var/lib/kmodtrim/stash."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = state_dir(root) / "stash" / "objects"

    def _blob(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / f"{sha256}.zst"

    def has(self, sha256: str) -> bool:
        return self._blob(sha256).exists()

    def put(self, path: str, *, kind: str = "module", module: str | None = None,
            kernel: str | None = None, package: str | None = None) -> StashedFile:
        """Copy the in-root file ``path`` into the stash (not yet removing it).

        Raises StashError (e.g. disk full) leaving no partial blob behind.
        """
        import zstandard

        full = self.root / path.lstrip("/")
        try:
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                return StashedFile(
                    path=path, size=st.st_size, sha256=hashlib.sha256(target.encode()).hexdigest(),
                    mode=0o777, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
                    kind=kind, module=module, kernel=kernel, package=package, link=target,
                )
            data = full.read_bytes()
        except OSError as exc:
            raise StashError(f"cannot read {path}: {exc.strerror or exc}") from None
        sha = hashlib.sha256(data).hexdigest()
        blob = self._blob(sha)
        if not blob.exists():
            try:
                compressed = zstandard.ZstdCompressor(level=_LEVEL).compress(data)
                replace_file(blob, compressed, durable=False)  # the executor syncs once
            except OSError as exc:
                raise StashError(
                    f"cannot stash {path}: {exc.strerror or exc}",
                    hint="free space under /var/lib/kmodtrim and try again; nothing was removed",
                ) from None
        return StashedFile(
            path=path, size=st.st_size, sha256=sha, mode=st.st_mode & 0o7777,
            uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
            kind=kind, module=module, kernel=kernel, package=package,
        )

    def read(self, entry: StashedFile) -> bytes:
        """The original bytes of a stashed file, hash-verified. Raises StashError."""
        import zstandard

        blob = self._blob(entry.sha256)
        try:
            data = zstandard.ZstdDecompressor().decompress(blob.read_bytes())
        except OSError as exc:
            raise StashError(f"stash copy of {entry.path} is missing: {exc.strerror}") from None
        except zstandard.ZstdError as exc:
            raise StashError(f"stash copy of {entry.path} is corrupt: {exc}") from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StashError(f"stash copy of {entry.path} does not match its sha256")
        return data

    def restore(self, entry: StashedFile) -> None:
        """Put a stashed file back at its path, byte-identical, with its mode, owner and
        mtime. Raises StashError; the blob stays until garbage-collected."""
        self.restore_to(entry, self.root / entry.path.lstrip("/"))

    def restore_to(self, entry: StashedFile, full: Path) -> None:
        """Write a stashed file's original bytes (or link) to ``full`` — its own path, or a
        place where a package is being rebuilt — with its mode, owner and mtime. Raises
        StashError."""
        if entry.link is not None:
            self._restore_link(entry, full)
            return
        data = self.read(entry)
        try:
            replace_file(full, data, mode=entry.mode, owner=(entry.uid, entry.gid),
                         mtime_ns=entry.mtime_ns, durable=False)
        except OSError as exc:
            raise StashError(
                f"cannot restore {entry.path}: {exc.strerror or exc}",
                hint="free space on the module file system and try again",
            ) from None

    def _restore_link(self, entry: StashedFile, full: Path) -> None:
        assert entry.link is not None
        tmp = full.with_name(f".{full.name}.kmodtrim-link")
        try:
            full.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(entry.link, tmp)
            with contextlib.suppress(PermissionError):
                os.lchown(tmp, entry.uid, entry.gid)
            os.utime(tmp, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
            os.replace(tmp, full)
        except OSError as exc:
            raise StashError(f"cannot restore link {entry.path}: {exc.strerror or exc}") from None

    def has_copy(self, entry: StashedFile) -> bool:
        """True if the stash can restore ``entry`` (a link needs no blob)."""
        return entry.link is not None or self.has(entry.sha256)

    def matches(self, entry: StashedFile) -> bool:
        """True if the file at entry.path exists with entry's content."""
        full = self.root / entry.path.lstrip("/")
        if entry.link is not None:
            try:
                return os.readlink(full) == entry.link
            except OSError:
                return False
        try:
            if os.lstat(full).st_size != entry.size:
                return False
            return hashlib.sha256(full.read_bytes()).hexdigest() == entry.sha256
        except OSError:
            return False

    def collect_garbage(self, referenced: set[str]) -> int:
        """Delete blobs no stashed file refers to; returns how many went."""
        removed = 0
        if not self.objects.is_dir():
            return 0
        for sub in self.objects.iterdir():
            for blob in sub.iterdir():
                sha = blob.name.split(".", 1)[0]
                if sha not in referenced:
                    with contextlib.suppress(OSError):
                        blob.unlink()
                        removed += 1
        return removed

    def size_on_disk(self) -> int:
        total = 0
        if self.objects.is_dir():
            for sub in self.objects.iterdir():
                for blob in sub.iterdir():
                    with contextlib.suppress(OSError):
                        total += blob.stat().st_size
        return total
