"""The local stash: removed files, compressed and content-addressed, so any restore works
offline and after the distribution dropped that kernel version.

Every blob is the zstd-compressed original bytes of a file, named by their sha256. Blobs live
in one of two forms:

- **packs**, ``stash/packs/<name>.pack``: what one operation stashes, written as one file
  (thousands of small files would cost more in file creation than in compression). Layout::

      b"KMTPACK1"
      record*      sha256 (32 bytes) | length (u64 le) | zstd frame
      index        (sha256 | frame offset u64 | frame length u64) per record
      footer       record count u64 | sha256 of the index (32 bytes) | b"KMTPEND1"

  A pack is written under a temporary name and renamed, so a pack that exists is complete;
  a pack whose index is damaged is read by walking its records instead.
- **loose blobs**, ``stash/objects/AB/ABCDEF….zst``: single files stashed one at a time.

Restore verifies the hash before the file goes back, and writes it beside its destination
first. Garbage collection deletes a pack nothing refers to and rewrites one that is mostly
garbage.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import StashError
from ..store import StashedFile, fsync_dir, replace_file, state_dir

_LEVEL = 1  # ~480 MB/s a core; level 3 saves under 1% more on modules

_PACK_MAGIC = b"KMTPACK1"
_PACK_END = b"KMTPEND1"
_RECORD = struct.Struct("<32sQ")  # sha256, frame length
_INDEX_ENTRY = struct.Struct("<32sQQ")  # sha256, frame offset, frame length
_FOOTER = struct.Struct("<Q32s8s")  # record count, sha256 of the index, end magic
_REPACK_GARBAGE = 0.5  # rewrite a pack once more than this share of its bytes is garbage
_WRITEBACK_EVERY = 16 << 20  # a durable pack starts reaching the disk while it is written


@dataclass(frozen=True)
class PutRequest:
    """One file to stash: its in-root path and what the manifest says of it (``package``:
    for a removed package's own files; the executor fills in the owner of the others)."""

    path: str
    kind: str = "module"
    module: str | None = None
    kernel: str | None = None
    package: str | None = None


@dataclass(frozen=True)
class _Located:
    pack: Path
    offset: int
    length: int


class Stash:
    """Content-addressed store of removed files under ROOT/var/lib/kmodtrim/stash."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = state_dir(root) / "stash" / "objects"
        self.packs = state_dir(root) / "stash" / "packs"
        self._packed: dict[str, _Located] | None = None
        self._packed_lock = threading.Lock()

    def _blob(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / f"{sha256}.zst"

    def has(self, sha256: str) -> bool:
        return sha256 in self._pack_index() or self._blob(sha256).exists()

    # -- packs ----------------------------------------------------------------------------

    def _pack_files(self) -> list[Path]:
        try:
            return sorted(p for p in self.packs.iterdir()
                          if p.suffix == ".pack" and not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def _pack_index(self) -> dict[str, _Located]:
        with self._packed_lock:
            if self._packed is None:
                packed: dict[str, _Located] = {}
                for pack in self._pack_files():
                    with contextlib.suppress(OSError):
                        for sha, offset, length in _read_pack_index(pack):
                            packed.setdefault(sha, _Located(pack, offset, length))
                self._packed = packed
            return self._packed

    def _forget_packs(self) -> None:
        with self._packed_lock:
            self._packed = None

    def put_many(self, requests: Sequence[PutRequest], *, workers: int | None = None,
                 each: Callable[[int], None] | None = None) -> list[StashedFile]:
        """Stash many in-root files (not yet removing them) as one new pack; returns their
        entries in order. ``each(i)`` runs after the i-th (1-based) is recorded.

        Reading, hashing and compressing run on ``workers`` threads (they release the GIL);
        the pack is written by the caller's thread, in order, and is durable on return.
        Raises StashError (e.g. disk full) leaving no partial pack behind.
        """
        import zstandard

        known = self._pack_index()
        local = threading.local()

        def prepare(request: PutRequest) -> tuple[StashedFile, bytes | None]:
            entry, data = self._describe(request)
            if data is None or entry.sha256 in known or self._blob(entry.sha256).exists():
                return entry, None
            compressor = getattr(local, "compressor", None)
            if compressor is None:
                compressor = local.compressor = zstandard.ZstdCompressor(level=_LEVEL)
            return entry, compressor.compress(data)

        entries: list[StashedFile] = []
        if not requests:
            return entries
        with _PackWriter(self.packs, durable=True) as writer, \
                ThreadPoolExecutor(max_workers=workers or min(os.cpu_count() or 1, 8)) as pool:
            for i, (entry, frame) in enumerate(pool.map(prepare, requests), 1):
                if frame is not None:
                    writer.add(entry.sha256, frame)
                entries.append(entry)
                if each is not None:
                    each(i)
            pack = writer.finish()
        if pack is not None:
            with self._packed_lock:
                if self._packed is not None:
                    for sha, offset, length in writer.index:
                        self._packed.setdefault(sha, _Located(pack, offset, length))
        return entries

    def _describe(self, request: PutRequest) -> tuple[StashedFile, bytes | None]:
        """The manifest entry of an in-root file, and its bytes (None for a link)."""
        full = self.root / request.path.lstrip("/")
        try:
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(full)
                return StashedFile(
                    path=request.path, size=st.st_size,
                    sha256=hashlib.sha256(target.encode()).hexdigest(), mode=0o777,
                    uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns, kind=request.kind,
                    module=request.module, kernel=request.kernel, package=request.package,
                    link=target,
                ), None
            data = full.read_bytes()
        except OSError as exc:
            raise StashError(f"cannot read {request.path}: {exc.strerror or exc}") from None
        return StashedFile(
            path=request.path, size=st.st_size, sha256=hashlib.sha256(data).hexdigest(),
            mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
            kind=request.kind, module=request.module, kernel=request.kernel,
            package=request.package,
        ), data

    def _read_compressed(self, sha256: str) -> bytes:
        """The zstd frame of a blob, from a pack or loose. Raises OSError."""
        for attempt in range(2):
            located = self._pack_index().get(sha256)
            if located is None:
                break
            try:
                with open(located.pack, "rb") as f:
                    f.seek(located.offset)
                    frame = f.read(located.length)
                if len(frame) == located.length:
                    return frame
            except FileNotFoundError:
                pass
            if attempt == 0:  # rewritten by a garbage collection meanwhile: look again
                self._forget_packs()
        return self._blob(sha256).read_bytes()

    def put(self, path: str, *, kind: str = "module", module: str | None = None,
            kernel: str | None = None, package: str | None = None) -> StashedFile:
        """Copy the in-root file ``path`` into the stash as a loose blob (not yet removing
        it); put_many stashes many files at once.

        Raises StashError (e.g. disk full) leaving no partial blob behind.
        """
        import zstandard

        entry, data = self._describe(PutRequest(path, kind, module, kernel, package))
        if data is not None and not self.has(entry.sha256):
            try:
                compressed = zstandard.ZstdCompressor(level=_LEVEL).compress(data)
                replace_file(self._blob(entry.sha256), compressed, durable=False)
            except OSError as exc:
                raise StashError(
                    f"cannot stash {path}: {exc.strerror or exc}",
                    hint="free space under /var/lib/kmodtrim and try again; nothing was removed",
                ) from None
        return entry

    def read(self, entry: StashedFile) -> bytes:
        """The original bytes of a stashed file, hash-verified. Raises StashError."""
        import zstandard

        try:
            data = zstandard.ZstdDecompressor().decompress(self._read_compressed(entry.sha256))
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
        """Delete blobs no stashed file refers to, and leftovers of interrupted writes;
        returns how many blobs went. A pack mostly garbage is rewritten with the rest
        (durably, before the old one goes); one with a little garbage is kept as it is.
        Call it only under the operation lock."""
        removed = 0
        if self.objects.is_dir():
            for sub in self.objects.iterdir():
                for blob in sub.iterdir():
                    sha = blob.name.split(".", 1)[0]
                    if sha not in referenced:
                        with contextlib.suppress(OSError):
                            blob.unlink()
                            removed += 1
        with contextlib.suppress(FileNotFoundError):
            for leftover in self.packs.glob(".*.kmodtrim"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        for pack in self._pack_files():
            removed += self._collect_pack(pack, referenced)
        self._forget_packs()
        return removed

    def _collect_pack(self, pack: Path, referenced: set[str]) -> int:
        try:
            index = _read_pack_index(pack)
        except OSError:
            return 0
        live = [(sha, offset, length) for sha, offset, length in index if sha in referenced]
        dead = len(index) - len(live)
        if not live:
            with contextlib.suppress(OSError):
                pack.unlink()
            return dead
        garbage = sum(length for sha, _, length in index if sha not in referenced)
        if garbage <= _REPACK_GARBAGE * sum(length for _, _, length in index):
            return 0
        try:
            with open(pack, "rb") as source, _PackWriter(self.packs, durable=True) as writer:
                for sha, offset, length in live:
                    source.seek(offset)
                    writer.add(sha, source.read(length))
                writer.finish()
            pack.unlink()
        except OSError:
            return 0  # no room to rewrite it: it stays, whole
        return dead

    def size_on_disk(self) -> int:
        total = 0
        if self.objects.is_dir():
            for sub in self.objects.iterdir():
                for blob in sub.iterdir():
                    with contextlib.suppress(OSError):
                        total += blob.stat().st_size
        for pack in self._pack_files():
            with contextlib.suppress(OSError):
                total += pack.stat().st_size
        return total


class _PackWriter:
    """Writes one pack under a temporary name; ``finish`` renames it into place.

    A ``durable`` pack is fsynced before the rename. So that this costs little at the end,
    every _WRITEBACK_EVERY bytes a background thread already fdatasyncs what is written.
    """

    def __init__(self, directory: Path, *, durable: bool = False) -> None:
        self.directory = directory
        self.durable = durable
        self.index: list[tuple[str, int, int]] = []
        self._seen: set[str] = set()
        self._file: BinaryIO | None = None
        self._tmp: str | None = None
        self._offset = 0
        self._synced_at = 0
        self._writeback: threading.Thread | None = None

    def __enter__(self) -> _PackWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._discard()

    def _open(self) -> None:
        if self._file is None:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                fd, self._tmp = tempfile.mkstemp(dir=self.directory, prefix=".",
                                                 suffix=".pack.kmodtrim")
                self._file = os.fdopen(fd, "wb", buffering=1 << 20)
            except OSError as exc:
                self._fail(exc)
            self._write(_PACK_MAGIC)

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as exc:
            self._fail(exc)
        self._offset += len(data)

    def _fail(self, exc: OSError) -> None:
        self._discard()
        raise StashError(
            f"cannot write the stash: {exc.strerror or exc}",
            hint="free space under /var/lib/kmodtrim and try again; nothing was removed",
        ) from None

    def add(self, sha256: str, frame: bytes) -> None:
        if sha256 in self._seen:
            return
        self._seen.add(sha256)
        self._open()
        self._write(_RECORD.pack(bytes.fromhex(sha256), len(frame)))
        self.index.append((sha256, self._offset, len(frame)))
        self._write(frame)
        if self.durable and self._offset - self._synced_at >= _WRITEBACK_EVERY:
            self._start_writeback()

    def _start_writeback(self) -> None:
        if self._writeback is not None and self._writeback.is_alive():
            return
        assert self._file is not None
        try:
            self._file.flush()
        except OSError as exc:
            self._fail(exc)
        self._synced_at = self._offset
        fd = self._file.fileno()

        def writeback() -> None:
            with contextlib.suppress(OSError):  # finish's own fsync reports any error
                os.fdatasync(fd)

        self._writeback = threading.Thread(target=writeback, name="stash-writeback")
        self._writeback.start()

    def _join_writeback(self) -> None:
        if self._writeback is not None:
            self._writeback.join()
            self._writeback = None

    def finish(self) -> Path | None:
        """Write the index and rename the pack into place; None if nothing was added."""
        if self._file is None:
            return None
        file = self._file
        table = b"".join(_INDEX_ENTRY.pack(bytes.fromhex(sha), offset, length)
                         for sha, offset, length in self.index)
        self._write(table)
        self._write(_FOOTER.pack(len(self.index), hashlib.sha256(table).digest(), _PACK_END))
        assert self._tmp is not None
        name = hashlib.sha256(table).hexdigest()[:32]
        final = self.directory / f"{name}.pack"
        try:
            file.flush()
            self._join_writeback()
            if self.durable:
                os.fsync(file.fileno())
            self._file = None
            file.close()
            os.replace(self._tmp, final)
            self._tmp = None
            if self.durable:
                fsync_dir(self.directory)
        except OSError as exc:
            self._fail(exc)
        return final

    def _discard(self) -> None:
        self._join_writeback()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None


def _read_pack_index(pack: Path) -> list[tuple[str, int, int]]:
    """A pack's (sha256, frame offset, frame length) list: from its index, or by walking
    its records when the index is damaged. Raises OSError if it cannot be read at all."""
    with open(pack, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size >= len(_PACK_MAGIC) + _FOOTER.size:
            f.seek(size - _FOOTER.size)
            count, digest, end = _FOOTER.unpack(f.read(_FOOTER.size))
            table_size = count * _INDEX_ENTRY.size
            if end == _PACK_END and table_size <= size - _FOOTER.size - len(_PACK_MAGIC):
                f.seek(size - _FOOTER.size - table_size)
                table = f.read(table_size)
                if hashlib.sha256(table).digest() == digest:
                    return [(sha.hex(), offset, length)
                            for sha, offset, length in _INDEX_ENTRY.iter_unpack(table)]
        return list(_walk_records(f, size))


def _walk_records(f: BinaryIO, size: int) -> Iterator[tuple[str, int, int]]:
    f.seek(0)
    if f.read(len(_PACK_MAGIC)) != _PACK_MAGIC:
        return
    offset = len(_PACK_MAGIC)
    while offset + _RECORD.size <= size:
        f.seek(offset)
        sha, length = _RECORD.unpack(f.read(_RECORD.size))
        start = offset + _RECORD.size
        if start + length > size:
            return
        f.seek(start)
        if f.read(4) != b"\x28\xb5\x2f\xfd":  # not a zstd frame: the index starts here
            return
        yield sha.hex(), start, length
        offset = start + length
