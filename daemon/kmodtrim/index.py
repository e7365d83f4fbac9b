"""ModuleIndex: everything kmodtrim needs to know about one kernel's module tree.

Built from the modules' own ELF metadata (never from depmod's generated ``modules.*``
files, which may be missing or stale), plus ``modules.builtin*``, modprobe.d, and the
kernel's own exported symbols. A per-file cache keyed by (size, mtime_ns, inode) makes a
rebuild re-read only the files that changed; from the cache, a module's undefined-symbol
lists are only read when something asks for them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import marshal
import os
import re
import struct
import weakref
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import __version__
from .elf import ModuleInfo, decompress, parse_module, parse_softdep, read_module
from .errors import InputError, KernelNotFoundError, ModuleParseError, StoreError
from .inputs import (
    MAX_KERNEL_METADATA_BYTES,
    open_input,
    read_compressed_input,
    read_optional_input,
)
from .modprobe import ModprobeConfig, read_modprobe_config
from .names import (
    MODULE_SUFFIXES,
    compression_of,
    is_valid_kernel_version,
    module_name_from_path,
    normalize,
)
from .paths import MODULE_DIR_BASES as MODULE_DIR_BASES  # re-exported: defined in paths
from .paths import default_kernel as default_kernel
from .paths import installed_kernels as installed_kernels
from .store import check_trusted, replace_file

_CACHE_FORMAT = 4
_GLOB_CHARS = re.compile(r"[*?\[]")
# Directories in a module tree that are never module trees themselves.
_SKIP_DIRS = frozenset({"build", "source"})


@dataclass(frozen=True, slots=True)
class ModuleEntry:
    """One loadable module in the tree."""

    name: str
    relpath: str  # relative to the module dir, e.g. "kernel/drivers/net/virtio_net.ko"
    size: int  # bytes on disk (compressed size for .ko.xz …)
    info: ModuleInfo
    shadowed: tuple[str, ...] = ()  # other files with the same module name (lower priority)
    stashed: bool = False  # not in the tree: taken out by an earlier trim, kept in the stash


@dataclass(frozen=True)
class ModuleIndex:
    """A kernel's modules, builtins, aliases, soft/weak deps and symbol providers."""

    root: Path
    kernel: str
    moddir: Path  # absolute path of ROOT/lib/modules/KVER (or usr/lib/modules)
    modules: Mapping[str, ModuleEntry]
    builtins: frozenset[str]
    builtin_aliases: tuple[tuple[str, str], ...]  # (pattern, builtin module)
    modprobe: ModprobeConfig
    kernel_exports: frozenset[str]
    kernel_exports_source: str  # "symvers:PATH", "System.map:PATH", "derived from the tree"
    parse_errors: tuple[ModuleParseError, ...] = ()
    _alias_matchers: dict[int, _AliasMatcher] | None = field(
        default=None, repr=False, compare=False
    )
    _providers: dict[str, str] | None = field(default=None, repr=False, compare=False)

    # -- names ------------------------------------------------------------------------

    def knows(self, name: str) -> bool:
        """True if ``name`` is a loadable or builtin module of this kernel."""
        n = normalize(name)
        return n in self.modules or n in self.builtins

    def resolve(self, name: str) -> list[str]:
        """Modules a ``modprobe NAME`` would mean, looked up in kmod's order: modprobe.d
        aliases, a loadable module of that name, ``symbol:NAME``, module aliases, builtin
        aliases, a builtin of that name. Empty if nothing matches."""
        n = normalize(name)
        found = self._matcher(0).match(name)
        if found:
            return found
        if n in self.modules:
            return [n]
        if name.startswith("symbol:"):
            provider = self.symbol_providers.get(name[7:])
            return [provider] if provider else []
        found = self._matcher(1).match(name) or self._matcher(2).match(name)
        if found:
            return found
        return [n] if n in self.builtins else []

    def match_alias(self, string: str) -> list[str]:
        """Modules (loadable or builtin) with an alias matching ``string`` (C fnmatch
        semantics, dashes normalised like kmod does), in index order, without repeats."""
        found = dict.fromkeys(self._matcher(0).match(string))
        found.update(dict.fromkeys(self._matcher(1).match(string)))
        found.update(dict.fromkeys(self._matcher(2).match(string)))
        return list(found)

    def _matcher(self, which: int) -> _AliasMatcher:
        """0: modprobe.d aliases, 1: loadable modules' aliases, 2: builtins' aliases."""
        matchers = self._alias_matchers
        if matchers is None:
            matchers = {}
            object.__setattr__(self, "_alias_matchers", matchers)
        matcher = matchers.get(which)
        if matcher is None:
            if which == 0:
                pairs: Iterable[tuple[str, str]] = self.modprobe.aliases
            elif which == 1:
                pairs = ((a, e.name) for e in self.modules.values() for a in e.info.aliases)
            else:
                pairs = self.builtin_aliases
            matcher = matchers[which] = _AliasMatcher(pairs)
        return matcher

    # -- relationships ----------------------------------------------------------------

    def softdeps(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(pre, post) softdeps: modprobe.d overrides the module's own modinfo."""
        if name in self.modprobe.softdeps:
            return self.modprobe.softdeps[name]
        entry = self.modules.get(name)
        if entry is None:
            return (), ()
        return entry.info.softdep_pre, entry.info.softdep_post

    def weakdeps(self, name: str) -> tuple[str, ...]:
        entry = self.modules.get(name)
        own = entry.info.weakdeps if entry is not None else ()
        return own + self.modprobe.weakdeps.get(name, ())

    @property
    def symbol_providers(self) -> dict[str, str]:
        """Exported symbol → the loadable module that exports it (first in priority)."""
        providers = self._providers
        if providers is None:
            providers = {}
            for entry in self.modules.values():
                for sym in entry.info.exports:
                    providers.setdefault(sym, entry.name)
            object.__setattr__(self, "_providers", providers)
        return providers

    def total_bytes(self) -> int:
        return sum(e.size for e in self.modules.values())


class _AliasMatcher:
    """fnmatch over thousands of alias patterns, fast enough for every device of a VM.

    Patterns without wildcards go into a dict; the rest are bucketed by their literal
    prefix (up to the first wildcard), so a lookup only tries patterns whose prefix is a
    prefix of the string.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.exact: dict[str, list[str]] = {}
        self.by_prefix: dict[str, list[tuple[str, str]]] = {}
        for pattern, module in pairs:
            pattern = alias_normalize(pattern)
            match = _GLOB_CHARS.search(pattern)
            if match is None:
                self.exact.setdefault(pattern, []).append(module)
            else:
                prefix = pattern[: match.start()]
                self.by_prefix.setdefault(prefix, []).append((pattern, module))
        self.prefix_lengths = sorted({len(p) for p in self.by_prefix})

    def match(self, string: str) -> list[str]:
        string = alias_normalize(string)
        found = dict.fromkeys(self.exact.get(string, ()))
        for length in self.prefix_lengths:
            if length > len(string):
                break
            for pattern, module in self.by_prefix.get(string[:length], ()):
                if module not in found and fnmatch.fnmatchcase(string, pattern):
                    found[module] = None
        return list(found)


def alias_normalize(alias: str) -> str:
    """kmod's alias normalisation: ``-`` → ``_`` outside ``[...]`` brackets."""
    if "-" not in alias:
        return alias
    out = []
    depth = 0
    for ch in alias:
        if ch == "[":
            depth += 1
        elif ch == "]" and depth:
            depth -= 1
        out.append("_" if ch == "-" and depth == 0 else ch)
    return "".join(out)


# ---------------------------------------------------------------------------------------
# Locating a kernel


def module_dir(root: Path, kernel: str) -> Path:
    """ROOT/lib/modules/KVER (or ROOT/usr/lib/modules/KVER). Raises KernelNotFoundError."""
    if not is_valid_kernel_version(kernel):
        raise KernelNotFoundError(f"{kernel!r} is not a kernel version")
    for base in MODULE_DIR_BASES:
        candidate = root / base / kernel
        if candidate.is_dir():
            return candidate
    available = ", ".join(installed_kernels(root)) or "none"
    raise KernelNotFoundError(
        f"no module tree for kernel {kernel} under {root} (looked in "
        f"{', '.join('/' + b for b in MODULE_DIR_BASES)}); installed: {available}",
        hint="pass --kernel with one of the installed versions",
    )


# ---------------------------------------------------------------------------------------
# Reading the tree


# (size, mtime_ns, inode) of a module file
_Stat = tuple[int, int, int]


def _walk_modules(moddir: Path) -> list[tuple[str, _Stat]]:
    """Every module file under ``moddir`` (relpath, (size, mtime_ns, inode)), sorted by
    relpath. Directory symlinks are not followed; a symlinked module file is stat'ed
    through its link; ``build``/``source`` at the top are not module trees."""
    found: list[tuple[str, _Stat]] = []
    stack = [("", str(moddir))]
    suffixes = MODULE_SUFFIXES
    skip = _SKIP_DIRS
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    while stack:
        prefix, directory = stack.pop()
        try:
            fd = os.open(directory, flags)
        except OSError:
            continue
        try:
            # Listing a descriptor makes each file's stat relative to it (fstatat): the
            # kernel resolves one name per file instead of the whole path.
            with os.scandir(fd) as entries:
                for entry in entries:
                    name = entry.name
                    if entry.is_dir(follow_symlinks=False):
                        if prefix or name not in skip:
                            stack.append((prefix + name + "/", directory + "/" + name))
                    elif name.endswith(suffixes):
                        try:
                            st = entry.stat()
                        except OSError:
                            continue
                        found.append((prefix + name, (st.st_size, st.st_mtime_ns, st.st_ino)))
        finally:
            os.close(fd)
    found.sort()  # directory order is arbitrary; priorities and providers must not be
    return found


def _priority(relpath: str) -> tuple[int, str]:
    # depmod's default search order: "updates" first, then everything else.
    return (0 if relpath.startswith("updates/") else 1, relpath)


def read_builtins(moddir: Path) -> tuple[frozenset[str], tuple[tuple[str, str], ...],
                                          dict[str, tuple[tuple[str, ...], tuple[str, ...]]]]:
    """Builtin module names, their aliases and softdeps from modules.builtin(.modinfo).

    Missing or unreadable files give nothing; raises InputError for one that is not a
    regular file or is over MAX_KERNEL_METADATA_BYTES.
    """
    names: set[str] = set()
    raw = _metadata(moddir / "modules.builtin", "builtin-modules list")
    for line in (raw or b"").decode("utf-8", "replace").splitlines():
        name = module_name_from_path(line.strip())
        if name:
            names.add(name)
    aliases: list[tuple[str, str]] = []
    softdeps: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    raw = _metadata(moddir / "modules.builtin.modinfo", "builtin-modules list")
    if raw is not None:
        for item in raw.split(b"\0"):
            text = item.decode("utf-8", "replace")
            head, sep, value = text.partition("=")
            module, dot, key = head.partition(".")
            if not (sep and dot):
                continue
            module = normalize(module)
            names.add(module)
            if key == "alias":
                aliases.append((value, module))
            elif key == "softdep":
                softdeps[module] = parse_softdep(value)
    return frozenset(names), tuple(aliases), softdeps


def _metadata(path: Path, what: str) -> bytes | None:
    return read_optional_input(path, limit=MAX_KERNEL_METADATA_BYTES, what=what,
                               skip_unreadable=True)


def read_kernel_exports(
    root: Path, kernel: str, moddir: Path, symvers: Path | None = None,
    memo: _ExportsMemo | None = None,
) -> tuple[frozenset[str], str] | None:
    """The kernel's (vmlinux) exported symbols from the best source the root has.

    Order: an explicit Module.symvers, ``symvers.xz``/``symvers.gz``/``symvers`` in the
    module dir (Fedora), a real ``/boot/System.map-KVER`` (Debian's is a one-line stub),
    ``/usr/src/linux-headers-KVER/Module.symvers`` (Debian headers). None if none exists.
    ``memo`` (part of the index cache) remembers parsed files by (size, mtime_ns, inode).
    """
    headers = root / "usr" / "src" / f"linux-headers-{kernel}" / "Module.symvers"
    candidates: list[tuple[Path, Callable[[str], list[str]], str]] = []
    if symvers is not None:
        candidates.append((symvers, _parse_symvers, f"symvers:{symvers}"))
    for name in ("symvers.xz", "symvers.gz", "symvers"):
        candidates.append((moddir / name, _parse_symvers, f"symvers:{moddir / name}"))
    candidates.append((root / "boot" / f"System.map-{kernel}", _parse_system_map,
                       f"System.map:/boot/System.map-{kernel}"))
    candidates.append((headers, _parse_symvers, f"symvers:{headers}"))
    for path, parser, source in candidates:
        try:
            st = path.stat()
        except OSError:
            continue
        key = f"exports:{path}"
        stat = (st.st_size, st.st_mtime_ns, st.st_ino)
        hit = memo.get(key) if memo is not None else None
        if hit is not None and hit[0] == stat:
            syms = hit[1]
        else:
            syms = frozenset(parser(_read_maybe_compressed(path)))
            if memo is not None:
                memo[key] = (stat, syms)
        if syms:
            return syms, source
    return None


def _parse_system_map(text: str) -> list[str]:
    # depmod -F takes the "__ksymtab_NAME" symbols of a System.map as the kernel's exports.
    syms = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2].startswith("__ksymtab_"):
            syms.append(fields[2][10:])
    return syms


