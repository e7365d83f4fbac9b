"""The D-Bus ``a{sv}`` options of the Manager methods: which keys each method takes,
their types, and clear InvalidArgs errors naming the method and the key."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
from dbus_next.signature import Variant

from kmodtrim.cli.parser import build_parser
from kmodtrim.dbus.options import ALLOWED_OPTIONS, OPTION_TYPES, parse_options
from kmodtrim.errors import InputError

SAMPLES: dict[str, Any] = {
    "kernel": Variant("s", "6.1.0-9-amd64"), "observed": Variant("as", ["/tmp/o.txt"]),
    "policy": Variant("s", "/etc/p.toml"), "force": Variant("b", True),
    "dry_run": Variant("b", True), "initramfs": Variant("s", "dracut"),
    "backend": Variant("s", "dpkg"), "latest": Variant("b", True),
    "cloud": Variant("as", ["kvm", "aws"]), "on_demand": Variant("b", True),
}


def test_restore_carries_on_demand_into_the_request() -> None:
    assert parse_options("Restore", {"on_demand": SAMPLES["on_demand"]})[0].on_demand
    assert not parse_options("Restore", {})[0].on_demand
    assert parse_options("Restore", {"on_demand": SAMPLES["on_demand"]})[0].to_json()[
        "on_demand"] is True


def refused(member: str, options: dict[str, Any]) -> str:
    with pytest.raises(InputError) as caught:
        parse_options(member, options)
    assert caught.value.dbus_name == "org.freedesktop.DBus.Error.InvalidArgs"
    return str(caught.value)


DEFAULTS = {"kernel": None, "observed": (), "policy": None, "force": False,
            "dry_run": False, "initramfs": "auto", "backend": None, "cloud": ()}


def fields(request: object) -> dict[str, object]:
    return {key: getattr(request, key) for key in DEFAULTS}


@pytest.mark.parametrize("member", ALLOWED_OPTIONS)
def test_no_options_make_the_default_request(member: str) -> None:
    request, latest = parse_options(member, {})
    assert (fields(request), latest) == (DEFAULTS, False)


def test_trim_options_make_the_request() -> None:
    options = {key: SAMPLES[key] for key in ALLOWED_OPTIONS["Trim"]}
    request, latest = parse_options("Trim", options)
    assert fields(request) == {
        "kernel": "6.1.0-9-amd64", "observed": (Path("/tmp/o.txt"),),
        "policy": Path("/etc/p.toml"), "force": True, "dry_run": True,
        "initramfs": "dracut", "backend": "dpkg", "cloud": ("kvm", "aws")}
    assert latest is False


def test_rollback_latest_is_returned_beside_the_request() -> None:
    request, latest = parse_options("Rollback", {"latest": Variant("b", True)})
    assert (fields(request), latest) == (DEFAULTS, True)


@pytest.mark.parametrize(("member", "key"),
                         [(m, k) for m, keys in ALLOWED_OPTIONS.items() for k in keys])
def test_every_method_accepts_each_key_it_allows(member: str, key: str) -> None:
    parse_options(member, {key: SAMPLES[key]})


def test_every_allowed_key_has_a_declared_type() -> None:
    assert {k for keys in ALLOWED_OPTIONS.values() for k in keys} <= set(OPTION_TYPES)


def test_unknown_key_is_refused_naming_the_keys_allowed() -> None:
    assert refused("Plan", {"frobnicate": Variant("b", True)}) == \
        "Plan: unknown option 'frobnicate' (allowed: kernel, observed, policy, cloud)"


@pytest.mark.parametrize(("member", "key"), [
    ("Plan", "force"), ("Explain", "dry_run"), ("Trim", "latest"), ("Rollback", "kernel"),
    ("Restore", "observed"), ("KernelEvent", "kernel"),
])
def test_key_of_another_method_is_refused(member: str, key: str) -> None:
    assert refused(member, {key: SAMPLES[key]}).startswith(f"{member}: unknown option {key!r}")


@pytest.mark.parametrize(("key", "variant", "says"), [
    ("kernel", Variant("as", ["6.1"]), "must be a string (s), not of type as"),
    ("observed", Variant("s", "/tmp/o.txt"), "must be an array of strings (as), not of type s"),
    ("force", Variant("s", "yes"), "must be a boolean (b), not of type s"),
    ("dry_run", Variant("i", 1), "must be a boolean (b), not of type i"),
])
def test_option_of_the_wrong_type_is_refused(key: str, variant: Any, says: str) -> None:
    assert refused("Trim", {key: variant}) == f"Trim: option {key!r} {says}"


@pytest.mark.parametrize("kernel", ["../etc", "", "a b", ".."])
def test_kernel_that_is_not_a_version_is_refused(kernel: str) -> None:
    assert refused("Plan", {"kernel": Variant("s", kernel)}) == \
        f"Plan: option 'kernel': {kernel!r} is not a kernel version"


def test_initramfs_and_backend_must_be_one_of_their_choices() -> None:
    assert refused("Trim", {"initramfs": Variant("s", "mkinitcpio")}) == (
        "Trim: option 'initramfs': 'mkinitcpio' is not one of "
        "auto, skip, dracut, update-initramfs, kernel-install")
    assert refused("Restore", {"backend": Variant("s", "apt")}) == \
        "Restore: option 'backend': 'apt' is not one of auto, stash, dpkg, rpm"


@pytest.mark.parametrize(("key", "variant"), [
    ("observed", Variant("as", ["relative.txt"])), ("observed", Variant("as", ["/ok", ""])),
    ("policy", Variant("s", "policy.toml")), ("policy", Variant("s", "")),
])
def test_file_option_must_be_an_absolute_path(key: str, variant: Any) -> None:
    assert "is not an absolute path" in refused("Plan", {key: variant})


@pytest.mark.parametrize("key", ["initramfs", "backend"])
def test_cli_and_dbus_accept_the_same_choices(key: str) -> None:
    (verbs,) = (a for a in build_parser()._actions
                if isinstance(a, argparse._SubParsersAction))
    apply: argparse.ArgumentParser = verbs.choices["apply"]
    (action,) = (a for a in apply._actions if a.dest == key)
    cli_choices = [str(choice) for choice in action.choices or ()]
    assert cli_choices
    for choice in cli_choices:
        request, _ = parse_options("Trim", {key: Variant("s", choice)})
        assert getattr(request, key) == choice
    for near_miss in ("", "AUTO", "none", "apt"):
        assert near_miss not in cli_choices
        refused("Trim", {key: Variant("s", near_miss)})


def test_each_cloud_must_be_a_platform_the_cli_also_takes() -> None:
    assert refused("Plan", {"cloud": Variant("as", ["kvm", "ec2"])}) == (
        "Plan: option 'cloud': 'ec2' is not one of auto, all, kvm, aws, gcp, azure, "
        "hyperv, oci, alibaba, vmware, xen")
    (verbs,) = (a for a in build_parser()._actions
                if isinstance(a, argparse._SubParsersAction))
    (action,) = (a for a in verbs.choices["plan"]._actions if a.dest == "cloud")
    cli_choices = [str(choice) for choice in action.choices or ()]
    request, _ = parse_options("Plan", {"cloud": Variant("as", cli_choices)})
    assert request.cloud == tuple(cli_choices)
    assert refused("Rollback", {"cloud": Variant("as", ["kvm"])}).startswith(
        "Rollback: unknown option 'cloud'")
