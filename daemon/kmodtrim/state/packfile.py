"""The stash's pack file: what one operation stashes, as one file (thousands of small files
would cost more in file creation than in compression). Layout::

    b"KMTPACK1"
    record*      sha256 (32 bytes) | length (u64 le) | zstd frame
    manifest     32 zero bytes | length | zstd frame of a JSON document (see below)
    index        (sha256 | frame offset u64 | frame length u64) per record
    footer       record count u64 | sha256 of the index (32 bytes) | b"KMTPEND1"

The manifest makes a pack self-describing: the generation that wrote it and every file it
took out (path, mode, owner, mtime, size, sha256, kind, package; links too, which have no
blob), plus the packages that left whole. A lost or damaged generation manifest is rebuilt
from it (salvage.py). Packs are named ``gN-HASH.pack`` after that generation (older packs,
``HASH.pack``, count as generation 0 and have no manifest).

A pack is written under a temporary name and renamed, so a pack that exists is complete;
a pack whose index is damaged is read by walking its records instead, so damage costs only
the blobs it hit.

Every blob is one zstd frame, so every reader (this version's and older ones) decodes every
blob the same way and the record walk finds them by the frame magic. A file that is already
compressed (``.ko.xz``, ``.ko.zst``, ``.ko.gz``, compressed firmware) is stored as it is, in
a frame of raw blocks (raw_frame): its bytes unchanged behind a 3-byte header per 128 KiB,
which costs no compression time and "decompresses" as a copy. Sniffing the content could
not tell these apart (a ``.ko.zst`` is itself a zstd frame), so the frame says it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from ..errors import StashError
from .files import fsync_dir, make_dirs

PACK_MAGIC = b"KMTPACK1"
_PACK_END = b"KMTPEND1"
_RECORD = struct.Struct("<32sQ")  # sha256, frame length
_INDEX_ENTRY = struct.Struct("<32sQQ")  # sha256, frame offset, frame length
_FOOTER = struct.Struct("<Q32s8s")  # record count, sha256 of the index, end magic
_WRITEBACK_EVERY = 16 << 20  # a durable pack starts reaching the disk while it is written
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MANIFEST_KEY = bytes(32)
MANIFEST_SHA = MANIFEST_KEY.hex()
MANIFEST_LIMIT = 256 << 20  # decompressed; a manifest of every file of a kernel is ~2 MB
_PACK_NAME = re.compile(r"(?:g(\d+)-)?[0-9a-f]{32}\.pack\Z")


_FRAME_HEADER = struct.Struct("<4sBQ")  # magic, descriptor, frame content size
# Frame header descriptor: an 8-byte content size (bits 7-6 = 3), single segment (bit 5),
# no checksum, no dictionary (the stash checks its own sha256 on every read).
_SINGLE_SEGMENT_8_BYTE_SIZE = 0xE0
_RAW_BLOCK_MAX = 128 << 10  # zstd's largest block


def raw_frame(data: bytes) -> bytes:
    """``data`` as a zstd frame of raw (stored) blocks: what the stash keeps for a file that
    is already compressed, so it is not compressed again."""
    parts = [_FRAME_HEADER.pack(_ZSTD_MAGIC, _SINGLE_SEGMENT_8_BYTE_SIZE, len(data))]
    view = memoryview(data)
    offset = 0
    while True:
        block = view[offset:offset + _RAW_BLOCK_MAX]
        offset += len(block)
        last = offset >= len(data)
        # Block header, 3 bytes little-endian: last-block bit, type 0 (raw), size << 3.
        parts.append((len(block) << 3 | int(last)).to_bytes(3, "little"))
        parts.append(bytes(block))
        if last:
            return b"".join(parts)


def pack_generation(pack: Path) -> int:
    """The generation that wrote ``pack`` (0 for an older, unnumbered pack)."""
    match = _PACK_NAME.match(pack.name)
    return int(match.group(1)) if match and match.group(1) else 0


def is_pack(name: str) -> bool:
    return _PACK_NAME.match(name) is not None


def read_manifest(pack: Path, index: list[tuple[str, int, int]]) -> dict[str, Any] | None:
    """The manifest of ``pack`` (None for an older pack without one). Raises OSError,
    ValueError (damaged)."""
    for sha, offset, length in index:
        if sha == MANIFEST_SHA:
            with open(pack, "rb") as f:
                f.seek(offset)
                frame = f.read(length)
            import zstandard  # only when a pack is read: status and plan need not load it

            reader = zstandard.ZstdDecompressor().decompressobj()
            data = reader.decompress(frame)
            if len(data) > MANIFEST_LIMIT:
                raise ValueError("manifest too large")
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("manifest is not an object")
            return doc
    return None


class PackWriter:
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

    def __enter__(self) -> PackWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._discard()

    def _open(self) -> None:
        if self._file is None:
            import tempfile  # only a writer needs it: status and history read packs only

            try:
                make_dirs(self.directory)
                fd, self._tmp = tempfile.mkstemp(dir=self.directory, prefix=".",
                                                 suffix=".pack.kmodtrim")
                self._file = os.fdopen(fd, "wb", buffering=1 << 20)
            except OSError as exc:
                self._fail(exc)
            self._write(PACK_MAGIC)

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as exc:
            self._fail(exc)
        self._offset += len(data)

    def _fail(self, exc: OSError) -> NoReturn:
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

    def finish(self, generation: int = 0, manifest: dict[str, Any] | None = None
               ) -> Path | None:
        """Write ``manifest`` (what the pack's files are, so a lost generation manifest can
        be rebuilt), the index, and rename the pack into place as ``gN-HASH.pack``.
        None if nothing was added (and there is no manifest)."""
        if manifest is not None:
            self._open()
            import zstandard

            frame = zstandard.ZstdCompressor(level=3).compress(
                json.dumps(manifest, separators=(",", ":")).encode())
            self._write(_RECORD.pack(MANIFEST_KEY, len(frame)))
            self.index.append((MANIFEST_SHA, self._offset, len(frame)))
            self._write(frame)
        if self._file is None:
            return None
        file = self._file
        table = b"".join(_INDEX_ENTRY.pack(bytes.fromhex(sha), offset, length)
                         for sha, offset, length in self.index)
        self._write(table)
        import hashlib  # the quick readers of the stash (state/glance.py) need none

        digest = hashlib.sha256(table)
        self._write(_FOOTER.pack(len(self.index), digest.digest(), _PACK_END))
        assert self._tmp is not None
        name = digest.hexdigest()[:32]
        final = self.directory / f"g{generation}-{name}.pack"
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


def index_keys(pack: Path, key_bytes: int) -> set[bytes] | None:
    """The first ``key_bytes`` of the sha256 of every record in ``pack``'s index (the
    manifest's key among them), read without checking the index's own digest: for a quick
    "is every blob there?" whose "no" is checked again with read_index. None when the pack
    has no whole index (read_index then walks its records). Raises OSError."""
    with open(pack, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(PACK_MAGIC) + _FOOTER.size:
            return None
        f.seek(size - _FOOTER.size)
        count, _digest, end = _FOOTER.unpack(f.read(_FOOTER.size))
        table_size = count * _INDEX_ENTRY.size
        if end != _PACK_END or table_size > size - _FOOTER.size - len(PACK_MAGIC):
            return None
        f.seek(size - _FOOTER.size - table_size)
        table = f.read(table_size)
    step = _INDEX_ENTRY.size
    return {table[i:i + key_bytes] for i in range(0, len(table), step)}


def read_index(pack: Path) -> list[tuple[str, int, int]]:
    """A pack's (sha256, frame offset, frame length) list: from its index, or by walking
    its records when the index is damaged. Raises OSError if it cannot be read at all."""
    import hashlib

    with open(pack, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size >= len(PACK_MAGIC) + _FOOTER.size:
            f.seek(size - _FOOTER.size)
            count, digest, end = _FOOTER.unpack(f.read(_FOOTER.size))
            table_size = count * _INDEX_ENTRY.size
            if end == _PACK_END and table_size <= size - _FOOTER.size - len(PACK_MAGIC):
                f.seek(size - _FOOTER.size - table_size)
                table = f.read(table_size)
                if hashlib.sha256(table).digest() == digest:
                    return [(sha.hex(), offset, length)
                            for sha, offset, length in _INDEX_ENTRY.iter_unpack(table)]
        return list(walk_records(f, size))


def walk_records(f: BinaryIO, size: int) -> Iterator[tuple[str, int, int]]:
    f.seek(0)
    if f.read(len(PACK_MAGIC)) != PACK_MAGIC:
        return
    offset = len(PACK_MAGIC)
    while offset + _RECORD.size <= size:
        f.seek(offset)
        sha, length = _RECORD.unpack(f.read(_RECORD.size))
        start = offset + _RECORD.size
        if start + length > size:
            return
        f.seek(start)
        if f.read(4) != _ZSTD_MAGIC:  # not a zstd frame: the index starts here
            return
        yield sha.hex(), start, length
        offset = start + length
