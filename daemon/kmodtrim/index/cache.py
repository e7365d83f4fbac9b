"""The index cache: one marshal file per kernel, so that a rebuild re-reads only the module
files that changed and decodes a module's undefined-symbol lists only when asked."""

from __future__ import annotations

import contextlib
import marshal
import os
import struct
import weakref
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .. import __version__
from ..elf import ModuleInfo, decompress, parse_module, read_module
from ..errors import InputError, ModuleParseError, StoreError
from ..inputs import MAX_KERNEL_METADATA_BYTES, open_input
from ..names import compression_of
from ..state.files import check_trusted, replace_file
from .exports import _ExportsMemo
from .model import StashedModule

_CACHE_FORMAT = 5

# One file per kernel: a header (magic, format, length and CRC-32 of the head), the head
# (marshal), then the symbol region. The head is column-oriented, one row per module file:
#
#     (version, moddir, files, stash, columns, symtab, exports, derived, region length,
#      stash key)
#
# ``files`` lists the tree's module files as the walk sees them, [(relpath, (size,
# mtime_ns, inode))] in walk order, and ``stash`` the stashed ones as [(relpath, (size, 0,
# sha256))]; rows are files then stash. ``columns`` holds ModuleInfo's fields up to
# ``exports``, a list per field. ``symtab`` packs each row's (offset, length, crc32) of its
# (undefined, weak_undefined) symbol lists, a marshal blob of their own in the symbol
# region: those lists are most of the data and only the modules a plan keeps need them,
# so they are decoded per module, on first use, and checked then. When the walk finds
# exactly ``files``, every row is used as it is; otherwise rows are matched per relpath.
# ``stash key`` is the StashedSource key ``stash`` was listed under (None: none): the same
# key again lists the same stashed files, so they are taken from ``stash`` as they are.
# Repeated values (vermagic, licence, dependency names) are stored once.


def default_cache_dir(root: Path) -> Path:
    """Where the index cache lives for ``root``: ROOT/var/cache/kmodtrim."""
    return root / "var" / "cache" / "kmodtrim"


def _cache_path(cache_dir: Path, kernel: str) -> Path:
    return cache_dir / f"index-{kernel}.marshal"


_MAGIC = b"kmodtrim"
_HEADER = struct.Struct("<8sIQI")  # magic, format, head length, head CRC-32
_SYMTAB = struct.Struct("<QII")  # offset, length, CRC-32 of one row's symbol blob
_ALL_FIELDS = tuple(f.name for f in fields(ModuleInfo))
_LAZY_FIELDS = ("undefined", "weak_undefined")
_COLUMN_FIELDS = _ALL_FIELDS[: -len(_LAZY_FIELDS)]
if _ALL_FIELDS[-len(_LAZY_FIELDS):] != _LAZY_FIELDS:  # pragma: no cover - a guard for edits
    raise ImportError("index cache layout out of step with ModuleInfo's fields")
_SHARED_FIELDS = frozenset({"name", "depends", "softdep_pre", "softdep_post", "weakdeps",
                            "vermagic", "license"})
_SymbolLists = tuple[tuple[str, ...], tuple[str, ...]]
_FileRow = tuple[str, Any]  # (relpath, stat)


def _info_to_tuple(info: ModuleInfo) -> tuple[object, ...]:
    return tuple(getattr(info, name) for name in _ALL_FIELDS)


