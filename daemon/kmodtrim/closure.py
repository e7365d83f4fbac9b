"""Dependency closure with reasons, and symbol verification.

``closure_of`` follows every way the kernel or modprobe can pull a module in — ``depends``
from modinfo, the providers of undefined symbols, softdep ``pre:``/``post:`` (modinfo,
``modules.builtin.modinfo`` and modprobe.d), weakdeps — resolving names through builtins
and aliases. Each kept module remembers the first reason it was reached by, which makes
``explain`` a walk back along those reasons to a root cause.

``verify_symbols`` then proves the kept set is loadable: every undefined (non-weak) symbol
of every kept module is exported by a kept module or by the kernel, exactly the check
``depmod -e`` performs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from .index import DERIVED_EXPORTS, ModuleIndex

# Root causes (seeds) and the edges a closure follows.
ReasonKind = Literal[
    "observed", "hardware", "boot-critical", "platform", "policy", "loaded", "restored",
    "depends", "symbol", "softdep-pre", "softdep-post", "weakdep",
]

@dataclass(frozen=True)
class Reason:
    """Why a module is kept: a root cause with a detail, or an edge from another module."""

    kind: ReasonKind
    detail: str = ""  # e.g. "/proc/modules", "pci:v00001AF4d…", "preset cloud-boot ('virtio*')"
    via: str | None = None  # the module that needs this one (edges only)

    def describe(self) -> str:
        """One line for humans, e.g. ``dependency of tcm_loop`` or ``observed (/proc/modules)``."""
        if self.via is not None:
            edge = {
                "depends": "dependency of",
                "symbol": "provides symbols to",
                "softdep-pre": "soft dependency (pre) of",
                "softdep-post": "soft dependency (post) of",
                "weakdep": "weak dependency of",
            }.get(self.kind, self.kind)
            extra = f" ({self.detail})" if self.detail else ""
            return f"{edge} {self.via}{extra}"
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


@dataclass(frozen=True)
class Closure:
    """The modules to keep, each with every reason found (first is the one it was reached by)."""

    kept: Mapping[str, tuple[Reason, ...]]  # loadable modules
    builtin_needed: frozenset[str]  # builtins reached (nothing to keep on disk, but explained)
    unresolved_names: tuple[tuple[str, Reason], ...]  # requested names nothing provides

    def why(self, name: str) -> list[list[tuple[str, Reason]]]:
        """Chains from ``name`` back to a root cause, one per reason it is kept for.

        Each chain is [(module, reason), (via-module, its first reason), …, (seed, root reason)].
        """
        chains = []
        for reason in self.kept.get(name, ()):
            chain = [(name, reason)]
            seen = {name}
            current = reason
            while current.via is not None and current.via not in seen:
                seen.add(current.via)
                parent_reasons = self.kept.get(current.via)
                if not parent_reasons:
                    break
                current = parent_reasons[0]
                chain.append((chain[-1][1].via or "", current))
            chains.append(chain)
        return chains


def closure_of(seeds: Mapping[str, Iterable[Reason]], index: ModuleIndex) -> Closure:
    """The transitive closure of ``seeds`` (names or aliases → root reasons) in ``index``.

    Names that resolve to nothing are reported in ``unresolved_names``, not dropped silently.
    """
    kept: dict[str, list[Reason]] = {}
    builtin_needed: set[str] = set()
    unresolved: list[tuple[str, Reason]] = []
    queue: deque[str] = deque()
    providers = index.symbol_providers
    kernel_exports = index.kernel_exports
    if index.kernel_exports_source == DERIVED_EXPORTS:
        # Derived exports are the symbols modules import that no module exports: one of
        # a module's imports is among them exactly when no module provides it, which
        # the provider lookup below finds anyway. Not asking spares a restore deriving
        # them (reading every module's symbol lists).
        kernel_exports = frozenset()

    def reach(name: str, reason: Reason) -> None:
        targets = index.resolve(name)
        if not targets:
            unresolved.append((name, reason))
            return
        for target in targets:
            if target in index.builtins:
                builtin_needed.add(target)
                # A builtin's softdeps still apply (from modules.builtin.modinfo/modprobe.d).
                if target not in kept:
                    kept.setdefault(target, []).append(reason)
                    queue.append(target)
                continue
            reasons = kept.get(target)
            if reasons is None:
                kept[target] = [reason]
                queue.append(target)
            elif reason not in reasons:
                reasons.append(reason)

    for name, reasons in seeds.items():
        for reason in reasons:
            reach(name, reason)

    while queue:
        name = queue.popleft()
        entry = index.modules.get(name)
        if entry is not None:
            for dep in entry.info.depends:
                reach(dep, Reason("depends", via=name))
            for sym in entry.info.undefined:
                if sym in kernel_exports:
                    continue
                provider = providers.get(sym)
                if provider is not None and provider != name and provider not in kept:
                    reach(provider, Reason("symbol", detail=sym, via=name))
        pre, post = index.softdeps(name)
        for dep in pre:
            reach(dep, Reason("softdep-pre", via=name))
        for dep in post:
            reach(dep, Reason("softdep-post", via=name))
        for dep in index.weakdeps(name):
            reach(dep, Reason("weakdep", via=name))

    loadable = {n: tuple(r) for n, r in kept.items() if n in index.modules}
    return Closure(
        kept=loadable,
        builtin_needed=frozenset(builtin_needed),
        unresolved_names=tuple(unresolved),
    )


@dataclass(frozen=True, order=True)
class UnresolvedSymbol:
    """A kept module needs a symbol nothing kept provides (what ``depmod -e`` warns about)."""

    module: str
    relpath: str
    symbol: str
    provider: str | None  # the (not kept) module that would provide it, if any


def verify_symbols(kept: Iterable[str], index: ModuleIndex) -> list[UnresolvedSymbol]:
    """Every undefined symbol of every kept module must come from a kept module or the
    kernel. Returns the offenders (empty means the kept set is loadable), sorted."""
    kept_set = set(kept)
    available: set[str] = set(index.kernel_exports)
    for name in kept_set:
        entry = index.modules.get(name)
        if entry is not None:
            available.update(entry.info.exports)
    providers = index.symbol_providers
    problems = []
    for name in kept_set:
        entry = index.modules.get(name)
        if entry is None:
            continue
        for sym in entry.info.undefined:
            if sym not in available:
                problems.append(UnresolvedSymbol(name, entry.relpath, sym, providers.get(sym)))
    return sorted(problems)
