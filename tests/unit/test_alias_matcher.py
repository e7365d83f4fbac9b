"""The index's alias matcher (index/model.py ``_AliasMatcher``) buckets its patterns by
first character lazily; whatever the patterns and strings, it answers exactly what one
bucketing of every pattern answers — the same modules in the same order — and that is
C fnmatch over kmod-normalised aliases."""

from __future__ import annotations

import fnmatch
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from kmodtrim.index.model import _AliasMatcher, alias_normalize

_GLOB = re.compile(r"[*?\[]")


def reference(pairs: list[tuple[str, str]], string: str) -> list[str]:
    """One bucketing of every pattern: exact ones first, then by literal prefix length."""
    exact: dict[str, list[str]] = {}
    by_prefix: dict[str, list[tuple[str, str]]] = {}
    for pattern, module in pairs:
        pattern = alias_normalize(pattern)
        glob = _GLOB.search(pattern)
        if glob is None:
            exact.setdefault(pattern, []).append(module)
        else:
            by_prefix.setdefault(pattern[: glob.start()], []).append((pattern, module))
    string = alias_normalize(string)
    found = dict.fromkeys(exact.get(string, ()))
    for length in sorted({len(p) for p in by_prefix}):
        if length > len(string):
            break
        for pattern, module in by_prefix.get(string[:length], ()):
            if module not in found and fnmatch.fnmatchcase(string, pattern):
                found[module] = None
    return list(found)


ALPHABET = "ab-_:*?[]!0"
patterns = st.text(ALPHABET, max_size=8)
modules = st.sampled_from(["m1", "m2", "m3", "m4", "m5"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(patterns, modules), max_size=25),
       st.lists(st.text(ALPHABET, max_size=8), min_size=1, max_size=6))
def test_lazy_buckets_answer_as_one_bucketing(pairs: list[tuple[str, str]],
                                              strings: list[str]) -> None:
    matcher = _AliasMatcher.of_pairs(pairs)
    for string in strings:  # several lookups: buckets built by one serve the next
        assert matcher.match(string) == reference(pairs, string)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(modules, st.lists(patterns, max_size=4)), max_size=12),
       st.lists(st.text(ALPHABET, max_size=8), min_size=1, max_size=6))
def test_patterns_given_per_module_answer_as_pairs(
        entries: list[tuple[str, list[str]]], strings: list[str]) -> None:
    """The index gives its modules' aliases per module (scanned for one first character
    when asked): the same answers, in the same order, as the same patterns in pairs."""
    pairs = [(a, name) for name, aliases in entries for a in aliases]
    matcher = _AliasMatcher([(name, tuple(aliases)) for name, aliases in entries])
    for string in strings:
        assert matcher.match(string) == reference(pairs, string)


def test_exact_then_wildcard_first_then_longer_prefixes() -> None:
    pairs = [("pci:v1d2*", "by_long_prefix"), ("*", "any"), ("pci:v1d2", "exact"),
             ("p*", "by_short_prefix"), ("fs-xfs", "xfs"), ("[pq]ci:*", "bracket")]
    matcher = _AliasMatcher.of_pairs(pairs)
    assert matcher.match("pci:v1d2") == ["exact", "any", "bracket", "by_short_prefix",
                                         "by_long_prefix"]
    assert matcher.match("fs-xfs") == matcher.match("fs_xfs") == ["xfs", "any"]
    assert matcher.match("") == ["any"]
    assert _AliasMatcher.of_pairs([("", "empty")]).match("") == ["empty"]
