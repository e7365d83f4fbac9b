"""What ``kmodtrim explain`` says about restore on demand (kmodtrim/ondemand.py): pure."""

from __future__ import annotations

from dataclasses import replace

from kmodtrim.ondemand import (
    KernelModules,
    OnDemandFacts,
    conf_text,
    explain_on_demand,
    lines_for,
    shown_requests,
)

XFS = OnDemandFacts(name="xfs", out=True, removed_by_plan=True, excluded=False,
                    installed=True, alias_lines=("fs-xfs",),
                    aliases=("fs-xfs", "pci:v00001234d*"), record=None)


def test_a_trimmed_module_with_its_lines_comes_back_on_demand() -> None:
    assert explain_on_demand(XFS) == {
        "state": "on-demand", "requests": ["fs-xfs"],
        "text": "restored on demand when requested (modprobe fs-xfs)"}


def test_requests_prefer_filesystem_network_and_char_aliases_and_show_two() -> None:
    aliases = ("crypto-foo", "pci:v00008086d*", "usb:v1234p*", "char-major-10-237",
               "net-pf-10", "fs-foo")
    assert shown_requests(aliases, "foo") == ["fs-foo", "net-pf-10"]
    assert shown_requests(("crypto-foo", "char-major-10-237"), "foo") == [
        "char-major-10-237", "crypto-foo"]
    # Device modaliases are never shown: only the name brings such a module back.
    assert shown_requests(("pci:v00008086d*", "usb:v1234p*"), "e1000e") == ["e1000e"]
    facts = replace(XFS, alias_lines=(), aliases=("pci:v0000ABCDd*",))
    assert explain_on_demand(facts)["text"] == (  # type: ignore[index]
        "restored on demand when requested (modprobe xfs)")


def test_an_excluded_module_is_not_restored_on_demand() -> None:
    excluded = replace(XFS, installed=False, alias_lines=(), excluded=True)
    doc = explain_on_demand(excluded)
    assert doc is not None and doc["state"] == "excluded"
    assert str(doc["text"]).startswith("NOT restored on demand: the policy excludes it")
    before = replace(excluded, out=False)
    assert explain_on_demand(before) == {
        "state": "excluded", "requests": [],
        "text": "after the next apply NOT restored on demand: the policy excludes it"}


def test_a_trimmed_module_the_file_has_no_line_for_says_so() -> None:
    doc = explain_on_demand(replace(XFS, installed=False, alias_lines=()))
    assert doc is not None and doc["state"] == "no-line"
    assert "has no line for it" in str(doc["text"])


def test_a_module_modprobe_asked_for_is_kept_for_that() -> None:
    facts = replace(XFS, out=False, removed_by_plan=False, installed=False, alias_lines=(),
                    record="requested by modprobe on 2026-12-02 17:49")
    assert explain_on_demand(facts) == {
        "state": "requested", "requests": [],
        "text": "kept: requested by modprobe on 2026-12-02 17:49"}
    # Restored by hand: nothing to say about on demand.
    assert explain_on_demand(replace(facts, record="restored by hand on 2026-12-02")) is None


def test_a_module_the_next_apply_removes_would_come_back_on_demand() -> None:
    facts = replace(XFS, out=False, installed=False, alias_lines=())
    assert explain_on_demand(facts) == {
        "state": "after-apply", "requests": ["fs-xfs"],
        "text": "after the next apply restored on demand when requested (modprobe fs-xfs)"}
    assert explain_on_demand(replace(facts, removed_by_plan=False)) is None


def test_lines_for_reads_the_file_the_conf_writes() -> None:
    text = conf_text([KernelModules("6.1.0-test", {"xfs": ("fs-xfs", "pci:v1*"),
                                                   "ext4": ("fs-ext4", "fs-ext3")}, {})])
    assert text is not None
    assert lines_for(text, "xfs") == (True, ("fs-xfs",))
    assert lines_for(text, "ext4") == (True, ("fs-ext3", "fs-ext4"))
    assert lines_for(text, "btrfs") == (False, ())
