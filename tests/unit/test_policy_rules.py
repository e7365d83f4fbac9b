"""Policy rules: what each kind matches, "last matching rule wins", presets before user
rules, rule syntax errors, and rules that name nothing — on in-memory policies."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmodtrim.errors import PolicyError
from kmodtrim.policy import LoadedPolicy, load_policy, parse_rule

from .fakepolicy import SOURCE, policy_from_toml, policy_of

E1000 = "kernel/drivers/net/ethernet/intel/e1000/e1000.ko"


def decision(policy: LoadedPolicy, name: str, relpath: str = "",
             aliases: tuple[str, ...] = ()) -> str | None:
    """``keep``, ``exclude`` or None (no rule matches), and by which rule as written."""
    rule = policy.decide(name, relpath or f"kernel/drivers/misc/{name}.ko", aliases)
    if rule is None:
        return None
    return f"{'exclude' if rule.exclude else 'keep'} {rule.written()}"


# -- what a rule matches -----------------------------------------------------------------


def test_name_rule_matches_the_module_name_not_its_path_or_aliases() -> None:
    policy = policy_of("e1000")
    assert decision(policy, "e1000", E1000) == "keep e1000"
    assert decision(policy, "e1000e", "kernel/drivers/e1000/e1000e.ko", ("e1000",)) is None


def test_name_rule_matches_the_whole_name() -> None:
    assert decision(policy_of("virtio"), "virtio_net") is None


def test_dash_and_underscore_are_the_same_in_names_and_name_globs() -> None:
    policy = policy_of("snd-hda-*")
    assert decision(policy, "snd_hda_intel") == "keep snd-hda-*"
    assert decision(policy, "snd-hda-codec") == "keep snd-hda-*"


def test_bracket_range_in_a_glob_keeps_its_dash() -> None:
    policy = policy_of("snd-hda-codec-[a-c]*")
    assert parse_rule("snd-hda-codec-[a-c]*", source=SOURCE).pattern == "snd_hda_codec_[a-c]*"
    assert decision(policy, "snd_hda_codec_analog") is not None
    assert decision(policy, "snd_hda_codec_realtek") is None


def test_globs_are_case_sensitive() -> None:
    assert decision(policy_of("Virtio*"), "virtio_net") is None


def test_literal_name_is_not_a_glob() -> None:
    assert not parse_rule("virtio_net", source=SOURCE).is_glob
    assert parse_rule("virtio_?et", source=SOURCE).is_glob
    assert decision(policy_of("virtio_?et"), "virtio_net") == "keep virtio_?et"


def test_rule_with_a_slash_matches_the_path_in_the_module_dir() -> None:
    policy = policy_of("kernel/drivers/net/*")
    assert parse_rule("kernel/drivers/net/*", source=SOURCE).kind == "path"
    assert decision(policy, "e1000", E1000) == "keep kernel/drivers/net/*"  # * crosses /
    assert decision(policy, "ext4", "kernel/fs/ext4/ext4.ko") is None


def test_path_rule_is_matched_as_the_file_is_spelt() -> None:
    policy = policy_of("kernel/drivers/md/dm-mod.ko*")
    assert decision(policy, "dm_mod", "kernel/drivers/md/dm-mod.ko.xz") is not None
    assert decision(policy, "dm_mod", "kernel/drivers/md/dm_mod.ko.xz") is None


def test_alias_rule_matches_any_of_the_module_aliases() -> None:
    policy = policy_of("alias:crypto-crc32c")
    assert decision(policy, "crc32c_intel", aliases=("crc32c-intel", "crypto-crc32c")) == \
        "keep alias:crypto-crc32c"
    assert decision(policy, "crc32c_intel") is None


def test_alias_rule_may_contain_a_slash_and_is_still_an_alias_rule() -> None:
    rule = parse_rule("alias:devname:net/tun", source=SOURCE)
    assert (rule.kind, rule.pattern) == ("alias", "devname:net/tun")
    assert decision(policy_of("alias:devname:net/tun"), "tun", aliases=("devname:net/tun",))


def test_module_no_rule_matches_is_undecided() -> None:
    assert decision(policy_of("virtio_*", "-e1000"), "ext4") is None


# -- last matching rule wins -------------------------------------------------------------


@pytest.mark.parametrize(("rules", "expected"), [
    (("virtio_*", "-virtio_balloon"), "exclude -virtio_balloon"),
    (("-virtio_balloon", "virtio_*"), "keep virtio_*"),
    (("-virtio_*", "virtio_balloon"), "keep virtio_balloon"),
    (("virtio_balloon", "-virtio_*"), "exclude -virtio_*"),
    (("virtio_balloon", "-virtio_balloon", "virtio_balloon"), "keep virtio_balloon"),
    (("*", "-*balloon", "virtio*"), "keep virtio*"),
])
def test_last_matching_rule_wins(rules: tuple[str, ...], expected: str) -> None:
    assert decision(policy_of(*rules), "virtio_balloon") == expected


def test_last_matching_rule_wins_across_name_path_and_alias_rules() -> None:
    relpath = "kernel/drivers/virtio/virtio_balloon.ko"
    aliases = ("virtio:d00000005v*",)
    assert decision(policy_of("virtio_balloon", "-kernel/drivers/virtio/*"), "virtio_balloon",
                    relpath, aliases) == "exclude -kernel/drivers/virtio/*"
    assert decision(policy_of("-kernel/drivers/virtio/*", "alias:virtio:d00000005v*"),
                    "virtio_balloon", relpath, aliases) == "keep alias:virtio:d00000005v*"
    assert decision(policy_of("-alias:virtio:*", "virtio_balloon"), "virtio_balloon",
                    relpath, aliases) == "keep virtio_balloon"


def test_user_rules_come_after_the_presets_and_override_them() -> None:
    policy = policy_of("-virtio_balloon", presets=["cloud-boot"])
    assert policy.rules[0].from_preset
    assert not policy.rules[-1].from_preset
    assert decision(policy, "virtio_balloon") == "exclude -virtio_balloon"
    assert decision(policy, "virtio_net") == "keep virtio_net"


def test_many_rules_still_give_the_last_match() -> None:
    rules = [f"mod_{i}" for i in range(2000)] + ["-mod_1*", "mod_15"]
    policy = policy_of(*rules)
    assert decision(policy, "mod_15") == "keep mod_15"
    assert decision(policy, "mod_1999") == "exclude -mod_1*"
    assert decision(policy, "mod_7") == "keep mod_7"


# -- where a rule comes from -------------------------------------------------------------


def test_user_rule_describes_its_file_and_line() -> None:
    rule = parse_rule("-virtio*", source=SOURCE, line=12)
    assert rule.describe() == f"policy rule '-virtio*' ({SOURCE}:12)"


def test_preset_rule_describes_its_preset() -> None:
    rule = policy_of(presets=["cloud-boot"]).rules[0]
    assert rule.describe() == "preset cloud-boot ('virtio')"


@pytest.mark.parametrize(("text", "says"), [
    ("", "empty rule"),
    ("-", "empty rule"),
    ("alias:", "empty rule"),
    ("--virtio", "only one '-'"),
    ("virtio net", "whitespace"),
    ("/lib/modules/6.1.0/kernel/x.ko", "relative to the kernel's module directory"),
])
def test_invalid_rule_is_refused_naming_file_line_and_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_rule(text, source=SOURCE, line=3)
    assert str(caught.value).startswith(f"{SOURCE}:3: rule ")
    assert says in str(caught.value)


# -- rules that name nothing -------------------------------------------------------------


def test_misspelt_literal_name_is_found_to_name_nothing() -> None:
    policy = policy_of("virtio_nett", "virtio_net", "ext*")
    unmatched = policy.literal_rules_matching_nothing(["virtio_net", "ext4"])
    assert [r.written() for r in unmatched] == ["virtio_nett"]


def test_exclude_rule_naming_nothing_is_found_too() -> None:
    assert [r.written() for r in
            policy_of("-virtio_nett").literal_rules_matching_nothing(["virtio_net"])] == \
        ["-virtio_nett"]


def test_path_rule_names_something_when_it_is_a_known_module_file() -> None:
    policy = policy_of("kernel/drivers/net/virtio_net.ko", "kernel/drivers/net/gone.ko")
    unmatched = policy.literal_rules_matching_nothing(["virtio_net"])
    assert [r.written() for r in unmatched] == ["kernel/drivers/net/gone.ko"]


def test_literal_alias_rule_is_checked_only_against_known_aliases() -> None:
    policy = policy_of("alias:crypto-nothing")
    assert policy.literal_rules_matching_nothing(["x"]) == []
    assert len(policy.literal_rules_matching_nothing(["x"], ["crypto-crc32c"])) == 1


def test_preset_rules_are_never_reported_as_naming_nothing() -> None:
    policy = policy_of(presets=["cloud-boot", "filesystems"])
    assert policy.literal_rules_matching_nothing(["virtio_net"]) == []


# -- from policy text --------------------------------------------------------------------


POLICY_TEXT = """\
presets = ["cloud-boot"]
firmware = "keep"
rules = [
  "kernel/drivers/net/*",
  "-virtio_balloon",
  "alias:crypto-crc32c",
]
"""


def test_policy_text_rules_decide_after_its_presets() -> None:
    policy = policy_from_toml(POLICY_TEXT)
    assert policy.settings.firmware == "keep"
    assert decision(policy, "virtio_balloon") == "exclude -virtio_balloon"
    assert decision(policy, "virtio_blk") == "keep virtio_blk"
    assert decision(policy, "e1000", E1000) == "keep kernel/drivers/net/*"


def test_in_memory_policy_is_the_one_the_loader_reads_from_a_file(tmp_path: Path) -> None:
    # load_policy only reads paths: the one place this tier writes a policy file, to show
    # that fakepolicy composes a policy exactly as the loader does.
    main = tmp_path / "etc/kmodtrim/policy.toml"
    main.parent.mkdir(parents=True)
    main.write_text(POLICY_TEXT)
    loaded = load_policy(tmp_path)
    in_memory = policy_from_toml(POLICY_TEXT)
    assert loaded.settings == in_memory.settings

    def rules(policy: LoadedPolicy) -> list[tuple[str, bool, str, str, str]]:
        return [(r.pattern, r.exclude, r.kind, r.source, r.written()) for r in policy.rules]

    assert rules(loaded) == rules(in_memory)
    assert [r.line for r in loaded.user_rules] == [4, 5, 6]


def test_dropin_rules_come_after_the_main_file_and_win(tmp_path: Path) -> None:
    etc = tmp_path / "etc/kmodtrim"
    (etc / "policy.d").mkdir(parents=True)
    (etc / "policy.toml").write_text('presets = []\nrules = ["-virtio_*"]\n')
    (etc / "policy.d/50-gpu.toml").write_text('rules = ["virtio_gpu"]\n')
    policy = load_policy(tmp_path)
    assert decision(policy, "virtio_gpu") == "keep virtio_gpu"
    assert decision(policy, "virtio_net") == "exclude -virtio_*"
    assert policy.rules[-1].describe() == \
        "policy rule 'virtio_gpu' (/etc/kmodtrim/policy.d/50-gpu.toml:1)"