class _LoadedCache:
    """A cache file's head, and the file kept open to read its symbol blobs from later
    (a cache replaced meanwhile is a new file: this one still reads the old)."""

    __slots__ = ("__weakref__", "columns", "derived", "exports", "fd", "files", "moddir",
                 "path", "region", "region_start", "stash", "stash_key", "stashed", "symtab")

    def __init__(self, head: tuple[Any, ...], path: Path, fd: int, region_start: int,
                 moddir: Path, stashed: Mapping[str, StashedModule]) -> None:
        self.files: list[_FileRow] = head[2]
        self.stash: list[_FileRow] = head[3]
        self.columns: tuple[list[Any], ...] = head[4]
        self.symtab: bytes = head[5]
        self.exports: _ExportsMemo = head[6]
        self.derived: frozenset[str] | None = head[7]
        self.stash_key: tuple[int | str, ...] | None = head[9]
        self.path = path
        self.fd = fd
        weakref.finalize(self, os.close, fd)
        self.region_start = region_start
        self.region: bytes | None = None  # the whole symbol region, once read
        self.moddir = moddir
        self.stashed = stashed  # where a damaged stashed module's lists are re-read from

    def read_region(self) -> None:
        """Read the whole symbol region at once, for a caller about to visit every row."""
        if self.region is None:
            with contextlib.suppress(OSError):
                size = os.fstat(self.fd).st_size - self.region_start
                self.region = os.pread(self.fd, size, self.region_start)

    def blob(self, row: int) -> tuple[bytes, int] | None:
        """The row's symbol blob as stored and its CRC-32, or None if it is damaged or
        unreadable."""
        offset, length, crc = _SYMTAB.unpack_from(self.symtab, row * _SYMTAB.size)
        if self.region is not None:
            data = self.region[offset : offset + length]
        else:
            try:
                data = os.pread(self.fd, length, self.region_start + offset)
            except OSError:
                return None
        if len(data) != length or zlib.crc32(data) != crc:
            return None
        return data, crc

    def symbol_lists(self, row: int) -> _SymbolLists:
        stored = self.blob(row)
        if stored is not None:
            try:
                lists = marshal.loads(stored[0])
            except (EOFError, ValueError, TypeError):
                lists = None
            if type(lists) is tuple and len(lists) == 2:
                return lists
        return self._reread(row)

    def _reread(self, row: int) -> _SymbolLists:
        # The file was damaged after its head was checked (or written by something else):
        # take the symbol lists from the module file itself, or its stashed copy, and
        # remove the file (if it is still this one) so that the next build rebuilds it.
        with contextlib.suppress(OSError):
            ours, now = os.fstat(self.fd), os.stat(self.path)
            if (ours.st_dev, ours.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(self.path)
        in_tree = row < len(self.files)
        relpath = self.files[row][0] if in_tree else self.stash[row - len(self.files)][0]
        origin = str(self.moddir / relpath) if in_tree else f"stash:{relpath}"
        try:
            if in_tree and (self.moddir / relpath).exists():
                info = read_module(self.moddir / relpath)
            elif relpath in self.stashed:
                info = parse_module(decompress(self.stashed[relpath].load(),
                                               compression_of(relpath), origin), origin)
            else:
                raise ModuleParseError(origin, "gone from the tree and the stash")
        except ModuleParseError as exc:
            raise ModuleParseError(
                origin, f"its cached symbol lists are damaged and it cannot be re-read "
                        f"({exc.reason}); rebuild the index"
            ) from None
        return info.undefined, info.weak_undefined


class _CachedInfo(ModuleInfo):
    """A ModuleInfo read back from the index cache: its fields are a row of the cache's
    columns and its symbol lists are decoded on first use. It compares and hashes equal
    to the ModuleInfo the module file parses to, and copies/pickles as one."""

    __slots__ = ("_cache", "_row", "_symbols")
    _cache: _LoadedCache
    _row: int
    _symbols: _SymbolLists

    def _symbol_lists(self) -> _SymbolLists:
        lists: _SymbolLists | None = getattr(self, "_symbols", None)
        if lists is None:
            lists = self._cache.symbol_lists(self._row)
            object.__setattr__(self, "_symbols", lists)
        return lists

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ModuleInfo):
            return _info_to_tuple(self) == _info_to_tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(_info_to_tuple(self))

    def __repr__(self) -> str:
        return repr(ModuleInfo(*_info_to_tuple(self)))  # type: ignore[arg-type]

    def __reduce__(self) -> tuple[type[ModuleInfo], tuple[object, ...]]:
        return ModuleInfo, _info_to_tuple(self)


def _column_field(column: int) -> property:
    def get(self: _CachedInfo) -> Any:
        return self._cache.columns[column][self._row]
    return property(get)


def _lazy_field(position: int) -> property:
    def get(self: _CachedInfo) -> tuple[str, ...]:
        return self._symbol_lists()[position]
    return property(get)


# The fields become read-only views of the row (the inherited slots stay unused): making
# one of these costs two slot stores instead of thirteen frozen-dataclass ones.
for _column, _name in enumerate(_COLUMN_FIELDS):
    setattr(_CachedInfo, _name, _column_field(_column))
for _position, _name in enumerate(_LAZY_FIELDS):
    setattr(_CachedInfo, _name, _lazy_field(_position))
_new_cached_info = object.__new__
_set_cache = _CachedInfo.__dict__["_cache"].__set__
_set_row = _CachedInfo.__dict__["_row"].__set__


