"""ModuleIndex: everything kmodtrim needs to know about one kernel's module tree.

Built from the modules' own ELF metadata (never from depmod's generated ``modules.*``
files, which may be missing or stale), plus ``modules.builtin*``, modprobe.d, and the
kernel's own exported symbols. A per-file cache keyed by (size, mtime_ns, inode) makes a
rebuild re-read only the files that changed.
"""

from __future__ import annotations

import contextlib
import fnmatch
import lzma
import marshal
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from . import __version__
from .elf import ModuleInfo, decompress, parse_module, parse_softdep, read_module
from .errors import KernelNotFoundError, ModuleParseError
from .modprobe import ModprobeConfig, read_modprobe_config
from .names import MODULE_SUFFIXES, compression_of, module_name_from_path, normalize
from .store import replace_file

MODULE_DIR_BASES = ("lib/modules", "usr/lib/modules")
_CACHE_FORMAT = 3
_GLOB_CHARS = re.compile(r"[*?\[]")
# Directories in a module tree that are never module trees themselves.
_SKIP_DIRS = frozenset({"build", "source"})
# relpath (or "exports:PATH", "stash:RELPATH") → (size, mtime_ns, inode or sha, payload)
_CacheEntries = dict[str, tuple[int, int, int, tuple[object, ...]]]


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


def installed_kernels(root: Path) -> list[str]:
    """Kernel versions with a module tree under ``root``, oldest first (version order)."""
    found: set[str] = set()
    for base in MODULE_DIR_BASES:
        with contextlib.suppress(OSError):
            for entry in os.scandir(root / base):
                if entry.is_dir() and not entry.name.startswith("."):
                    found.add(entry.name)
    return sorted(found, key=_version_key)


def _version_key(kver: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~_]", kver)]


def module_dir(root: Path, kernel: str) -> Path:
    """ROOT/lib/modules/KVER (or ROOT/usr/lib/modules/KVER). Raises KernelNotFoundError."""
    if not kernel or "/" in kernel or kernel in (".", ".."):
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


def default_kernel(root: Path) -> str:
    """The running kernel for the live root if installed, else the newest installed one.

    Raises KernelNotFoundError when no kernel is installed under ``root``.
    """
    kernels = installed_kernels(root)
    if root.resolve() == Path("/"):
        running = os.uname().release
        if running in kernels:
            return running
    if not kernels:
        raise KernelNotFoundError(f"no kernel module trees under {root}/lib/modules")
    return kernels[-1]


# ---------------------------------------------------------------------------------------
# Reading the tree


class _FileStat(NamedTuple):
    relpath: str
    size: int
    mtime_ns: int
    inode: int


def _walk_modules(moddir: Path) -> list[_FileStat]:
    found: list[_FileStat] = []
    stack = [("", str(moddir))]
    suffixes = MODULE_SUFFIXES
    while stack:
        prefix, directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError:
            continue
        with entries:
            for entry in entries:
                name = entry.name
                if name.endswith(suffixes):
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((prefix + name + "/", entry.path))
                        continue
                    try:
                        st = entry.stat()
                    except OSError:
                        continue
                    found.append(_FileStat(prefix + name, st.st_size, st.st_mtime_ns, st.st_ino))
                elif entry.is_dir(follow_symlinks=False) and not (
                    prefix == "" and name in _SKIP_DIRS
                ):
                    stack.append((prefix + name + "/", entry.path))
    found.sort()  # directory order is arbitrary; priorities and providers must not be
    return found


def _priority(relpath: str) -> tuple[int, str]:
    # depmod's default search order: "updates" first, then everything else.
    return (0 if relpath.startswith("updates/") else 1, relpath)


def read_builtins(moddir: Path) -> tuple[frozenset[str], tuple[tuple[str, str], ...],
                                          dict[str, tuple[tuple[str, ...], tuple[str, ...]]]]:
    """Builtin module names, their aliases and softdeps from modules.builtin(.modinfo)."""
    names: set[str] = set()
    with contextlib.suppress(OSError):
        for line in (moddir / "modules.builtin").read_text(errors="replace").splitlines():
            name = module_name_from_path(line.strip())
            if name:
                names.add(name)
    aliases: list[tuple[str, str]] = []
    softdeps: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    with contextlib.suppress(OSError):
        raw = (moddir / "modules.builtin.modinfo").read_bytes()
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


