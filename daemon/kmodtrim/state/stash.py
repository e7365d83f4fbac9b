"""The local stash: removed files, compressed and content-addressed, so any restore works
offline and after the distribution dropped that kernel version.

Every blob is a zstd frame of the original bytes of a file, named by their sha256: compressed
at level 1, or — for a file that is already compressed (``.ko.xz``, ``.ko.zst``, ``.ko.gz``)
— stored as it is in raw blocks (packfile.raw_frame), so it costs no CPU and no space is
lost to a second compression. Blobs live in one of two forms:

- **packs**, ``stash/packs/gN-HASH.pack`` (packfile.py): what one operation stashes, with a
  manifest saying which file each blob is, so the stash can describe itself;
- **loose blobs**, ``stash/objects/AB/ABCDEF….zst``: single files stashed one at a time.

Damage is per blob: a damaged frame fails only the files whose bytes it held (named in the
error, listed by ``verify``), never the rest. Restore verifies the hash before the file goes
back, and writes it beside its destination first, never through a link that leaves the
root (fsutil). Garbage collection deletes a pack nothing refers to and rewrites one that is
mostly garbage, manifest included.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import fsutil
from ..errors import DamagedCopyError, StashError, StoreError
from ..inputs import MAX_MODULE_BYTES
from ..records import StashedFile
from ..takeout import PutRequest, Source
from .files import check_trusted, replace_file, stash_dir
from .packfile import (
    MANIFEST_SHA,
    PackWriter,
    is_pack,
    pack_generation,
    raw_frame,
    read_index,
    read_manifest,
)

_LEVEL = 1  # ~480 MB/s a core; level 3 saves under 1% more on modules
# Files compressed already: zstd finds nothing left to save in them, so they are stored.
STORED_AS_IS = (".xz", ".zst", ".gz")
_REPACK_GARBAGE = 0.5  # rewrite a pack once more than this share of its bytes is garbage
MANIFEST_SCHEMA = 1

# What put_many embeds in its pack beside the files: given their entries, a document with
# anything else the state is rebuilt from (e.g. packages removed whole).
Describe = Callable[[Sequence[StashedFile]], dict[str, Any]]


@dataclass(frozen=True)
class _Located:
    pack: Path
    offset: int
    length: int


@dataclass(frozen=True)
class PackRecord:
    """What one pack says of itself: the generation that wrote it and its manifest."""

    pack: Path
    generation: int
    manifest: dict[str, Any] | None  # None: an older pack, or its manifest is damaged
    damaged: bool = False


def _describes_archive_files(manifest: dict[str, Any] | None, referenced: set[str]) -> bool:
    """Whether a pack's manifest describes a file still out of the tree that the archive
    serves (it has no blob; the manifest is its only record besides the generation's)."""
    files = (manifest or {}).get("files")
    return isinstance(files, list) and any(
        isinstance(f, dict) and f.get("source") == Source.ARCHIVE
        and f.get("sha256") in referenced for f in files)


class Stash:
    """Content-addressed store of removed files under ROOT/var/lib/kmodtrim/stash."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = stash_dir(root) / "objects"
        self.packs = stash_dir(root) / "packs"
        self._packed: dict[str, _Located] | None = None
        self._packed_lock = threading.Lock()

    def _blob(self, sha256: str) -> Path:
        return self.objects / sha256[:2] / f"{sha256}.zst"

    def has(self, sha256: str) -> bool:
        return sha256 in self._pack_index() or self._blob(sha256).exists()

    # -- packs ----------------------------------------------------------------------------

    def pack_files(self) -> list[Path]:
        """Every complete pack, after checking the stash can be trusted. Raises
        StoreError for a stash someone other than root could have written."""
        check_trusted(self.root, self.packs)
        try:
            return sorted(p for p in self.packs.iterdir() if is_pack(p.name))
        except FileNotFoundError:
            return []
        except NotADirectoryError:
            raise StoreError(f"{self.packs}: not a directory") from None

    def newest_pack_generation(self) -> int:
        """The highest generation a pack was written for (0 when there is none); cheap:
        read from the pack names."""
        return max((pack_generation(p) for p in self.pack_files()), default=0)

    def _pack_index(self) -> dict[str, _Located]:
        with self._packed_lock:
            if self._packed is None:
                packed: dict[str, _Located] = {}
                for pack in self.pack_files():
                    with contextlib.suppress(OSError):
                        for sha, offset, length in read_index(pack):
                            packed.setdefault(sha, _Located(pack, offset, length))
                self._packed = packed
            return self._packed

    def _forget_packs(self) -> None:
        with self._packed_lock:
            self._packed = None

    def records(self) -> list[PackRecord]:
        """What every pack says of itself, oldest generation first. Never raises for a
        damaged pack: it is returned with ``damaged`` set."""
        out = []
        for pack in self.pack_files():
            try:
                manifest = read_manifest(pack, read_index(pack))
                out.append(PackRecord(pack, pack_generation(pack), manifest))
            except (OSError, ValueError, Exception):  # zstd errors are plain Exceptions
                out.append(PackRecord(pack, pack_generation(pack), None, damaged=True))
        return sorted(out, key=lambda r: (r.generation, r.pack.name))

    def put_many(self, requests: Sequence[PutRequest], *, workers: int | None = None,
                 each: Callable[[int], None] | None = None, generation: int = 0,
                 describe: Describe | None = None) -> list[StashedFile]:
        """Stash many in-root files (not yet removing them) as one new pack; returns their
        entries in order. ``each(i)`` runs after the i-th (1-based) is recorded. The pack
        carries a manifest naming ``generation`` and every entry (plus ``describe``'s
        document), so the state can be rebuilt from the stash alone.

        Reading, hashing and compressing run on ``workers`` threads (they release the GIL);
        the pack is written by the caller's thread, in order, and is durable on return.
        Raises StashError (e.g. disk full) leaving no partial pack behind.
        """
        from concurrent.futures import ThreadPoolExecutor  # only a change stashes

        import zstandard

        known = self._pack_index()
        local = threading.local()

        def prepare(request: PutRequest) -> tuple[StashedFile, bytes | None]:
            entry, data = self._describe(request)
            if data is None or not entry.has_blob or entry.sha256 in known \
                    or self._blob(entry.sha256).exists():
                return entry, None
            if entry.path.endswith(STORED_AS_IS):
                return entry, raw_frame(data)
            compressor = getattr(local, "compressor", None)
            if compressor is None:
                compressor = local.compressor = zstandard.ZstdCompressor(level=_LEVEL)
            return entry, compressor.compress(data)

        entries: list[StashedFile] = []
        if not requests:
            return entries
        with PackWriter(self.packs, durable=True) as writer, \
                ThreadPoolExecutor(max_workers=workers or min(os.cpu_count() or 1, 8)) as pool:
            for i, (entry, frame) in enumerate(pool.map(prepare, requests), 1):
                if frame is not None:
                    writer.add(entry.sha256, frame)
                entries.append(entry)
                if each is not None:
                    each(i)
            manifest = {"schema": MANIFEST_SCHEMA, "generation": generation,
                        "files": [e.to_json() for e in entries],
                        **(describe(entries) if describe is not None else {})}
            pack = writer.finish(generation, manifest)
        if pack is not None:
            with self._packed_lock:
                if self._packed is not None:
                    for sha, offset, length in writer.index:
                        self._packed.setdefault(sha, _Located(pack, offset, length))
        return entries

    def _describe(self, request: PutRequest) -> tuple[StashedFile, bytes | None]:
        """The manifest entry of an in-root file, and its bytes (None for a link)."""
        try:
            st, content = fsutil.describe(self.root, request.path, MAX_MODULE_BYTES)
        except OSError as exc:
            raise StashError(f"cannot read {request.path}: {exc.strerror or exc}") from None
        if isinstance(content, str):
            return StashedFile(
                path=request.path, size=st.st_size,
                sha256=hashlib.sha256(content.encode()).hexdigest(), mode=0o777,
                uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns, kind=request.kind,
                module=request.module, kernel=request.kernel, package=request.package,
                link=content, version=request.version,
            ), None
        return StashedFile(
            path=request.path, size=st.st_size, sha256=hashlib.sha256(content).hexdigest(),
            mode=st.st_mode & 0o7777, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
            kind=request.kind, module=request.module, kernel=request.kernel,
            package=request.package, source=request.source, version=request.version,
        ), content

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
                compressed = raw_frame(data) if path.endswith(STORED_AS_IS) else \
                    zstandard.ZstdCompressor(level=_LEVEL).compress(data)
                replace_file(self._blob(entry.sha256), compressed, durable=False)
            except OSError as exc:
                raise StashError(
                    f"cannot stash {path}: {exc.strerror or exc}",
                    hint="free space under /var/lib/kmodtrim and try again; nothing was removed",
                ) from None
        return entry

    def read(self, entry: StashedFile) -> bytes:
        """The original bytes of a stashed file, hash-verified. Raises StashError naming
        the file when its copy is missing or damaged (other copies are unaffected)."""
        import zstandard

        try:
            frame = self._read_compressed(entry.sha256)
            data = zstandard.ZstdDecompressor().decompressobj().decompress(frame)
        except OSError as exc:
            raise DamagedCopyError(
                f"stash copy of {entry.path} is missing: {exc.strerror}") from None
        except zstandard.ZstdError as exc:
            raise DamagedCopyError(f"stash copy of {entry.path} is damaged: {exc}") from None
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise DamagedCopyError(
                f"stash copy of {entry.path} is damaged (its sha256 differs)")
        return data

    def restore(self, entry: StashedFile) -> None:
        """Put a stashed file back at its path, byte-identical, with its mode, owner and
        mtime. Raises StashError; the blob stays until garbage-collected."""
        self.restore_to(entry, self.root)

    def restore_to(self, entry: StashedFile, base: Path) -> None:
        """Write a stashed file's original bytes (or link) at ``entry.path`` under ``base``
        — the root, or a tree where a package is being rebuilt — with its mode, owner and
        mtime, never through a link that leaves ``base``. Raises StashError."""
        try:
            if entry.link is not None:
                fsutil.write_link(base, entry.path, entry.link, owner=(entry.uid, entry.gid),
                                  mtime_ns=entry.mtime_ns)
                return
            data = self.read(entry)
            fsutil.write_file(base, entry.path, data, mode=entry.mode,
                              owner=(entry.uid, entry.gid), mtime_ns=entry.mtime_ns,
                              durable=False)
        except OSError as exc:
            raise StashError(
                f"cannot restore {entry.path}: {exc.strerror or exc}",
                hint="free space on the module file system and try again",
            ) from None

    def has_copy(self, entry: StashedFile) -> bool:
        """True if ``entry`` needs nothing the stash lacks: a link or a file the archive
        serves needs no blob, any other file its blob."""
        return not entry.has_blob or self.has(entry.sha256)

    def missing_copies(self, entries: Iterable[StashedFile]) -> list[StashedFile]:
        """The entries ``has_copy`` is false for, in order (the pack index looked up
        once, not once per entry)."""
        packed = self._pack_index()
        stash = Source.STASH
        return [e for e in entries if e.link is None and e.source is stash  # has_blob
                and e.sha256 not in packed and not self._blob(e.sha256).exists()]

    def matches(self, entry: StashedFile) -> bool:
        """True if the file at entry.path exists with entry's content."""
        try:
            if entry.link is not None:
                return fsutil.readlink(self.root, entry.path) == entry.link
            if fsutil.lstat(self.root, entry.path).st_size != entry.size:
                return False
            data = fsutil.read_bytes(self.root, entry.path, MAX_MODULE_BYTES)
            return hashlib.sha256(data).hexdigest() == entry.sha256
        except (OSError, StoreError):
            return False

    def verify(self, entries: Iterable[StashedFile]) -> list[tuple[StashedFile, str]]:
        """Every entry whose copy is missing or damaged, with why (reads and hashes each
        blob once)."""
        damaged: list[tuple[StashedFile, str]] = []
        verdicts: dict[str, str | None] = {}
        for entry in entries:
            if not entry.has_blob:
                continue
            if entry.sha256 not in verdicts:
                try:
                    self.read(entry)
                    verdicts[entry.sha256] = None
                except StashError as exc:
                    verdicts[entry.sha256] = exc.message
            why = verdicts[entry.sha256]
            if why is not None:
                damaged.append((entry, why))
        return damaged

    def collect_garbage(self, referenced: set[str], keep_generation: int | None = None) -> int:
        """Delete blobs no stashed file refers to, and leftovers of interrupted writes;
        returns how many blobs went. A pack mostly garbage is rewritten with the rest and
        its manifest (durably, before the old one goes); one with a little garbage is kept
        as it is. The pack of ``keep_generation`` stays even without a live blob: its
        manifest is what tells a lost manifest of that generation. Call it only under the
        operation lock."""
        removed = 0
        if self.objects.is_dir():
            for sub in self.objects.iterdir():
                for blob in sub.iterdir():
                    sha = blob.name.split(".", 1)[0]
                    if sha not in referenced:
                        with contextlib.suppress(OSError):
                            blob.unlink()
                            removed += 1
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for leftover in self.packs.glob(".*.kmodtrim"):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        for pack in self.pack_files():
            if keep_generation is None or pack_generation(pack) != keep_generation:
                removed += self._collect_pack(pack, referenced)
        self._forget_packs()
        return removed

    def _collect_pack(self, pack: Path, referenced: set[str]) -> int:
        try:
            index = read_index(pack)
        except OSError:
            return 0
        blobs = [item for item in index if item[0] != MANIFEST_SHA]
        live = [item for item in blobs if item[0] in referenced]
        dead = len(blobs) - len(live)
        manifest: dict[str, Any] | None = None
        if not live:
            manifest = self._manifest(pack, index)
            if not _describes_archive_files(manifest, referenced):
                with contextlib.suppress(OSError):
                    pack.unlink()
                return dead
            if not dead:
                return 0  # only the manifest of files the archive serves: it stays
        else:
            garbage = sum(length for sha, _, length in blobs if sha not in referenced)
            if garbage <= _REPACK_GARBAGE * sum(length for _, _, length in blobs):
                return 0
            manifest = self._manifest(pack, index)
        if manifest is not None:
            files = manifest.get("files")
            if isinstance(files, list):
                manifest["files"] = [f for f in files if isinstance(f, dict) and (
                    f.get("link") is not None or f.get("sha256") in referenced)]
        try:
            with open(pack, "rb") as source, PackWriter(self.packs, durable=True) as writer:
                for sha, offset, length in live:
                    source.seek(offset)
                    writer.add(sha, source.read(length))
                writer.finish(pack_generation(pack), manifest)
            pack.unlink()
        except (OSError, StashError):
            return 0  # no room to rewrite it: it stays, whole
        return dead

    @staticmethod
    def _manifest(pack: Path, index: list[tuple[str, int, int]]) -> dict[str, Any] | None:
        try:
            return read_manifest(pack, index)
        except (OSError, ValueError, Exception):  # zstd errors are plain Exceptions
            return None

    def size_on_disk(self) -> int:
        total = 0
        if self.objects.is_dir():
            for sub in self.objects.iterdir():
                for blob in sub.iterdir():
                    with contextlib.suppress(OSError):
                        total += blob.stat().st_size
        for pack in self.pack_files():
            with contextlib.suppress(OSError):
                total += pack.stat().st_size
        return total
