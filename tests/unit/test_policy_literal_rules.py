"""The policy matcher's path for rules without globs (the shipped presets' alias rules are
all literal): the last matching rule it finds is the one fnmatch over every rule finds,
and the misspelt-rule check gives the same answer whether or not it has names to read."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from kmodtrim.names import normalize

from .fakepolicy import policy_of

NAMES = st.sampled_from(["virtio_net", "virtio-blk", "e1000", "xfs", "loop", "fuse"])
ALIASES = st.sampled_from(["fs-xfs", "fs_xfs", "crypto-crc32c", "net-pf-10", "devname:fuse",
                           "pci:v00001AF4d00001000sv*", "virtio:d00000001v*"])
RULE = st.one_of(NAMES, ALIASES.map(lambda a: "alias:" + a),
                 st.sampled_from(["-xfs", "-alias:fs-xfs", "virtio*", "alias:fs-*"]))


def last_match(rules: list[str], name: str, relpath: str, aliases: list[str]) -> int:
    """The index of the last rule matching the module, by fnmatch over every rule."""
    best = -1
    for i, text in enumerate(rules):
        pattern = text.lstrip("-")
        if pattern.startswith("alias:"):
            glob = normalize(pattern[6:])
            hit = any(fnmatch.fnmatchcase(normalize(a), glob) for a in aliases)
        else:
            hit = fnmatch.fnmatchcase(normalize(name), normalize(pattern))
        if hit:
            best = i
    return best


@settings(max_examples=200, deadline=None)
@given(st.lists(RULE, max_size=8), NAMES, st.lists(ALIASES, max_size=4))
def test_the_last_matching_rule_is_found(rules: list[str], name: str,
                                         aliases: list[str]) -> None:
    policy = policy_of(*rules)
    relpath = f"kernel/drivers/{name}.ko"
    rule = policy.decide(name, relpath, aliases)
    expected = last_match(rules, name, relpath, aliases)
    found = next((i for i, r in enumerate(policy.rules) if r is rule), -1)
    assert found == expected


def test_no_literal_user_rule_means_nothing_to_report_and_nothing_read() -> None:
    def never_read() -> Iterator[str]:
        raise AssertionError("the known names were read")
        yield ""

    policy = policy_of("virtio*", "alias:fs-*", presets=["cloud-boot"])
    assert policy.literal_rules_matching_nothing(never_read(), never_read()) == []
    misspelt = policy_of("virtio*", "no_such_module")
    assert [r.text for r in misspelt.literal_rules_matching_nothing(["virtio_net"])] == \
        ["no_such_module"]