def _read_maybe_compressed(path: Path) -> str:
    """A kernel symbol list, decompressed (``.xz``, ``.gz``). Raises InputError for an
    unreadable, corrupt or non-regular file, or one over MAX_KERNEL_METADATA_BYTES."""
    raw = read_compressed_input(path, limit=MAX_KERNEL_METADATA_BYTES,
                                what="kernel symbol list")
    return raw.decode("utf-8", "replace")


def _parse_symvers(text: str) -> list[str]:
    # "0xCRC<TAB>symbol<TAB>vmlinux<TAB>EXPORT_SYMBOL[_GPL]<TAB>namespace"
    syms = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[2] == "vmlinux":
            syms.append(fields[1])
    return syms


def derived_kernel_exports(infos: Iterable[ModuleInfo]) -> frozenset[str]:
    """What the kernel must export, judged from a complete tree: every symbol some module
    imports that no module exports. Only valid on an untrimmed tree."""
    infos = list(infos)
    exported: set[str] = set()
    for info in infos:
        exported.update(info.exports)
    needed: set[str] = set()
    for info in infos:
        needed.update(info.undefined)
    return frozenset(needed - exported)


# ---------------------------------------------------------------------------------------
# The cache
#
# One file per kernel: a header (magic, format, length and CRC-32 of the head), the head
# (marshal), then the symbol region. The head is column-oriented, one row per module file:
#
#     (version, moddir, files, stash, columns, symtab, exports, derived, region length)
#
# ``files`` lists the tree's module files as the walk sees them, [(relpath, (size,
# mtime_ns, inode))] in walk order, and ``stash`` the stashed ones as [(relpath, (size, 0,
# sha256))]; rows are files then stash. ``columns`` holds ModuleInfo's fields up to
# ``exports``, a list per field. ``symtab`` packs each row's (offset, length, crc32) of its
# (undefined, weak_undefined) symbol lists, a marshal blob of their own in the symbol
# region: those lists are most of the data and only the modules a plan keeps need them,
# so they are decoded per module, on first use, and checked then. When the walk finds
# exactly ``files``, every row is used as it is; otherwise rows are matched per relpath.
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
_ExportsMemo = dict[str, tuple[_Stat, frozenset[str]]]
_FileRow = tuple[str, Any]  # (relpath, stat)