def _load_cache(path: Path, moddir: Path,
                stashed: Mapping[str, StashedModule]) -> _LoadedCache | None:
    """The cache at ``path`` for ``moddir``; None if missing, damaged, of another kind, or
    where someone other than root could have planted it."""
    if not _cache_trusted(path):
        return None
    try:
        fd = open_input(path, limit=MAX_KERNEL_METADATA_BYTES, what="index cache")
    except InputError:  # not there, or not a regular file: rebuilt (and replaced)
        return None
    cache = None
    try:
        cache = _read_cache_head(path, fd, moddir, stashed)
    except OSError:
        pass
    finally:
        if cache is None:
            os.close(fd)
    return cache


def _read_cache_head(path: Path, fd: int, moddir: Path,
                     stashed: Mapping[str, StashedModule]) -> _LoadedCache | None:
    size = os.fstat(fd).st_size
    header = os.pread(fd, _HEADER.size, 0)
    if len(header) < _HEADER.size:
        return None
    magic, form, head_length, head_crc = _HEADER.unpack(header)
    if magic != _MAGIC or form != _CACHE_FORMAT or head_length > size - _HEADER.size:
        return None
    head_bytes = os.pread(fd, head_length, _HEADER.size)
    if len(head_bytes) != head_length or zlib.crc32(head_bytes) != head_crc:
        return None
    try:
        head = marshal.loads(head_bytes)
    except (EOFError, ValueError, TypeError):
        return None
    if not (
        isinstance(head, tuple)
        and len(head) == 10
        and head[0] == __version__
        and head[1] == str(moddir)
        and isinstance(head[2], list)
        and isinstance(head[3], list)
        and isinstance(head[4], tuple)
        and len(head[4]) == len(_COLUMN_FIELDS)
        and all(len(column) == len(head[2]) + len(head[3]) for column in head[4])
        and isinstance(head[5], bytes)
        and len(head[5]) == _SYMTAB.size * (len(head[2]) + len(head[3]))
        and isinstance(head[6], dict)
        and (head[7] is None or isinstance(head[7], frozenset))
        and head[8] == size - _HEADER.size - head_length
        and (head[9] is None or isinstance(head[9], tuple))
    ):
        return None
    return _LoadedCache(head, path, fd, _HEADER.size + head_length, moddir, stashed)


def _save_cache(path: Path, moddir: Path, files: list[tuple[str, Any, ModuleInfo]],
                stash: list[tuple[str, Any, ModuleInfo]], exports: _ExportsMemo,
                derived: frozenset[str] | None,
                stash_key: tuple[int | str, ...] | None = None) -> None:
    columns: list[list[object]] = [[] for _ in _COLUMN_FIELDS]
    shared = [name in _SHARED_FIELDS for name in _COLUMN_FIELDS]
    canonical: dict[object, object] = {}

    def once(value: object) -> object:  # one object per distinct value: marshal refers back
        if type(value) is tuple:
            value = tuple(canonical.setdefault(item, item) for item in value)
        return canonical.setdefault(value, value)

    symtab: list[bytes] = []
    blobs: list[bytes] = []
    offset = 0
    for _, _, info in (*files, *stash):
        stored = None
        if type(info) is _CachedInfo:
            info._cache.read_region()
            values: Iterable[object] = (column[info._row] for column in info._cache.columns)
            stored = info._cache.blob(info._row)
        else:
            values = (getattr(info, name) for name in _COLUMN_FIELDS)
        if stored is None:
            blob = marshal.dumps((info.undefined, info.weak_undefined))
            stored = blob, zlib.crc32(blob)
        blob, crc = stored
        for column, value, share in zip(columns, values, shared, strict=True):
            column.append(once(value) if share else value)
        symtab.append(_SYMTAB.pack(offset, len(blob), crc))
        blobs.append(blob)
        offset += len(blob)
    head = marshal.dumps((
        __version__, str(moddir), [(relpath, stat) for relpath, stat, _ in files],
        [(relpath, stat) for relpath, stat, _ in stash], tuple(columns), b"".join(symtab),
        exports, derived, offset, stash_key,
    ))
    header = _HEADER.pack(_MAGIC, _CACHE_FORMAT, len(head), zlib.crc32(head))
    if not _cache_trusted(path):
        return  # a directory others can write is no place for what root reads back
    with contextlib.suppress(OSError):  # a read-only root or full disk only costs speed
        # A lost cache is rebuilt, not wrong: no fsync.
        replace_file(path, b"".join([header, head, *blobs]), durable=False)


def _cache_trusted(path: Path) -> bool:
    """True unless the cache or its directory is a link, someone else's, or writable by
    others (a planted cache would steer the plan)."""
    try:
        check_trusted(path.parent.parent, path)
    except StoreError:
        return False
    return True
