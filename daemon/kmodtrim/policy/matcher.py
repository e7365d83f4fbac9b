"""Deciding which rule applies to a module: the last matching rule wins, found without
trying every rule (LoadedPolicy, the settings with their compiled rule list)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..names import module_name_from_path, normalize
from .rules import Rule, RuleKind, bracket_end

if TYPE_CHECKING:  # the settings are the model's, or a cache.SettingsView of them
    from .model import Policy


def _literal_runs(pattern: str) -> list[str]:
    """The literal runs of an fnmatch pattern between its wildcards (``*``, ``?`` and
    ``[...]`` sets, parsed as fnmatch does: an unterminated ``[`` is literal). One run
    means no wildcard; the first run is the prefix every match starts with, the last
    the suffix every match ends with: ``"a*b?c"`` → ``["a", "b", "c"]``."""
    runs: list[list[str]] = [[]]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c in "*?":
            runs.append([])
        elif c == "[":
            j = bracket_end(pattern, i)
            if j is None:
                runs[-1].append(c)
            else:
                runs.append([])
                i = j + 1
        else:
            runs[-1].append(c)
    return ["".join(run) for run in runs]


# (rule index, pattern) in descending index order
_Bucket = list[tuple[int, str]]


class _KindMatcher:
    """All rules of one kind, arranged so that finding the last rule matching a subject
    costs about the subject's length rather than the number of rules (one regex of 10,000
    alternatives tries every one of them on every subject).

    Literal patterns are a dict. Each glob goes into one bucket, keyed by a literal part
    that every match contains: its literal prefix or suffix, whichever is longer
    (``virtio_`` of ``virtio_*``, ``_wmi`` of ``*_wmi``), else its longest literal run
    (``usb`` of ``*usb*``), else (``*``, ``?*``) the catch-all bucket. A subject looks up
    only the buckets named by its own prefixes, suffixes and substrings of the key lengths
    in use, and tries their patterns from the highest rule index down, skipping those
    below the best match so far: the result is the last matching rule.
    """

    __slots__ = ("infix", "lengths", "literal_only", "literals", "prefix", "regex", "suffix",
                 "wild")

    def __init__(self, indexed: Sequence[tuple[int, str]]) -> None:
        self.literals: dict[str, int] = {}
        self.prefix: dict[str, _Bucket] = {}
        self.suffix: dict[str, _Bucket] = {}
        self.infix: dict[str, _Bucket] = {}
        self.wild: _Bucket = []
        self.regex: dict[str, Callable[[str], re.Match[str] | None]] = {}
        latest: dict[str, int] = {}
        for index, pattern in indexed:
            latest[pattern] = index  # a repeated pattern can only win at its last index
        for pattern, index in sorted(latest.items(), key=lambda item: -item[1]):
            runs = _literal_runs(pattern)
            if len(runs) == 1:
                self.literals[pattern] = index
                continue
            first, last = runs[0], runs[-1]
            if first or last:
                table, key = (self.prefix, first) if len(first) >= len(last) else (
                    self.suffix, last)
                table.setdefault(key, []).append((index, pattern))
            elif longest := max(runs, key=len):
                self.infix.setdefault(longest, []).append((index, pattern))
            else:
                self.wild.append((index, pattern))
        self.lengths = [sorted({len(key) for key in table})
                        for table in (self.prefix, self.suffix, self.infix)]
        # No globs (the default policy's rules): a subject's best match is a dict lookup.
        self.literal_only = not (self.prefix or self.suffix or self.infix or self.wild)

    def best(self, subject: str) -> int:
        """The highest index of a pattern matching all of ``subject``, or -1."""
        found = self.literals.get(subject, -1)
        if self.literal_only:
            return found
        n = len(subject)
        prefix_lengths, suffix_lengths, infix_lengths = self.lengths
        for length in prefix_lengths:
            if length > n:
                break
            bucket = self.prefix.get(subject[:length])
            if bucket is not None:
                found = self._try(bucket, subject, found)
        for length in suffix_lengths:
            if length > n:
                break
            bucket = self.suffix.get(subject[n - length :])
            if bucket is not None:
                found = self._try(bucket, subject, found)
        for length in infix_lengths:
            if length > n:
                break
            for key in {subject[i : i + length] for i in range(n - length + 1)}:
                bucket = self.infix.get(key)
                if bucket is not None:
                    found = self._try(bucket, subject, found)
        if self.wild:
            found = self._try(self.wild, subject, found)
        return found

    def _try(self, bucket: _Bucket, subject: str, found: int) -> int:
        for index, pattern in bucket:
            if index <= found:
                break  # the rest are earlier rules than the best match so far
            match = self.regex.get(pattern)
            if match is None:  # compiled on first use: most buckets are never looked at
                match = self.regex[pattern] = re.compile(fnmatch.translate(pattern)).match
            if match(subject) is not None:
                return index
        return found

    @property
    def empty(self) -> bool:
        return not (self.literals or self.prefix or self.suffix or self.infix or self.wild)


class _Matcher:
    __slots__ = ("alias", "name", "path")

    def __init__(self, rules: Sequence[Rule]) -> None:
        def of(kind: RuleKind) -> _KindMatcher:
            return _KindMatcher([(i, r.pattern) for i, r in enumerate(rules) if r.kind == kind])

        self.name = of("name")
        self.path = of("path")
        self.alias = of("alias")

    def best(self, name: str, relpath: str, aliases: Iterable[str]) -> int:
        best = max(self.name.best(normalize(name)), self.path.best(relpath))
        matcher = self.alias
        if matcher.empty:
            return best
        if matcher.literal_only:  # the same lookups, without a call per alias
            literals = matcher.literals
            for alias in aliases:
                found = literals.get(alias.replace("-", "_"), -1)  # normalize(alias)
                if found > best:
                    best = found
            return best
        for alias in aliases:
            best = max(best, matcher.best(normalize(alias)))
        return best


@dataclass(frozen=True)
class LoadedPolicy:
    """Settings plus the compiled rule list. ``rules`` holds the presets' rules first (in
    ``settings.presets`` order), then the user rules in file order."""

    settings: Policy
    rules: tuple[Rule, ...]
    sources: tuple[str, ...]
    _matcher: _Matcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_matcher", _Matcher(self.rules))

    @property
    def user_rules(self) -> tuple[Rule, ...]:
        """The rules written in policy files (not expanded from presets)."""
        return tuple(r for r in self.rules if not r.from_preset)

    def decide(self, name: str, relpath: str, aliases: Iterable[str] = ()) -> Rule | None:
        """The last rule matching this module, or None. A returned rule with ``exclude``
        set means the policy explicitly does not keep the module."""
        best = self._matcher.best(name, relpath, aliases)
        return self.rules[best] if best >= 0 else None

    def literal_rules_matching_nothing(
        self, known_names: Iterable[str], known_aliases: Iterable[str] = ()
    ) -> list[Rule]:
        """User rules without glob characters that name no known module or builtin: a
        misspelt name must not be skipped silently. Alias rules are checked only when
        ``known_aliases`` is given; a path rule counts as naming nothing when it is not
        the path of a module file named in ``known_names``."""
        literal = [rule for rule in self.user_rules if not rule.is_glob]
        if not literal:
            return []  # nothing to check: the known names need not be gathered
        names = {normalize(n) for n in known_names}
        aliases = {normalize(a) for a in known_aliases}
        unmatched: list[Rule] = []
        for rule in literal:
            if rule.kind == "name":
                missing = rule.pattern not in names
            elif rule.kind == "alias":
                missing = bool(aliases) and rule.pattern not in aliases
            else:
                module = module_name_from_path(rule.pattern)
                missing = module is None or module not in names
            if missing:
                unmatched.append(rule)
        return unmatched
