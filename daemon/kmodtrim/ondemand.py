"""Restore on demand through modprobe itself: the text of kmodtrim's own modprobe.d file.

After each change the engine (engine/ondemand.py) writes ``CONF_PATH`` for the modules
trimmed from any installed kernel, so that ``modprobe NAME`` or ``modprobe ALIAS`` runs
kmodtrim's restore (``kmodtrim restore --on-demand NAME $CMDLINE_OPTS``), which puts the
module and its closure back, reruns depmod and loads it with ``modprobe --ignore-install
NAME`` and the options modprobe was given.

How kmod (30) reads it:

- modprobe.d has no per-kernel directory: one file serves every kernel. A name trimmed
  from one kernel and still installed in another gets its ``install`` line for both; the
  restore then finds the file in the running kernel's tree and only loads it.
- ``install NAME CMD`` is honoured for a name with no module file in the tree (kmod's
  lookup ends with the names modprobe.d has commands for), and for one that has a file.
- modprobe.d ``alias PATTERN NAME`` lines are looked up *before* modules.alias, and the
  first source that matches ends the lookup: an alias line here that matched a string a
  kept module's alias also matches would hide the kept module. So only the aliases the
  kernel and programs request by name get lines (``fs-xfs``, ``net-pf-10``,
  ``crypto-sha256``, ``char-major-10-237``, ``nft-chain-2-nat`` …: no ``bus:`` prefix), and
  none that a module still in any kernel's tree also has under another name. Device
  modaliases (``pci:…``, ``usb:…``) stay with kmodtrimd's self-healing on uevents.
- Patterns are fnmatch patterns, as in modules.alias; they are written as the module
  declares them.
- kmod replaces ``$CMDLINE_OPTS`` in an install command with the options it would have
  loaded the module with (modprobe.d(5)); kmod 30 orders them: the module's ``options``
  lines, the alias's ``options`` (``modprobe ALIAS``), the kernel command line's
  ``NAME.param=value``, then those given to modprobe. The final ``modprobe
  --ignore-install NAME`` applies the module's own lines and the kernel command line
  again by itself, so it is given only the rest (``extra_options``): each option reaches
  the module once, as without kmodtrim's line.
- Modules the policy excludes get no lines: they are not restored by this path. The
  names are kept in the file's ``# excluded:`` line, so a change that does not read the
  policy (a restore, a rollback) writes the same exclusions again.

Everything here is pure: the engine gathers the inputs.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from itertools import chain

from .names import normalize
from .paths import ON_DEMAND_CONF

CONF_PATH = ON_DEMAND_CONF
COMMAND = "/usr/bin/kmodtrim restore --on-demand"
HEADER = "# kmodtrim: trimmed modules come back when modprobe asks for them. Generated"
EXCLUDED_PREFIX = "# excluded:"
OPTIONS_VARIABLE = "$CMDLINE_OPTS"  # kmod puts the module's options there
REQUESTED_BY = "requested by modprobe"  # how an on-demand restore is recorded (… on DATE)
_WILDCARDS = frozenset("*?[")


@dataclass(frozen=True)
class KernelModules:
    """One kernel's modules as the conf needs them: the trimmed ones (name → aliases) and
    the aliases of the modules still in its tree (name → aliases)."""

    kernel: str
    trimmed: Mapping[str, tuple[str, ...]]
    kept: Mapping[str, tuple[str, ...]]


_BY_NAME = re.compile(r"[^:\s]+")  # no bus prefix, no white space


def requested_by_name(alias: str) -> bool:
    """Whether an alias is one the kernel or a program asks for by name (``fs-xfs``,
    ``net-pf-10``), not a device's modalias (``pci:v…``), which udev and self-healing
    handle."""
    return _BY_NAME.fullmatch(alias) is not None


def _wild(pattern: str) -> bool:
    return not _WILDCARDS.isdisjoint(pattern)


def _prefix(pattern: str) -> str:
    """What every string the pattern matches starts with: up to its first wildcard."""
    return pattern[:next((i for i, c in enumerate(pattern) if c in _WILDCARDS),
                         len(pattern))]


def _starting(keys: list[str], prefix: str) -> list[str]:
    """The sorted ``keys`` that start with ``prefix``."""
    first = bisect_left(keys, prefix)
    last = first
    while last < len(keys) and keys[last].startswith(prefix):
        last += 1
    return keys[first:last]


class _Kept:
    """The by-name aliases of modules still in a tree: is an alias line for a trimmed
    module safe, i.e. can no string it matches also match another module's alias?
    (Exact for literal patterns; with a wildcard on either side, whether either matches
    the other as a string.)

    Either matching the other needs one's prefix (up to the first wildcard) to be a prefix
    of the other's, so only the patterns whose prefix fits are tried: a few per alias,
    where a Debian generic kernel has thousands."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.literal: dict[str, set[str]] = {}
        self.wild: dict[str, list[tuple[str, str]]] = {}  # prefix → (pattern, module)
        for pattern, module in pairs:
            if _wild(pattern):
                self.wild.setdefault(_prefix(pattern), []).append((pattern, module))
            else:
                self.literal.setdefault(pattern, set()).add(module)
        self.literals = sorted(self.literal)
        self.prefixes = sorted(self.wild)

    def _wild_under(self, text: str) -> Iterator[tuple[str, str]]:
        """The wildcard patterns whose prefix is a prefix of ``text``."""
        for i in range(len(text) + 1):
            yield from self.wild.get(text[:i], ())

    def hides_another(self, alias: str, name: str) -> bool:
        if _wild(alias):
            prefix = _prefix(alias)
            if any(fnmatchcase(literal, alias) and self.literal[literal] - {name}
                   for literal in _starting(self.literals, prefix)):
                return True
            longer = (pair for p in _starting(self.prefixes, prefix) for pair in self.wild[p])
            return any(module != name and (fnmatchcase(pattern, alias)
                                           or fnmatchcase(alias, pattern))
                       for pattern, module in chain(self._wild_under(prefix), longer))
        if self.literal.get(alias, set()) - {name}:
            return True
        return any(module != name and fnmatchcase(alias, pattern)
                   for pattern, module in self._wild_under(alias))


