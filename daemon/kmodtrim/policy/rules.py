"""Policy rules: the syntax of one rule string (name glob, ``alias:GLOB``, path glob, a
leading ``-`` to exclude), parsed into a Rule that knows where it was written and whether
it matches a module."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..errors import PolicyError
from ..inputs import quote_input
from ..names import normalize

_GLOB_CHARS = re.compile(r"[*?\[]")
_ALIAS_PREFIX = "alias:"
_HINT = (
    "Fix the file; every key and its allowed values are documented in the comments of "
    "the default /etc/kmodtrim/policy.toml shipped with kmodtrim."
)

RuleKind = Literal["name", "path", "alias"]


# -- rule syntax -------------------------------------------------------------------------


def bracket_end(pattern: str, j: int) -> int | None:
    """Where the ``[...]`` set whose contents start at ``j`` closes, as fnmatch reads it
    ("[!" and a leading "]" belong to the set), or None when it never closes (then the
    "[" is a literal character)."""
    n = len(pattern)
    if j < n and pattern[j] == "!":
        j += 1
    if j < n and pattern[j] == "]":
        j += 1
    while j < n and pattern[j] != "]":
        j += 1
    return j if j < n else None


def _normalize_glob(pattern: str) -> str:
    """``-`` → ``_`` like module names, except inside ``[...]`` where ``-`` is a range."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "[":
            # Same bracket rules as fnmatch: "[!" and a leading "]" belong to the set; an
            # unterminated "[" is a literal character.
            j = bracket_end(pattern, i + 1)
            if j is not None:
                out.append(pattern[i : j + 1])
                i = j + 1
                continue
            out.append("[")
        else:
            out.append("_" if c == "-" else c)
        i += 1
    return "".join(out)


def _split_rule(text: str) -> tuple[bool, RuleKind, str]:
    """(exclude, kind, normalised pattern) of a rule string; ValueError says what is wrong."""
    if not isinstance(text, str):  # pragma: no cover - pydantic checks the type first
        raise ValueError("a rule must be a string")
    exclude = text.startswith("-")
    body = text[1:] if exclude else text
    kind: RuleKind
    if body.startswith(_ALIAS_PREFIX):
        # Checked before "/": alias strings may contain "/" (e.g. "devname:net/tun").
        kind, pattern = "alias", _normalize_glob(body[len(_ALIAS_PREFIX) :])
    elif "/" in body:
        # Paths are matched as files are named (dm-mod.ko), so they are not normalised.
        kind, pattern = "path", body
    else:
        kind, pattern = "name", _normalize_glob(body)
    if not pattern:
        raise ValueError(
            "empty rule; write a module name or glob ('virtio_*'), 'alias:GLOB', or a "
            "path glob ('kernel/drivers/net/*'), with a leading '-' to exclude"
        )
    if body.startswith("-"):
        raise ValueError("a rule may start with only one '-' (the exclude marker)")
    if any(c.isspace() for c in pattern):
        raise ValueError("a rule must not contain whitespace; write one rule per string")
    if kind == "path" and pattern.startswith("/"):
        raise ValueError(
            "a path rule is relative to the kernel's module directory, e.g. "
            "'kernel/drivers/net/*', not an absolute path"
        )
    return exclude, kind, pattern


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def _is_glob(pattern: str) -> bool:
    return bool(_GLOB_CHARS.search(pattern))


@dataclass(frozen=True, slots=True)
class Rule:
    """One keep (or, with ``exclude``, don't-keep) rule, from a preset or a policy file.

    ``pattern`` is the glob as matched: without the leading ``-`` or ``alias:``, and
    normalised for name and alias rules. ``source`` is the in-root file path
    (``/etc/kmodtrim/policy.toml``) or ``preset:NAME``; ``line`` the 1-based line of the
    rule string in that file (None for presets, or when it could not be located).
    ``text`` is the rule as written.
    """

    pattern: str
    exclude: bool
    kind: RuleKind
    source: str
    line: int | None = None
    text: str = ""

    @property
    def from_preset(self) -> bool:
        """True for rules expanded from a preset (not written by the administrator)."""
        return self.source.startswith("preset:")

    @property
    def is_glob(self) -> bool:
        """True if the pattern has glob characters (``*``, ``?``, ``[``)."""
        return _is_glob(self.pattern)

    def matches(self, name: str, relpath: str, aliases: Iterable[str] = ()) -> bool:
        """Does this rule match the module ``name`` at ``relpath`` (relative to the
        module directory) with these ``aliases``? Names and aliases are normalised."""
        regex = _compiled(self.pattern)
        if self.kind == "name":
            return regex.match(normalize(name)) is not None
        if self.kind == "path":
            return regex.match(relpath) is not None
        return any(regex.match(normalize(a)) is not None for a in aliases)

    def written(self) -> str:
        """The rule as written in its source."""
        if self.text:
            return self.text
        prefix = _ALIAS_PREFIX if self.kind == "alias" else ""
        return ("-" if self.exclude else "") + prefix + self.pattern

    def describe(self) -> str:
        """Where the rule comes from, for ``explain`` and warnings, e.g.
        ``policy rule 'virtio*' (/etc/kmodtrim/policy.toml:12)``."""
        if self.from_preset:
            return f"preset {self.source.removeprefix('preset:')} ({self.written()!r})"
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"policy rule {self.written()!r} ({where})"


def parse_rule(text: str, *, source: str, line: int | None = None) -> Rule:
    """Parse one rule string. Raises ``PolicyError`` if it is not a valid rule."""
    try:
        exclude, kind, pattern = _split_rule(text)
    except ValueError as e:
        where = source if line is None else f"{source}:{line}"
        raise PolicyError(f"{where}: rule {quote_input(text)}: {e}", hint=_HINT) from None
    return Rule(pattern=pattern, exclude=exclude, kind=kind, source=source, line=line, text=text)



def expand_presets(presets: Iterable[str]) -> list[Rule]:
    """The rules of the named presets, in order, each sourced ``preset:NAME``."""
    from ..presets import PRESETS

    rules: list[Rule] = []
    for name in presets:
        source = f"preset:{name}"
        rules.extend(parse_rule(text, source=source) for text in PRESETS[name])
    return rules
