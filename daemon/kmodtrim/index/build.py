"""Building a ModuleIndex: walk the tree, take unchanged modules from the cache and parse
the rest, add the stashed modules, builtins, modprobe.d and the kernel's exports, and save
the cache when anything changed."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..elf import ModuleInfo, decompress, parse_module
from ..errors import ModuleParseError
from ..inputs import MAX_MODULE_BYTES
from ..modprobe import ModprobeConfig, read_modprobe_config
from ..names import compression_of
from ..paths import default_kernel
from .cache import (
    _cache_path,
    _CachedInfo,
    _FileRow,
    _load_cache,
    _new_cached_info,
    _save_cache,
    _set_cache,
    _set_row,
    default_cache_dir,
)
from .discover import _priority, _walk_modules, module_dir, read_builtins
from .exports import _ExportsMemo, derived_kernel_exports, read_kernel_exports
from .model import (
    DERIVED_EXPORTS,
    DerivedExports,
    ModuleEntry,
    ModuleIndex,
    StashedList,
    StashedModule,
    StashedSource,
)
from .parallel import read_modules


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
    stashed: Sequence[StashedModule] | StashedSource = (),
    save_cache: bool = True,
) -> tuple[ModuleIndex, IndexStats]:
    """Index the module tree of ``kernel`` (default: see default_kernel) under ``root``.

    ``stashed`` are module files an earlier trim took out of the tree: they are indexed
    too (marked ``stashed``), so plans, closures and the derived kernel exports see the
    whole kernel; given as a StashedSource with a key, they are listed from the cache
    when it saw that key. Malformed module files are collected in ``parse_errors`` rather than
    aborting. ``save_cache=False`` reads a cache but does not update it (a restore that
    is about to change the tree again: writing it would only delay the restore).
    Raises KernelNotFoundError.
    """
    # Tens of thousands of objects and no cycles: collecting while they are made only
    # costs time (~10% of a warm build).
    collecting = gc.isenabled()
    gc.disable()
    try:
        source = StashedList(stashed) if isinstance(stashed, Sequence) else stashed
        return _build_index(Path(root), kernel, cache_dir, use_cache, rebuild, symvers,
                            source, save_cache)
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
    stash_source: StashedSource,
    save_cache: bool,
) -> tuple[ModuleIndex, IndexStats]:
    kernel = kernel or default_kernel(root)
    moddir = module_dir(root, kernel)
    files = _walk_modules(moddir)
    cache_file = _cache_path(cache_dir or default_cache_dir(root), kernel)
    by_relpath = _ByRelpath(stash_source)
    cache = None if (rebuild or not use_cache) else _load_cache(cache_file, moddir,
                                                                by_relpath)
    stashed: Sequence[StashedModule]
    key = stash_source.key
    if cache is not None and key is not None and cache.stash_key == key:
        stashed = [StashedModule(relpath, stat[0], stat[2], by_relpath.loader(relpath))
                   for relpath, stat in cache.stash]
    else:
        stashed = stash_source.modules()
    cached_files: list[_FileRow] = cache.files if cache is not None else []
    names: list[str] = cache.columns[0] if cache is not None else []
    # Rows are the tree's files, then the stashed ones: (row, (size, 0, sha256)).
    stash_rows: dict[str, tuple[int, Any]] = {}
    if cache is not None:
        stash_rows = {relpath: (len(cached_files) + i, stat)
                      for i, (relpath, stat) in enumerate(cache.stash)}

    # The cache row of each file, or -1 where the file is new or changed.
    rows: Sequence[int]
    if files == cached_files:
        rows = range(len(files))
    else:
        row_of = {relpath: row for row, (relpath, _) in enumerate(cached_files)}
        rows = []
        for relpath, stat in files:
            row = row_of.get(relpath, -1)
            if row < 0 or cached_files[row][1] != stat:
                row = _put_back_row(moddir, relpath, stat, stash_rows.get(relpath))
            rows.append(row)
    # The new or changed files, read ahead (compressed ones on every CPU) in file order.
    reads = read_modules(moddir, [relpath for (relpath, _), row in zip(files, rows,
                                                                        strict=True)
                                  if row < 0])
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
            read = next(reads)
            if isinstance(read, ModuleParseError):
                errors.append(read)
                continue
            info = read
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
    reads.close()  # every read was taken: this ends the reading threads
    for name, same_name in shadowing.items():
        same_name.sort(key=lambda one: _priority(one[0]))
        best = same_name[0]
        modules[name] = ModuleEntry(name, best[0], best[1], best[2],
                                    tuple(one[0] for one in same_name[1:]))
    # Unchanged: every file a cache hit, and no cached file gone.
    changed = parsed > 0 or len(fresh) != len(cached_files)
    # Rows in use: when they are every row of the cache, once each, and no name has files
    # both in the tree and the stash (now or in the cache), the modules are the cached
    # ones, only moved between tree and stash, and so are the exports derived from them.
    used = [row for row in rows if row >= 0]
    if any(row >= len(cached_files) for row in used):
        changed = True  # a row taken from the stash: the cache lists it as stashed

    tree_rows: dict[str, int] = {}
    if cache is not None and stashed:
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
            used.append(hit[0])
        elif before >= 0 and cached_files[before][1][0] == item.size:
            # Trimmed since the last index: the plan that trimmed it had just validated this
            # row against the file, so its modinfo carries over to the stashed copy.
            info = new(_CachedInfo)
            set_cache(info, cache)
            set_row(info, before)
            used.append(before)
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

    # A name both in the tree and the stash, or stashed twice: one file shadows another.
    shadowed = len(stashed_by_name) != len(fresh_stash) or any(
        name in modules for name in stashed_by_name)
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
    same_modules = cache is not None and (not changed or (
        parsed == 0 and not errors and not shadowed and not _split(cache)
        and len(used) == len(cached_files) + len(cache.stash)
        and len(set(used)) == len(used)))
    derived = cache.derived if cache is not None and same_modules else None
    saving = use_cache and (cache is None or save_cache)
    kernel_exports: AbstractSet[str]
    if exports is not None:
        kernel_exports, source = exports
    else:
        source = DERIVED_EXPORTS
        if derived is None:
            changed = True

            def derive() -> frozenset[str]:
                if cache is not None:
                    cache.read_region()  # every module's symbol lists are about to be read
                return derived_kernel_exports(e.info for e in modules.values())

            # Derived now only for the cache; otherwise when something asks (a restore
            # does not: closure_of).
            if saving:
                kernel_exports = derived = derive()
            else:
                kernel_exports = DerivedExports(derive)
        else:
            kernel_exports = derived
    rekeyed = cache is not None and cache.stash_key != key  # same rows, a new key
    if saving and (cache is None or changed or rekeyed or memo != cache.exports):
        _save_cache(cache_file, moddir, fresh, fresh_stash, memo, derived, key)
    index = ModuleIndex(
        root=root,
        kernel=kernel,
        moddir=moddir,
        modules=modules,
        builtins=builtins - modules.keys(),
        builtin_aliases=builtin_aliases,
        modprobe=modprobe,
        kernel_exports=kernel_exports,
        kernel_exports_source=source,
        parse_errors=tuple(errors),
        stashed_relpaths=frozenset(item.relpath for item in stashed),
    )
    cached_count = len(files) + len(stashed) - parsed - len(errors)
    return index, IndexStats(files=len(files), parsed=parsed, cached=cached_count)


class _ByRelpath(Mapping[str, StashedModule]):
    """A source's stashed modules by relpath, listed on first use (a warm index with an
    unchanged key never uses it)."""

    def __init__(self, source: StashedSource) -> None:
        self._source = source
        self._modules: dict[str, StashedModule] | None = None

    def _all(self) -> dict[str, StashedModule]:
        if self._modules is None:
            self._modules = {item.relpath: item for item in self._source.modules()}
        return self._modules

    def __getitem__(self, relpath: str) -> StashedModule:
        return self._all()[relpath]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def loader(self, relpath: str) -> Callable[[], bytes]:
        """The bytes of stashed ``relpath`` (a file the source no longer lists: a
        ModuleParseError, as for any unreadable module)."""
        def load() -> bytes:
            item = self.get(relpath)
            if item is None:
                raise ModuleParseError(f"stash:{relpath}", "no longer stashed")
            return item.load()
        return load


def _put_back_row(moddir: Path, relpath: str, stat: Any,
                  stashed: tuple[int, Any] | None) -> int:
    """The cache's stash row for a tree file put back since the last index (its bytes are
    the stashed copy's: same size and sha256), else -1 (the file is read)."""
    if stashed is None or stashed[1][0] != stat[0]:
        return -1
    import hashlib  # only for a file put back since the last index

    try:
        with open(moddir / relpath, "rb") as f:
            digest = hashlib.sha256(f.read(MAX_MODULE_BYTES + 1)).hexdigest()
    except OSError:
        return -1
    return int(stashed[0]) if digest == stashed[1][2] else -1


def _split(cache: Any) -> bool:
    """Whether the cache has a name with files in the tree and the stash, or stashed
    twice (which of its files counts then depends on where each one is)."""
    names: list[str] = cache.columns[0]
    in_tree = len(cache.files)
    stashed = names[in_tree:in_tree + len(cache.stash)]
    return len(set(stashed)) != len(stashed) or not set(stashed).isdisjoint(names[:in_tree])