def _info_to_tuple(info: ModuleInfo) -> tuple[object, ...]:
    return tuple(getattr(info, name) for name in _ALL_FIELDS)


class _LoadedCache:
    """A cache file's head, and the file kept open to read its symbol blobs from later
    (a cache replaced meanwhile is a new file: this one still reads the old)."""

    __slots__ = ("__weakref__", "columns", "derived", "exports", "fd", "files", "moddir",
                 "path", "region", "region_start", "stash", "stashed", "symtab")

    def __init__(self, head: tuple[Any, ...], path: Path, fd: int, region_start: int,
                 moddir: Path, stashed: Mapping[str, StashedModule]) -> None:
        self.files: list[_FileRow] = head[2]
        self.stash: list[_FileRow] = head[3]
        self.columns: tuple[list[Any], ...] = head[4]
        self.symtab: bytes = head[5]
        self.exports: _ExportsMemo = head[6]
        self.derived: frozenset[str] | None = head[7]
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
        and len(head) == 9
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
    ):
        return None
    return _LoadedCache(head, path, fd, _HEADER.size + head_length, moddir, stashed)


def _save_cache(path: Path, moddir: Path, files: list[tuple[str, Any, ModuleInfo]],
                stash: list[tuple[str, Any, ModuleInfo]], exports: _ExportsMemo,
                derived: frozenset[str] | None) -> None:
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
        exports, derived, offset,
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


