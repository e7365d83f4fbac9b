"""The index's model: one kernel's modules, builtins, aliases, soft/weak deps and symbol
providers (ModuleIndex), a module in the tree or in the stash, and the alias matcher behind
``resolve`` and ``match_alias``. Pure: building an index from plain ModuleInfo values needs
no files."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..elf import ModuleInfo
from ..errors import ModuleParseError
from ..modprobe import ModprobeConfig
from ..names import normalize

_GLOB_CHARS = re.compile(r"[*?\[]")
DERIVED_EXPORTS = "derived from the tree"  # kernel_exports_source when no list exists


class DerivedExports(AbstractSet[str]):
    """The kernel's exports derived from the tree (exports.derived_kernel_exports: every
    symbol a module imports that no module exports), worked out on first use: that reads
    every module's symbol lists, which a restore never needs (see closure_of)."""

    __slots__ = ("_make", "_symbols")

    def __init__(self, make: Callable[[], frozenset[str]]) -> None:
        self._make: Callable[[], frozenset[str]] | None = make
        self._symbols: frozenset[str] | None = None

    def _get(self) -> frozenset[str]:
        if self._symbols is None:
            assert self._make is not None
            self._symbols, self._make = self._make(), None
        return self._symbols

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._get()

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


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
    kernel_exports: AbstractSet[str]
    kernel_exports_source: str  # "symvers:PATH", "System.map:PATH" or DERIVED_EXPORTS
    parse_errors: tuple[ModuleParseError, ...] = ()
    # relpaths of every stashed module file given, shadowed ones too (a file both here and
    # in the tree was put back by something else: a package upgrade, say)
    stashed_relpaths: frozenset[str] = frozenset()
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
            if which == 1:  # tens of thousands: scanned per first character when asked
                matcher = _AliasMatcher([(e.name, e.info.aliases)
                                         for e in self.modules.values()])
            else:
                matcher = _AliasMatcher.of_pairs(
                    self.modprobe.aliases if which == 0 else self.builtin_aliases)
            matchers[which] = matcher
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
    prefix of the string. The buckets of one first character are built the first time a
    string starting with it is looked up (a plan looks up a handful of names, not 26,000
    patterns' worth).
    Those starting with a wildcard (an empty prefix) are tried by every lookup, after the
    exact matches and before the longer prefixes, as one bucketing of all would.
    """

    def __init__(self, entries: Sequence[tuple[str, Sequence[str]]]) -> None:
        """``entries``: (module, its patterns), scanned for one first character when a
        string starting with it is first looked up (no pair is made for the others)."""
        self._entries = entries
        self._shards: dict[str, _Buckets] = {}
        self._wild = _Buckets([(a, name) for name, aliases in entries for a in aliases
                               if a[:1] in _WILD_FIRST]).by_prefix.get("", [])

    @classmethod
    def of_pairs(cls, pairs: Iterable[tuple[str, str]]) -> _AliasMatcher:
        """A matcher of (pattern, module) pairs."""
        return cls([(module, (pattern,)) for pattern, module in pairs])

    def _shard(self, first: str) -> _Buckets:
        shard = self._shards.get(first)
        if shard is None:
            spelt = ("_", "-") if first == "_" else (first,)  # as alias_normalize spells it
            shard = self._shards[first] = _Buckets(
                [(a, name) for name, aliases in self._entries for a in aliases
                 if a[:1] in spelt and a[:1] not in _WILD_FIRST])
        return shard

    def match(self, string: str) -> list[str]:
        string = alias_normalize(string)
        shard = self._shard(string[:1])
        found = dict.fromkeys(shard.exact.get(string, ()))
        for pattern, module in self._wild:
            if module not in found and fnmatch.fnmatchcase(string, pattern):
                found[module] = None
        for length in shard.prefix_lengths:
            if length > len(string):
                break
            for pattern, module in shard.by_prefix.get(string[:length], ()):
                if module not in found and fnmatch.fnmatchcase(string, pattern):
                    found[module] = None
        return list(found)


_WILD_FIRST = frozenset("*?[")


class _Buckets:
    """Alias patterns by kind: literal ones by value, the others by their literal prefix
    (with the prefix lengths in use, ascending)."""

    __slots__ = ("by_prefix", "exact", "prefix_lengths")

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


@dataclass(frozen=True)
class StashedModule:
    """A module file no longer in the tree, known from the stash."""

    relpath: str
    size: int
    sha256: str
    load: Callable[[], bytes]  # the original (uncompressed-as-installed) file bytes


class StashedSource(Protocol):
    """Where an index's stashed modules come from. ``key`` determines them exactly (None
    when nothing does): the index cache keeps the stashed rows it last saw with their
    key, so an unchanged key lists them without reading the generation's manifest."""

    @property
    def key(self) -> tuple[int | str, ...] | None: ...

    def modules(self) -> Sequence[StashedModule]:
        """Every stashed module file (reads the generation's manifest)."""
        ...


class StashedList:
    """A StashedSource of a list already made (no key)."""

    key = None

    def __init__(self, modules: Sequence[StashedModule]) -> None:
        self._modules = modules

    def modules(self) -> Sequence[StashedModule]:
        return self._modules