def conf_text(kernels: Iterable[KernelModules], excluded: Iterable[str] = ()) -> str | None:
    """The file's text, or None when no kernel has a trimmed module that gets a line (then
    the file must not exist)."""
    excluded_names = {normalize(n) for n in excluded}
    trimmed: dict[str, set[str]] = {}
    kept_by_alias: list[tuple[str, str]] = []  # (pattern, module still in a tree)
    kept_names: set[str] = set()
    for k in kernels:
        for name, aliases in k.trimmed.items():
            name = normalize(name)
            if name in excluded_names:
                continue
            trimmed.setdefault(name, set()).update(filter(requested_by_name, aliases))
        for name, aliases in k.kept.items():
            kept_names.add(normalize(name))
            kept_by_alias.extend((a, normalize(name)) for a in filter(requested_by_name, aliases))
    if not trimmed:
        return None
    kept = _Kept(kept_by_alias)
    lines = [HEADER + " after each change; do not edit (kmodtrim forget/restore).",
             EXCLUDED_PREFIX + "".join(f" {n}" for n in sorted(excluded_names))]
    for name in sorted(trimmed):
        lines.append(f"install {name} {COMMAND} {name} {OPTIONS_VARIABLE}")
        for alias in sorted(trimmed[name]):
            if normalize(alias) in trimmed or normalize(alias) in kept_names:
                continue  # a module's own name: kmod finds it without an alias
            if kept.hides_another(alias, name):
                continue  # would hide a module still installed
            lines.append(f"alias {alias} {name}")
    return "\n".join(lines) + "\n"