@dataclass(frozen=True)
class StashedModule:
    """A module file no longer in the tree, known from the stash."""

    relpath: str
    size: int
    sha256: str
    load: Callable[[], bytes]  # the original (uncompressed-as-installed) file bytes


@dataclass(frozen=True)
class IndexStats:
    """How an index build went: files read vs taken from the cache."""

    files: int
    parsed: int
    cached: int


def build_index(
    root: Path,
    kernel: str | None = None,
    *,
    cache_dir: Path | None = None,
    use_cache: bool = True,
    rebuild: bool = False,
    symvers: Path | None = None,
    stashed: Sequence[StashedModule] = (),
) -> tuple[ModuleIndex, IndexStats]:
    """Index the module tree of ``kernel`` (default: see default_kernel) under ``root``.

    ``stashed`` are module files an earlier trim took out of the tree: they are indexed
    too (marked ``stashed``), so plans, closures and the derived kernel exports see the
    whole kernel. Malformed module files are collected in ``parse_errors`` rather than
    aborting. Raises KernelNotFoundError.
    """
    # Tens of thousands of objects and no cycles: collecting while they are made only
    # costs time (~10% of a warm build).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _build_index(Path(root), kernel, cache_dir, use_cache, rebuild, symvers,
                            stashed)
    finally:
        if collecting:
            gc.enable()