def read_kernel_exports(
    root: Path, kernel: str, moddir: Path, symvers: Path | None = None,
    memo: _CacheEntries | None = None,
) -> tuple[frozenset[str], str] | None:
    """The kernel's (vmlinux) exported symbols from the best source the root has.

    Order: an explicit Module.symvers, ``symvers.xz``/``symvers.gz``/``symvers`` in the
    module dir (Fedora), a real ``/boot/System.map-KVER`` (Debian's is a one-line stub),
    ``/usr/src/linux-headers-KVER/Module.symvers`` (Debian headers). None if none exists.
    ``memo`` (the index cache) remembers parsed files by (size, mtime_ns, inode).
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
        hit = memo.get(key) if memo is not None else None
        if hit is not None and hit[:3] == (st.st_size, st.st_mtime_ns, st.st_ino):
            syms = [str(sym) for sym in hit[3]]
        else:
            text = _read_maybe_compressed(path)
            syms = parser(text) if text is not None else []
            if memo is not None:
                memo[key] = (st.st_size, st.st_mtime_ns, st.st_ino, tuple(syms))
        if syms:
            return frozenset(syms), source
    return None


def _parse_system_map(text: str) -> list[str]:
    # depmod -F takes the "__ksymtab_NAME" symbols of a System.map as the kernel's exports.
    syms = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2].startswith("__ksymtab_"):
            syms.append(fields[2][10:])
    return syms


def _read_maybe_compressed(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        if path.suffix == ".xz":
            raw = lzma.decompress(raw)
        elif path.suffix == ".gz":
            import gzip

            raw = gzip.decompress(raw)
    except (lzma.LZMAError, OSError, EOFError):
        return None
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


def default_cache_dir(root: Path) -> Path:
    """Where the index cache lives for ``root``: ROOT/var/cache/kmodtrim."""
    return root / "var" / "cache" / "kmodtrim"


def _cache_path(cache_dir: Path, kernel: str) -> Path:
    return cache_dir / f"index-{kernel}.marshal"


def _info_to_tuple(info: ModuleInfo) -> tuple[object, ...]:
    return (
        info.name, info.depends, info.softdep_pre, info.softdep_post, info.weakdeps,
        info.aliases, info.firmware, info.vermagic, info.intree, info.license,
        info.exports, info.undefined, info.weak_undefined,
    )


def _load_cache(path: Path, moddir: Path) -> dict[str, tuple[int, int, int, tuple[object, ...]]]:
    try:
        raw = path.read_bytes()
        data = marshal.loads(raw)
    except (OSError, EOFError, ValueError, TypeError):
        return {}
    if (
        not isinstance(data, tuple)
        or len(data) != 4
        or data[0] != _CACHE_FORMAT
        or data[1] != __version__
        or data[2] != str(moddir)
        or not isinstance(data[3], dict)
    ):
        return {}
    entries: dict[str, tuple[int, int, int, tuple[object, ...]]] = data[3]
    return entries


def _save_cache(path: Path, moddir: Path, entries: _CacheEntries) -> None:
    payload = marshal.dumps((_CACHE_FORMAT, __version__, str(moddir), entries))
    with contextlib.suppress(OSError):  # a read-only root or full disk only costs speed
        replace_file(path, payload, durable=False)  # a lost cache is rebuilt, not wrong


def _tuple_to_info(t: tuple[object, ...]) -> ModuleInfo:
    return ModuleInfo(*t)  # type: ignore[arg-type]


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
    root = Path(root)
    kernel = kernel or default_kernel(root)
    moddir = module_dir(root, kernel)
    files = _walk_modules(moddir)
    cache_file = _cache_path(cache_dir or default_cache_dir(root), kernel)
    cached = {} if (rebuild or not use_cache) else _load_cache(cache_file, moddir)
    fresh: dict[str, tuple[int, int, int, tuple[object, ...]]] = {}
    by_name: dict[str, list[tuple[_FileStat, ModuleInfo]]] = {}
    errors: list[ModuleParseError] = []
    parsed = 0
    for f in files:
        hit = cached.get(f.relpath)
        if hit is not None and hit[0] == f.size and hit[1] == f.mtime_ns and hit[2] == f.inode:
            info = _tuple_to_info(hit[3])
            fresh[f.relpath] = hit
        else:
            try:
                info = read_module(moddir / f.relpath)
            except ModuleParseError as exc:
                errors.append(exc)
                continue
            parsed += 1
            fresh[f.relpath] = (f.size, f.mtime_ns, f.inode, _info_to_tuple(info))
        by_name.setdefault(info.name, []).append((f, info))
    stashed_by_name: dict[str, tuple[StashedModule, ModuleInfo]] = {}
    for item in stashed:
        key = "stash:" + item.relpath
        hit = cached.get(key)
        before = cached.get(item.relpath)
        if hit is not None and hit[0] == item.size and hit[2] == item.sha256:  # type: ignore[comparison-overlap]
            info = _tuple_to_info(hit[3])
            fresh[key] = hit
        elif before is not None and before[0] == item.size:
            # Trimmed since the last index: the plan that trimmed it had just validated this
            # entry against the file, so its modinfo carries over to the stashed copy.
            info = _tuple_to_info(before[3])
            fresh[key] = (item.size, 0, item.sha256, before[3])  # type: ignore[assignment]
        else:
            try:
                origin = f"stash:{item.relpath}"
                info = parse_module(
                    decompress(item.load(), compression_of(item.relpath), origin), origin
                )
            except ModuleParseError as exc:
                errors.append(exc)
                continue
            parsed += 1
            fresh[key] = (item.size, 0, item.sha256, _info_to_tuple(info))  # type: ignore[assignment]
        stashed_by_name.setdefault(info.name, (item, info))

    modules: dict[str, ModuleEntry] = {}
    for name, found in by_name.items():
        found.sort(key=lambda pair: _priority(pair[0].relpath))
        best, info = found[0]
        modules[name] = ModuleEntry(
            name=name,
            relpath=best.relpath,
            size=best.size,
            info=info,
            shadowed=tuple(f.relpath for f, _ in found[1:]),
        )
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
    for key, value in cached.items():
        if key.startswith("exports:"):
            fresh.setdefault(key, value)
    exports = read_kernel_exports(root, kernel, moddir, symvers, fresh)
    if use_cache and fresh != cached:  # values are shared objects: cheap when unchanged
        _save_cache(cache_file, moddir, fresh)
    if exports is None:
        infos = [e.info for e in modules.values()]
        exports = (derived_kernel_exports(infos), "derived from the tree")
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