def excluded_of(text: str) -> set[str] | None:
    """The exclusions a file this module wrote names (None: not such a file)."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith(HEADER):
        return None
    for line in lines[1:3]:
        if line.startswith(EXCLUDED_PREFIX):
            return set(line[len(EXCLUDED_PREFIX):].split())
    return set()


_OPTION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(=[^\0\n]*)?")


def is_module_option(word: str) -> bool:
    """Whether ``word`` is one module option as kmod passes it: ``param``, ``param=value``
    (a value may hold spaces), never starting with ``-``."""
    return _OPTION.fullmatch(word) is not None


def extra_options(given: Sequence[str], configured: Sequence[str]) -> list[str]:
    """The options of ``given`` (what $CMDLINE_OPTS gave) beyond ``configured`` (what
    ``modprobe --ignore-install NAME`` applies by itself: the module's ``options`` lines,
    then the kernel command line's). kmod builds $CMDLINE_OPTS as the module's
    ``options`` lines, an alias's, the kernel command line's, then modprobe's own, so
    ``configured`` is a subsequence of ``given``: each of its options is taken out once,
    in order, and the rest kept in order."""
    out: list[str] = []
    j = 0
    for option in given:
        if j < len(configured) and option == configured[j]:
            j += 1
        else:
            out.append(option)
    return out


def installs_of(text: str) -> dict[str, str]:
    """``install`` lines of a file this module wrote: name → command."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split(None, 2)
        if len(words) == 3 and words[0] == "install":
            out[words[1]] = words[2]
    return out


# ---------------------------------------------------------------------------------------
# What ``kmodtrim explain`` says about it

# The requests shown for a module, best first: what the kernel and programs ask for.
_SHOWN_FIRST = ("fs-", "net-", "char-major-", "block-major-", "rtnl-", "nf", "crypto-")


def lines_for(text: str, name: str) -> tuple[bool, tuple[str, ...]]:
    """Whether a file this module wrote has an ``install`` line for ``name``, and the
    patterns of its ``alias`` lines naming it."""
    installed, aliases = False, []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "install" and words[1] == name:
            installed = True
        elif len(words) == 3 and words[0] == "alias" and words[2] == name:
            aliases.append(words[1])
    return installed, tuple(aliases)


def shown_requests(aliases: Iterable[str], name: str, limit: int = 2) -> list[str]:
    """One or two requests that bring ``name`` back, by-name aliases first (``fs-xfs``
    before ``crypto-…`` and the like), the module's own name when it has none. Device
    modaliases are never shown: no line here serves them."""
    def rank(alias: str) -> tuple[int, str]:
        first = next((i for i, p in enumerate(_SHOWN_FIRST) if alias.startswith(p)),
                     len(_SHOWN_FIRST))
        return first, alias

    by_name = sorted({a for a in aliases if requested_by_name(a)}, key=rank)
    return by_name[:limit] or [name]


@dataclass(frozen=True)
class OnDemandFacts:
    """What explain knows of one module, gathered by the caller (plain data)."""

    name: str
    out: bool  # out of the tree now (trimmed)
    removed_by_plan: bool  # the plan removes it (the next apply, if it is in the tree)
    excluded: bool  # a policy rule excludes it
    installed: bool  # kmodtrim's modprobe.d file has its install line
    alias_lines: tuple[str, ...]  # that file's alias lines naming it
    aliases: tuple[str, ...]  # its aliases in the index
    record: str | None  # why it is recorded as restored ("requested by modprobe on T")


def explain_on_demand(f: OnDemandFacts) -> dict[str, object] | None:
    """Whether modprobe brings the module back, as explain's ``on_demand`` value:
    ``state`` (``on-demand``: modprobe restores it; ``excluded``: the policy excludes it,
    so it is not; ``no-line``: trimmed, but the file has no line for it; ``after-apply``:
    the next apply removes it, then modprobe restores it; ``requested``: modprobe asked
    for it and it is kept for that), ``requests`` (what modprobe may be asked) and
    ``text``. None when none of that applies (a module in the tree that stays)."""
    state: str | None = None
    requests: list[str] = []
    if f.out and f.installed:
        state, requests = "on-demand", shown_requests(f.alias_lines, f.name)
        text = f"restored on demand when requested (modprobe {' or '.join(requests)})"
    elif f.out and f.excluded:
        state = "excluded"
        text = "NOT restored on demand: the policy excludes it (modprobe fails for it)"
    elif f.out:
        state = "no-line"
        text = ("NOT restored on demand: kmodtrim's modprobe.d file has no line for it "
                "(it is written after each change)")
    elif f.record is not None and f.record.startswith(REQUESTED_BY):
        state, text = "requested", f"kept: {f.record}"
    elif f.removed_by_plan and f.excluded:
        state = "excluded"
        text = "after the next apply NOT restored on demand: the policy excludes it"
    elif f.removed_by_plan:
        state, requests = "after-apply", shown_requests(f.aliases, f.name)
        text = ("after the next apply restored on demand when requested (modprobe "
                f"{' or '.join(requests)})")
    if state is None:
        return None
    return {"state": state, "requests": requests, "text": text}