def _build_index(
    root: Path,
    kernel: str | None,
    cache_dir: Path | None,
    use_cache: bool,
    rebuild: bool,
    symvers: Path | None,
    stashed: Sequence[StashedModule],
) -> tuple[ModuleIndex, IndexStats]:
    kernel = kernel or default_kernel(root)
    moddir = module_dir(root, kernel)
    files = _walk_modules(moddir)
    cache_file = _cache_path(cache_dir or default_cache_dir(root), kernel)
    stash_by_relpath = {item.relpath: item for item in stashed}
    cache = None if (rebuild or not use_cache) else _load_cache(cache_file, moddir,
                                                                stash_by_relpath)
    cached_files: list[_FileRow] = cache.files if cache is not None else []
    names: list[str] = cache.columns[0] if cache is not None else []

    # The cache row of each file, or -1 where the file is new or changed.
    rows: Iterable[int]
    if files == cached_files:
        rows = range(len(files))
    else:
        row_of = {relpath: row for row, (relpath, _) in enumerate(cached_files)}
        rows = [
            row if (row := row_of.get(relpath, -1)) >= 0 and cached_files[row][1] == stat
            else -1
            for relpath, stat in files
        ]
    new, set_cache, set_row = _new_cached_info, _set_cache, _set_row
    fresh: list[tuple[str, Any, ModuleInfo]] = []  # what the cache will hold: (relpath, stat, info)
    # By name, in the order names first appear (relpath order): the first file's entry,
    # then for a name with several files, the best one (see _priority) shadowing the rest.
    modules: dict[str, ModuleEntry] = {}
    shadowing: dict[str, list[tuple[str, int, ModuleInfo]]] = {}
    errors: list[ModuleParseError] = []
    parsed = 0
    for (relpath, stat), row in zip(files, rows, strict=True):
        info: ModuleInfo
        if row >= 0:
            info = new(_CachedInfo)
            set_cache(info, cache)
            set_row(info, row)
            name = names[row]
        else:
            try:
                info = read_module(moddir / relpath)
            except ModuleParseError as exc:
                errors.append(exc)
                continue
            parsed += 1
            name = info.name
        fresh.append((relpath, stat, info))
        entry = modules.get(name)
        if entry is None:
            modules[name] = ModuleEntry(name, relpath, stat[0], info)
        else:
            same_name = shadowing.get(name)
            if same_name is None:
                same_name = shadowing[name] = [(entry.relpath, entry.size, entry.info)]
            same_name.append((relpath, stat[0], info))
    for name, same_name in shadowing.items():
        same_name.sort(key=lambda one: _priority(one[0]))
        best = same_name[0]
        modules[name] = ModuleEntry(name, best[0], best[1], best[2],
                                    tuple(one[0] for one in same_name[1:]))
    # Unchanged: every file a cache hit, and no cached file gone.
    changed = parsed > 0 or len(fresh) != len(cached_files)

    stash_rows: dict[str, tuple[int, Any]] = {}
    tree_rows: dict[str, int] = {}
    if cache is not None and stashed:
        stash_rows = {relpath: (len(cached_files) + i, stat)
                      for i, (relpath, stat) in enumerate(cache.stash)}
        tree_rows = {relpath: row for row, (relpath, _) in enumerate(cached_files)}
    if cache is not None and len(stashed) != len(cache.stash):
        changed = True
    fresh_stash: list[tuple[str, Any, ModuleInfo]] = []
    stashed_by_name: dict[str, tuple[StashedModule, ModuleInfo]] = {}
    for item in stashed:
        stash_stat = (item.size, 0, item.sha256)
        hit = stash_rows.get(item.relpath)
        before = tree_rows.get(item.relpath, -1)
        if hit is not None and hit[1] == stash_stat:
            info = new(_CachedInfo)
            set_cache(info, cache)
            set_row(info, hit[0])
        elif before >= 0 and cached_files[before][1][0] == item.size:
            # Trimmed since the last index: the plan that trimmed it had just validated this
            # row against the file, so its modinfo carries over to the stashed copy.
            info = new(_CachedInfo)
            set_cache(info, cache)
            set_row(info, before)
            changed = True
        else:
            changed = True
            try:
                origin = f"stash:{item.relpath}"
                info = parse_module(
                    decompress(item.load(), compression_of(item.relpath), origin), origin
                )
            except ModuleParseError as exc:
                errors.append(exc)
                continue
            parsed += 1
        fresh_stash.append((item.relpath, stash_stat, info))
        stashed_by_name.setdefault(info.name, (item, info))

    for name, (item, info) in stashed_by_name.items():
        if name not in modules:
            modules[name] = ModuleEntry(name, item.relpath, item.size, info, stashed=True)
    builtins, builtin_aliases, builtin_softdeps = read_builtins(moddir)
    modprobe = read_modprobe_config(root)
    if builtin_softdeps:
        merged = dict(builtin_softdeps)
        merged.update(modprobe.softdeps)
        modprobe = ModprobeConfig(
            softdeps=merged, weakdeps=modprobe.weakdeps, aliases=modprobe.aliases,
            install_commands=modprobe.install_commands, blacklist=modprobe.blacklist,
            files=modprobe.files,
        )
    # Export lists parsed before stay remembered, looked at this time or not.
    memo: _ExportsMemo = dict(cache.exports) if cache is not None else {}
    exports = read_kernel_exports(root, kernel, moddir, symvers, memo)
    # The derived exports a cache holds were derived from exactly its rows.
    derived = cache.derived if cache is not None and not changed else None
    if exports is None:
        if derived is None:
            if cache is not None:
                cache.read_region()  # every module's symbol lists are about to be read
            derived = derived_kernel_exports(e.info for e in modules.values())
            changed = True
        exports = (derived, "derived from the tree")
    if use_cache and (cache is None or changed or memo != cache.exports):
        _save_cache(cache_file, moddir, fresh, fresh_stash, memo, derived)
    index = ModuleIndex(
        root=root,
        kernel=kernel,
        moddir=moddir,
        modules=modules,
        builtins=builtins - modules.keys(),
        builtin_aliases=builtin_aliases,
        modprobe=modprobe,
        kernel_exports=exports[0],
        kernel_exports_source=exports[1],
        parse_errors=tuple(errors),
    )
    cached_count = len(files) + len(stashed) - parsed - len(errors)
    return index, IndexStats(files=len(files), parsed=parsed, cached=cached_count)
