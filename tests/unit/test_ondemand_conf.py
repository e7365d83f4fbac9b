"""The on-demand modprobe.d file's text (kmodtrim/ondemand.py): pure."""

from __future__ import annotations

from fnmatch import fnmatchcase

from hypothesis import given, settings
from hypothesis import strategies as st

from kmodtrim.ondemand import (
    COMMAND,
    OPTIONS_VARIABLE,
    KernelModules,
    _Kept,
    conf_text,
    excluded_of,
    extra_options,
    installs_of,
    is_module_option,
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
        f"install nf_tables {COMMAND} nf_tables $CMDLINE_OPTS",
        "alias net-pf-16-proto-12 nf_tables",
        "alias nfnetlink-subsys-10 nf_tables",
        f"install xfs {COMMAND} xfs $CMDLINE_OPTS",
        "alias fs-xfs xfs",
    ]


def test_device_modaliases_get_no_line() -> None:
    """pci:/usb:/devname: patterns would hide kept drivers matching the same device."""
    text = conf_text([KernelModules(
        K, {"e1000e": ("pci:v00008086d000010D3sv*sd*bc*sc*i*",), "fuse": ("devname:fuse",
                                                                       "char-major-10-229")},
        {})])
    assert lines(text) == [f"install e1000e {COMMAND} e1000e $CMDLINE_OPTS",
                           f"install fuse {COMMAND} fuse $CMDLINE_OPTS",
                           "alias char-major-10-229 fuse"]
    assert not requested_by_name("pci:v*") and requested_by_name("fs-xfs")
    assert not requested_by_name("") and not requested_by_name("a b")


def test_an_alias_a_kept_module_has_under_another_name_gets_no_line() -> None:
    text = conf_text([KernelModules(
        K, {"old_drv": ("char-major-4-*", "fs-shared", "crypto-old")},
        {"new_drv": ("char-major-4-64", "fs-shared"), "same": ()})])
    assert lines(text) == [f"install old_drv {COMMAND} old_drv $CMDLINE_OPTS",
                           "alias crypto-old old_drv"]


def test_an_alias_the_same_module_keeps_in_another_kernel_is_harmless() -> None:
    text = conf_text([KernelModules("a", {"xfs": ("fs-xfs",)}, {}),
                      KernelModules("b", {}, {"xfs": ("fs-xfs",)})])
    assert lines(text) == [f"install xfs {COMMAND} xfs $CMDLINE_OPTS", "alias fs-xfs xfs"]


def test_names_across_kernels_once_and_dashes_normalised() -> None:
    text = conf_text([KernelModules("a", {"dm-crypt": ("dm-crypt",)}, {}),
                      KernelModules("b", {"dm_crypt": ("crypto-dm",)}, {})])
    assert lines(text) == [f"install dm_crypt {COMMAND} dm_crypt $CMDLINE_OPTS",
                           "alias crypto-dm dm_crypt"]


def test_excluded_modules_get_no_lines_and_are_recorded() -> None:
    text = conf_text([KernelModules(K, {"xfs": ("fs-xfs",), "udf": ("fs-udf",)}, {})],
                     excluded={"udf"})
    assert lines(text) == [f"install xfs {COMMAND} xfs $CMDLINE_OPTS", "alias fs-xfs xfs"]
    assert text is not None and excluded_of(text) == {"udf"}
    assert installs_of(text) == {"xfs": f"{COMMAND} xfs $CMDLINE_OPTS"}
    assert conf_text([KernelModules(K, {"udf": ()}, {})], excluded={"udf"}) is None


def test_excluded_of_a_foreign_file_is_none() -> None:
    assert excluded_of("install xfs /bin/true\n") is None
    text = conf_text([KernelModules(K, {"xfs": ()}, {})])
    assert text is not None and excluded_of(text) == set()


def test_the_same_inputs_give_the_same_bytes() -> None:
    ks = [KernelModules(K, {"b": ("fs-b",), "a": ("fs-a", "crypto-a")}, {"c": ("fs-c",)})]
    assert conf_text(ks) == conf_text(list(reversed(ks)))


def test_install_lines_pass_the_module_options_on() -> None:
    text = conf_text([KernelModules(K, {"xfs": ()}, {})])
    assert text is not None and f"install xfs {COMMAND} xfs {OPTIONS_VARIABLE}\n" in text
    assert OPTIONS_VARIABLE == "$CMDLINE_OPTS"  # modprobe.d(5)


def test_extra_options_leave_what_modprobe_applies_by_itself() -> None:
    # $CMDLINE_OPTS: the module's options lines, an alias's, the kernel command line's,
    # then modprobe's own; ``modprobe --ignore-install`` reads the first and third again.
    given = ["debug=1", "name=a b", "via_alias=1", "level=7", "level=2"]
    assert extra_options(given, ["debug=1", "name=a b", "level=7"]) == [
        "via_alias=1", "level=2"]
    assert extra_options(given, []) == given
    assert extra_options(["level=7"], ["level=7"]) == []
    # An option given twice stays once beyond the one configured.
    assert extra_options(["a=1", "a=1"], ["a=1"]) == ["a=1"]


def test_module_options_are_words_kmod_would_pass() -> None:
    for word in ("debug", "level=2", "name=a b", "nfs.x=1", "dyndbg=+p", "x="):
        assert is_module_option(word), word
    for word in ("-x", "", "two words", "a;b=1", "$CMDLINE_OPTS", "x=\n"):
        assert not is_module_option(word), word


def _hides_by_brute_force(kept: list[tuple[str, str]], alias: str, name: str) -> bool:
    """The rule, tried against every kept pattern (what _Kept answers faster)."""
    wild = not set("*?[").isdisjoint(alias)
    for pattern, module in kept:
        if module == name:
            continue
        if not set("*?[").isdisjoint(pattern) or wild:
            if fnmatchcase(alias, pattern) or (wild and fnmatchcase(pattern, alias)):
                return True
        elif pattern == alias:
            return True
    return False


_PATTERN = st.text(alphabet="ab-1*?[]", min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(kept=st.lists(st.tuples(_PATTERN, st.sampled_from(["m1", "m2", "mine"])),
                     max_size=12),
       alias=_PATTERN)
def test_kept_aliases_hide_what_trying_every_pattern_would(
        kept: list[tuple[str, str]], alias: str) -> None:
    assert _Kept(kept).hides_another(alias, "mine") == \
        _hides_by_brute_force(kept, alias, "mine")
