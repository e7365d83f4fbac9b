"""The on-demand modprobe.d file's text (kmodtrim/ondemand.py): pure."""

from __future__ import annotations

from kmodtrim.ondemand import (
    COMMAND,
    KernelModules,
    conf_text,
    excluded_of,
    installs_of,
    requested_by_name,
)

K = "6.1.0-test"


def lines(text: str | None) -> list[str]:
    assert text is not None
    return [line for line in text.splitlines() if not line.startswith("#")]


def test_nothing_trimmed_means_no_file() -> None:
    assert conf_text([]) is None
    assert conf_text([KernelModules(K, {}, {"core": ("fs-core",)})]) is None


def test_install_and_by_name_alias_lines_sorted() -> None:
    text = conf_text([KernelModules(
        K, {"xfs": ("fs-xfs",), "nf_tables": ("nfnetlink-subsys-10", "net-pf-16-proto-12")},
        {})])
    assert lines(text) == [
        f"install nf_tables {COMMAND} nf_tables",
        "alias net-pf-16-proto-12 nf_tables",
        "alias nfnetlink-subsys-10 nf_tables",
        f"install xfs {COMMAND} xfs",
        "alias fs-xfs xfs",
    ]


def test_device_modaliases_get_no_line() -> None:
    """pci:/usb:/devname: patterns would hide kept drivers matching the same device."""
    text = conf_text([KernelModules(
        K, {"e1000e": ("pci:v00008086d000010D3sv*sd*bc*sc*i*",), "fuse": ("devname:fuse",
                                                                       "char-major-10-229")},
        {})])
    assert lines(text) == [f"install e1000e {COMMAND} e1000e",
                           f"install fuse {COMMAND} fuse", "alias char-major-10-229 fuse"]
    assert not requested_by_name("pci:v*") and requested_by_name("fs-xfs")
    assert not requested_by_name("") and not requested_by_name("a b")


def test_an_alias_a_kept_module_has_under_another_name_gets_no_line() -> None:
    text = conf_text([KernelModules(
        K, {"old_drv": ("char-major-4-*", "fs-shared", "crypto-old")},
        {"new_drv": ("char-major-4-64", "fs-shared"), "same": ()})])
    assert lines(text) == [f"install old_drv {COMMAND} old_drv", "alias crypto-old old_drv"]


def test_an_alias_the_same_module_keeps_in_another_kernel_is_harmless() -> None:
    text = conf_text([KernelModules("a", {"xfs": ("fs-xfs",)}, {}),
                      KernelModules("b", {}, {"xfs": ("fs-xfs",)})])
    assert lines(text) == [f"install xfs {COMMAND} xfs", "alias fs-xfs xfs"]


def test_names_across_kernels_once_and_dashes_normalised() -> None:
    text = conf_text([KernelModules("a", {"dm-crypt": ("dm-crypt",)}, {}),
                      KernelModules("b", {"dm_crypt": ("crypto-dm",)}, {})])
    assert lines(text) == [f"install dm_crypt {COMMAND} dm_crypt", "alias crypto-dm dm_crypt"]


def test_excluded_modules_get_no_lines_and_are_recorded() -> None:
    text = conf_text([KernelModules(K, {"xfs": ("fs-xfs",), "udf": ("fs-udf",)}, {})],
                     excluded={"udf"})
    assert lines(text) == [f"install xfs {COMMAND} xfs", "alias fs-xfs xfs"]
    assert text is not None and excluded_of(text) == {"udf"}
    assert installs_of(text) == {"xfs": f"{COMMAND} xfs"}
    assert conf_text([KernelModules(K, {"udf": ()}, {})], excluded={"udf"}) is None


def test_excluded_of_a_foreign_file_is_none() -> None:
    assert excluded_of("install xfs /bin/true\n") is None
    text = conf_text([KernelModules(K, {"xfs": ()}, {})])
    assert text is not None and excluded_of(text) == set()


def test_the_same_inputs_give_the_same_bytes() -> None:
    ks = [KernelModules(K, {"b": ("fs-b",), "a": ("fs-a", "crypto-a")}, {"c": ("fs-c",)})]
    assert conf_text(ks) == conf_text(list(reversed(ks)))
