"""The policy: files and drop-ins, validation messages, rule matching, presets."""

from __future__ import annotations

import random
import time
import tomllib
from pathlib import Path

import pytest

from kernels import KernelTree
from kmodtrim.errors import PolicyError
from kmodtrim.names import module_name_from_path
from kmodtrim.policy import (
    LoadedPolicy,
    MinObservation,
    Policy,
    Rule,
    default_policy,
    load_policy,
    parse_rule,
)
from kmodtrim.presets import DEFAULT_PRESETS, PRESET_DESCRIPTIONS, PRESETS

SHIPPED_POLICY = Path(__file__).resolve().parent.parent / "config" / "policy.toml"


def write(root: Path, relpath: str, text: str) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def main_file(root: Path, text: str) -> Path:
    return write(root, "etc/kmodtrim/policy.toml", text)


def dropin(root: Path, name: str, text: str) -> Path:
    return write(root, f"etc/kmodtrim/policy.d/{name}", text)


def policy_error(root: Path, explicit: Path | None = None) -> str:
    with pytest.raises(PolicyError) as caught:
        load_policy(root, explicit)
    message = str(caught.value)
    print(message)  # shown with -s / on failure: the messages are part of the interface
    return message


def user_policy(tmp_path: Path, *rules: str) -> LoadedPolicy:
    """A policy with no presets and these rules (in the main file)."""
    quoted = ", ".join(f"'{r}'" for r in rules)
    main_file(tmp_path, f"presets = []\nrules = [{quoted}]\n")
    return load_policy(tmp_path)


# -- the shipped file and the defaults ---------------------------------------------------


def test_shipped_policy_toml_loads_to_exactly_the_model_defaults(tmp_path: Path) -> None:
    loaded = load_policy(tmp_path, SHIPPED_POLICY, dropins=False)
    assert loaded.settings == Policy()
    assert loaded.rules == default_policy().rules
    assert loaded.sources == (str(SHIPPED_POLICY),)


def test_shipped_policy_toml_spells_out_every_key(tmp_path: Path) -> None:
    raw = tomllib.loads(SHIPPED_POLICY.read_text())
    assert set(raw) == set(Policy.model_fields)
    assert set(raw["min_observation"]) == set(MinObservation.model_fields)
    # Installed as /etc/kmodtrim/policy.toml it is equally the defaults.
    main_file(tmp_path, SHIPPED_POLICY.read_text())
    assert load_policy(tmp_path).settings == Policy()


def test_missing_policy_files_mean_the_builtin_defaults(tmp_path: Path) -> None:
    loaded = load_policy(tmp_path)
    assert loaded.settings == Policy()
    assert loaded.sources == ()
    assert loaded.settings.mode == "manual"
    assert loaded.settings.presets == list(DEFAULT_PRESETS)
    assert loaded.settings.min_observation == MinObservation(boots=3, days=7.0)
    assert all(r.from_preset for r in loaded.rules)


# -- files and drop-ins ------------------------------------------------------------------


def test_dropins_apply_in_lexical_order_scalars_override_rules_append(tmp_path: Path) -> None:
    main_file(tmp_path, 'mode = "auto"\nbackend = "dpkg"\nrules = ["dm_crypt"]\n')
    dropin(tmp_path, "50-late.toml", 'backend = "stash"\nrules = ["raid1"]\n')
    dropin(tmp_path, "10-early.toml", 'backend = "rpm"\nrules = ["-snd_*"]\n')
    dropin(tmp_path, "20-ignored.conf", 'backend = "rpm"\n')  # not *.toml
    dropin(tmp_path, ".30-hidden.toml", 'backend = "rpm"\n')

    loaded = load_policy(tmp_path)

    assert loaded.sources == (
        "/etc/kmodtrim/policy.toml",
        "/etc/kmodtrim/policy.d/10-early.toml",
        "/etc/kmodtrim/policy.d/50-late.toml",
    )
    assert loaded.settings.backend == "stash"  # the last drop-in wins
    assert loaded.settings.mode == "auto"  # untouched by the drop-ins
    assert loaded.settings.rules == ["dm_crypt", "-snd_*", "raid1"]
    assert [(r.written(), r.source) for r in loaded.user_rules] == [
        ("dm_crypt", "/etc/kmodtrim/policy.toml"),
        ("-snd_*", "/etc/kmodtrim/policy.d/10-early.toml"),
        ("raid1", "/etc/kmodtrim/policy.d/50-late.toml"),
    ]


def test_dropin_overrides_one_key_of_min_observation(tmp_path: Path) -> None:
    main_file(tmp_path, "[min_observation]\nboots = 5\ndays = 2.5\n")
    dropin(tmp_path, "10.toml", "[min_observation]\ndays = 14\n")
    assert load_policy(tmp_path).settings.min_observation == MinObservation(boots=5, days=14.0)


def test_main_file_presets_replace_the_default_list(tmp_path: Path) -> None:
    main_file(tmp_path, 'presets = ["filesystems"]\n')
    loaded = load_policy(tmp_path)
    assert loaded.settings.presets == ["filesystems"]
    assert {r.source for r in loaded.rules} == {"preset:filesystems"}


def test_dropin_presets_add_and_remove_with_a_dash(tmp_path: Path) -> None:
    main_file(tmp_path, 'presets = ["filesystems", "netfilter-core", "kernel-requested"]\n')
    dropin(tmp_path, "10-docker.toml", 'presets = ["container-host", "-netfilter-core"]\n')
    dropin(tmp_path, "20-again.toml", 'presets = ["cloud-boot", "-kernel-requested"]\n')
    loaded = load_policy(tmp_path)
    assert loaded.settings.presets == ["filesystems", "container-host", "cloud-boot"]
    assert [r.source for r in loaded.rules][-1] == "preset:cloud-boot"


def test_explicit_file_replaces_main_file_and_dropins_still_apply(tmp_path: Path) -> None:
    main_file(tmp_path, 'mode = "auto"\nrules = ["from_main"]\n')
    dropin(tmp_path, "10.toml", 'rules = ["from_dropin"]\n')
    explicit = write(tmp_path, "elsewhere/mine.toml", 'firmware = "keep"\nrules = ["mine"]\n')

    loaded = load_policy(tmp_path, explicit)
    assert loaded.settings.mode == "manual"
    assert loaded.settings.firmware == "keep"
    assert loaded.settings.rules == ["mine", "from_dropin"]
    assert loaded.sources == (str(explicit), "/etc/kmodtrim/policy.d/10.toml")
    assert loaded.user_rules[0].describe() == f"policy rule 'mine' ({explicit}:2)"

    without = load_policy(tmp_path, explicit, dropins=False)
    assert without.settings.rules == ["mine"]


def test_dropin_symlinked_to_dev_null_is_masked(tmp_path: Path) -> None:
    (tmp_path / "etc/kmodtrim/policy.d").mkdir(parents=True)
    (tmp_path / "etc/kmodtrim/policy.d/50-vendor.toml").symlink_to("/dev/null")
    assert load_policy(tmp_path).sources == ()


# -- matching ----------------------------------------------------------------------------


def test_last_matching_rule_wins_and_excludes_can_be_overridden(tmp_path: Path) -> None:
    loaded = user_policy(tmp_path, "virtio*", "-virtio_gpu", "-virtio_*", "virtio_net")

    def verdict(name: str) -> str:
        rule = loaded.decide(name, f"kernel/drivers/{name}.ko")
        return "none" if rule is None else rule.written()

    assert verdict("virtio_net") == "virtio_net"
    assert verdict("virtio_gpu") == "-virtio_*"
    assert verdict("virtio") == "virtio*"
    assert verdict("e1000") == "none"
    excluded = loaded.decide("virtio_blk", "kernel/drivers/block/virtio_blk.ko")
    assert excluded is not None and excluded.exclude


def test_user_rules_come_after_presets(tmp_path: Path) -> None:
    main_file(tmp_path, 'presets = ["cloud-boot"]\nrules = ["-mlx5_core"]\n')
    loaded = load_policy(tmp_path)
    rule = loaded.decide("mlx5_core", "kernel/drivers/net/ethernet/mellanox/mlx5_core.ko")
    assert rule is not None and rule.exclude and not rule.from_preset
    by_preset = loaded.decide("virtio_blk", "kernel/drivers/block/virtio_blk.ko")
    assert by_preset is not None and by_preset.describe() == "preset cloud-boot ('virtio_blk')"


def test_dashed_rule_matches_underscored_module_and_back(tmp_path: Path) -> None:
    loaded = user_policy(tmp_path, "virtio-blk", "dm_*", "-dm-crypt")
    assert loaded.rules[0].pattern == "virtio_blk"
    rule = loaded.decide("virtio_blk", "kernel/drivers/block/virtio_blk.ko")
    assert rule is not None and rule.written() == "virtio-blk"
    assert loaded.decide("dm-mod", "kernel/drivers/md/dm-mod.ko") is loaded.rules[1]
    assert loaded.decide("dm_crypt", "kernel/drivers/md/dm-crypt.ko") is loaded.rules[2]


def test_bracket_ranges_keep_their_dash_and_matching_is_case_sensitive(tmp_path: Path) -> None:
    loaded = user_policy(tmp_path, "snd_[a-c]*", "xt_LOG")
    assert loaded.rules[0].pattern == "snd_[a-c]*"
    assert loaded.decide("snd_ac97", "a/snd-ac97.ko") is loaded.rules[0]
    assert loaded.decide("snd_usb", "a/snd-usb.ko") is None
    assert loaded.decide("xt_LOG", "a/xt_LOG.ko") is loaded.rules[1]
    assert loaded.decide("xt_log", "a/xt_log.ko") is None


def test_path_rule_matches_relative_path_and_star_crosses_slashes(tmp_path: Path) -> None:
    loaded = user_policy(tmp_path, "kernel/drivers/net/*", "-kernel/drivers/net/wireless/*")
    assert loaded.rules[0].kind == "path"
    ena = loaded.decide("ena", "kernel/drivers/net/ethernet/amazon/ena/ena.ko.xz")
    assert ena is loaded.rules[0]
    ath = loaded.decide("ath9k", "kernel/drivers/net/wireless/ath/ath9k/ath9k.ko")
    assert ath is loaded.rules[1]
    # Path rules are matched as files are named: no dash normalisation there.
    assert loaded.decide("dm_mod", "kernel/drivers/md/dm-mod.ko") is None


def test_alias_rule_matches_any_alias_normalised(tmp_path: Path) -> None:
    loaded = user_policy(tmp_path, "alias:fs-*", "alias:devname:net/tun", "-alias:crypto_sha1")
    assert [r.kind for r in loaded.rules] == ["alias", "alias", "alias"]
    assert loaded.decide("ext4", "kernel/fs/ext4/ext4.ko", ["fs-ext2", "fs-ext4"]) is (
        loaded.rules[0]
    )
    assert loaded.decide("tun", "kernel/drivers/net/tun.ko", ["char-major-10-200",
                                                             "devname:net/tun"]) is (
        loaded.rules[1]
    )
    sha1 = loaded.decide("sha1_ssse3", "arch/x86/crypto/sha1-ssse3.ko", ["crypto-sha1"])
    assert sha1 is not None and sha1.exclude
    assert loaded.decide("ext4", "kernel/fs/ext4/ext4.ko") is None  # no aliases given


def test_decide_agrees_with_rule_by_rule_evaluation(tmp_path: Path) -> None:
    dropin(tmp_path, "10.toml", "\n".join([
        'presets = ["container-host"]',
        'rules = ["virtio*", "-virtio_net", "alias:pci:v00001AF4*", "-kernel/fs/*",',
        '         "ext4", "nf_conntrack_ftp", "-xt_*", "xt_LOG", "ip_vs_?h", "-alias:fs-x*"]',
    ]) + "\n")
    loaded = load_policy(tmp_path)
    rng = random.Random(7)
    stems = ["virtio_net", "virtio_blk", "ext4", "xfs", "xt_LOG", "xt_nat", "ip_vs_sh",
             "ip_vs_rr", "nvme", "snd_hda", "bridge", "nf_conntrack_ftp", "e1000e", "mlx5_core"]
    dirs = ["kernel/fs", "kernel/drivers/net", "kernel/net/netfilter", "kernel/sound"]
    aliases = ["pci:v00001AF4d00001000sv*", "fs-xfs", "fs-ext4", "crypto-crc32c", "net-pf-10"]
    for _ in range(3000):
        name = rng.choice(stems) + rng.choice(["", "", "_x", "-y"])
        relpath = f"{rng.choice(dirs)}/{name}.ko"
        mod_aliases = rng.sample(aliases, rng.randint(0, 2))
        expected: Rule | None = None
        for rule in loaded.rules:
            if rule.matches(name, relpath, mod_aliases):
                expected = rule
        assert loaded.decide(name, relpath, mod_aliases) is expected, (name, relpath)


def test_decide_costs_microseconds_per_module() -> None:
    loaded = _every_preset()
    modules = [(f"mod_{i}", f"kernel/drivers/misc/mod_{i}.ko", [f"pci:v{i:08X}d*"] * 5)
               for i in range(4000)]
    modules += [("virtio_net", "kernel/drivers/net/virtio_net.ko", ["virtio:d00000001v*"])]
    start = time.perf_counter()
    decided = [loaded.decide(*m) for m in modules]
    elapsed = time.perf_counter() - start
    assert decided[-1] is not None and decided[-1].source == "preset:cloud-boot"
    assert decided.count(None) == 4000
    assert elapsed < 0.5, f"{elapsed:.3f}s for {len(modules)} modules"


def test_rule_description_names_file_and_line(tmp_path: Path) -> None:
    main_file(tmp_path, "\n".join([
        "# comment mentioning 'virtio*' must not be taken for the rule",
        "rules = [",
        "  # 'virtio*' again, in a comment inside the array",
        "  'virtio*',  # trailing comment",
        '  "-alias:fs-*", "snd_hda_intel"',
        "]",
    ]) + "\n")
    rules = load_policy(tmp_path).user_rules
    assert [r.line for r in rules] == [4, 5, 5]
    assert rules[0].describe() == "policy rule 'virtio*' (/etc/kmodtrim/policy.toml:4)"
    assert rules[1].describe() == "policy rule '-alias:fs-*' (/etc/kmodtrim/policy.toml:5)"
    assert parse_rule("nvme", source="preset:cloud-boot").describe() == (
        "preset cloud-boot ('nvme')"
    )


# -- rules that name nothing -------------------------------------------------------------


def test_literal_rule_naming_no_module_is_reported_with_its_line(tmp_path: Path) -> None:
    main_file(tmp_path, "\n".join([
        "rules = [",
        '  "virtio-blk",',  # exists (normalised)
        '  "virtio_bkl",',  # misspelt: must be reported
        '  "snd_*",',  # a glob: may legitimately match nothing
        '  "-vmw_balloon_x",',  # excluding something that does not exist is a mistake too
        '  "kernel/drivers/block/virtio_blk.ko",',
        '  "kernel/drivers/block",',  # a directory never matches a module path
        '  "alias:fs-ext4",',
        '  "alias:fs-ext9",',
        "]",
    ]) + "\n")
    loaded = load_policy(tmp_path)
    known = ["virtio_blk", "vmw_balloon", "ext4"]

    missing = loaded.literal_rules_matching_nothing(known, ["fs-ext4", "pci:v*"])
    assert [(r.written(), r.line) for r in missing] == [
        ("virtio_bkl", 3),
        ("-vmw_balloon_x", 5),
        ("kernel/drivers/block", 7),
        ("alias:fs-ext9", 9),
    ]
    assert missing[0].describe() == "policy rule 'virtio_bkl' (/etc/kmodtrim/policy.toml:3)"
    # Without the kernel's aliases, alias rules cannot be judged and are not reported.
    assert "alias:fs-ext9" not in [
        r.written() for r in loaded.literal_rules_matching_nothing(known)
    ]
    # Preset entries are never reported (they list names of several kernel versions).
    assert all(not r.from_preset for r in missing)


# -- validation errors -------------------------------------------------------------------


def test_unknown_key_names_file_line_key_and_valid_keys(tmp_path: Path) -> None:
    main_file(tmp_path, 'mode = "manual"\nmdoe = "auto"\n')
    message = policy_error(tmp_path)
    path = tmp_path / "etc/kmodtrim/policy.toml"
    assert message == (
        f"{path}:2: unknown key 'mdoe' (did you mean 'mode'?); valid keys at the top level: "
        "backend, clouds, firmware, initramfs, min_observation, mode, presets, "
        "remove_packages, rules, stash, stash_compression"
    )


def test_unknown_key_in_a_table_lists_that_tables_keys(tmp_path: Path) -> None:
    dropin(tmp_path, "10-site.toml", "[min_observation]\nboot = 2\n")
    message = policy_error(tmp_path)
    assert "policy.d/10-site.toml:2: unknown key 'min_observation.boot'" in message
    assert "(did you mean 'boots'?)" in message
    assert "valid keys in [min_observation]: boots, days" in message


def test_bad_type_names_dotted_key_value_and_what_is_allowed(tmp_path: Path) -> None:
    main_file(tmp_path, '[min_observation]\nboots = "three"\ndays = -1\n')
    message = policy_error(tmp_path)
    path = tmp_path / "etc/kmodtrim/policy.toml"
    assert message.splitlines() == [
        f'{path}:2: min_observation.boots = "three": must be a whole number (e.g. 3)',
        f"{path}:3: min_observation.days = -1: must be >= 0",
    ]


def test_bad_choice_lists_the_allowed_values(tmp_path: Path) -> None:
    main_file(tmp_path, 'initramfs = "mkinitcpio"\n')
    message = policy_error(tmp_path)
    assert message.endswith(
        "policy.toml:1: initramfs = \"mkinitcpio\": allowed values are 'auto', 'skip', "
        "'dracut', 'update-initramfs' or 'kernel-install'"
    )


def test_unknown_preset_lists_the_valid_presets(tmp_path: Path) -> None:
    dropin(tmp_path, "50-x.toml", 'presets = [\n  "filesystems",\n  "cloud-bot",\n]\n')
    message = policy_error(tmp_path)
    path = tmp_path / "etc/kmodtrim/policy.d/50-x.toml"
    assert message == (
        f'{path}:3: presets[1] = "cloud-bot": unknown preset (did you mean \'cloud-boot\'?); '
        "valid presets: cloud-boot, container-host, filesystems, kernel-requested, "
        "netfilter-core"
    )


def test_unknown_platform_lists_the_valid_ones(tmp_path: Path) -> None:
    main_file(tmp_path, 'clouds = ["kvm", "awz"]\n')
    message = policy_error(tmp_path)
    assert message == (
        f'{tmp_path / "etc/kmodtrim/policy.toml"}:1: clouds[1] = "awz": unknown platform '
        "(did you mean 'aws'?); valid: auto, all, kvm, aws, gcp, azure, hyperv, oci, "
        "alibaba, vmware, xen")


def test_clouds_default_to_auto_and_a_dropin_replaces_them(tmp_path: Path) -> None:
    assert load_policy(tmp_path).settings.clouds == ["auto"]
    dropin(tmp_path, "50-x.toml", 'clouds = ["aws", "gcp"]\n')
    assert load_policy(tmp_path).settings.clouds == ["aws", "gcp"]


def test_removing_a_preset_is_only_allowed_in_a_dropin(tmp_path: Path) -> None:
    main_file(tmp_path, 'presets = ["-cloud-boot"]\n')
    message = policy_error(tmp_path)
    assert "presets[0] = \"-cloud-boot\"" in message
    assert "only a policy.d drop-in can do" in message


def test_bad_rules_are_reported_by_index_and_line(tmp_path: Path) -> None:
    main_file(tmp_path, 'rules = [\n  "ok",\n  42,\n  "two words",\n  "-",\n]\n')
    lines = policy_error(tmp_path).splitlines()
    assert [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in lines] == ["3", "4", "5"]
    assert lines[0].endswith("rules[1] = 42: must be a string")
    assert "rules[2] = \"two words\": a rule must not contain whitespace" in lines[1]
    assert "rules[3] = \"-\": empty rule" in lines[2]


def test_rules_not_a_list_and_table_not_a_table(tmp_path: Path) -> None:
    main_file(tmp_path, 'rules = "virtio*"\nmin_observation = 3\n')
    lines = policy_error(tmp_path).splitlines()
    assert lines[0].endswith('rules = "virtio*": must be a list of strings, e.g. ["a", "b"]')
    assert lines[1].endswith(
        "min_observation = 3: must be a table ([min_observation]) with keys boots, days"
    )


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    main_file(tmp_path, 'mode = "manual"\nrules = [\n  "a"\n  "b",\n]\n')
    message = policy_error(tmp_path)
    path = tmp_path / "etc/kmodtrim/policy.toml"
    assert message.startswith(f"{path}:4:")
    assert "TOML syntax error" in message


def test_unreadable_or_missing_files_are_policy_errors(tmp_path: Path) -> None:
    (tmp_path / "etc/kmodtrim/policy.toml").mkdir(parents=True)  # not a file
    assert "cannot read policy file" in policy_error(tmp_path)

    assert policy_error(tmp_path, tmp_path / "nope.toml").endswith(
        "nope.toml: policy file not found"
    )

    other = tmp_path / "other"
    (other / "etc/kmodtrim").mkdir(parents=True)
    (other / "etc/kmodtrim/policy.toml").write_bytes(b'mode = "manual"\n# caf\xe9\n')
    assert policy_error(other).endswith("policy.toml:2: not UTF-8 text")


def test_policy_error_carries_a_hint_and_exit_code_2(tmp_path: Path) -> None:
    main_file(tmp_path, "mode = 1\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path)
    assert caught.value.exit_code == 2
    assert caught.value.hint is not None and "/etc/kmodtrim/policy.toml" in caught.value.hint


def test_settings_are_frozen() -> None:
    settings = default_policy().settings
    with pytest.raises(ValueError):
        settings.mode = "auto"


# -- presets -----------------------------------------------------------------------------


def test_every_preset_pattern_is_a_valid_rule() -> None:
    assert set(PRESETS) == set(PRESET_DESCRIPTIONS)
    assert set(DEFAULT_PRESETS) <= set(PRESETS)
    assert "container-host" not in DEFAULT_PRESETS
    for name, patterns in PRESETS.items():
        assert patterns, name
        assert len(set(patterns)) == len(patterns), f"duplicates in preset {name}"
        for text in patterns:
            rule = parse_rule(text, source=f"preset:{name}")
            # Exclusions in one preset would silently cancel another listed before it.
            assert not rule.exclude, (name, text)
            assert rule.matches("x", "x", ["x"]) in (True, False)
        assert PRESET_DESCRIPTIONS[name] and "\n" not in PRESET_DESCRIPTIONS[name]


def test_kernel_requested_preset_keeps_both_crc32c_implementations() -> None:
    loaded = _every_preset()
    for name in ("crc32c_intel", "crc32c_generic"):
        rule = loaded.decide(name, f"arch/x86/crypto/{name}.ko", ["crypto-crc32c", name])
        assert rule is not None and rule.describe() == (
            "preset kernel-requested ('alias:crypto-crc32c')"
        )
    # "crypto-crc32c" must not drag in every crypto module.
    assert loaded.decide("sha1_ssse3", "arch/x86/crypto/sha1-ssse3.ko", ["crypto-sha1"]) is None


# Names a preset lists for kernels other than Debian 12's (renamed, merged or not built).
_OTHER_KERNELS_ONLY = {
    "nvme_common",  # split out of nvme_core in 6.x
    "hyperv_fb",  # replaced by hyperv_drm; still built by some distributions
    "pata_acpi",  # not built by Debian
    "nft_counter",  # part of nf_tables.ko since 4.x
    "nf_log_common", "nf_log_ipv4", "nf_log_ipv6",  # merged into nf_log_syslog in 5.12
    "virtio", "virtio_ring",  # built in on Fedora/Ubuntu (modules on Debian)
}


def _every_preset() -> LoadedPolicy:
    """A policy listing every preset, in declaration order."""
    return LoadedPolicy(Policy(presets=list(PRESETS)), tuple(
        parse_rule(text, source=f"preset:{name}")
        for name, patterns in PRESETS.items() for text in patterns
    ), ())


@pytest.mark.kernel
def test_presets_name_real_modules_of_a_debian_kernel(generic_kernel: KernelTree) -> None:
    moddir = generic_kernel.moddir
    modules: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        relpath = line.split(":", 1)[0]
        name = module_name_from_path(relpath)
        assert name is not None
        modules[name] = (relpath, [])
    for line in (moddir / "modules.alias").read_text().splitlines():
        if line.startswith("alias "):
            _, alias, name = line.split(" ", 2)
            if name in modules:
                modules[name][1].append(alias)
    builtins = {module_name_from_path(p) for p in (moddir / "modules.builtin").read_text().split()}

    everything = _every_preset()
    kept_by: dict[str, set[str]] = {}
    for name, (relpath, aliases) in modules.items():
        rule = everything.decide(name, relpath, aliases)
        if rule is not None:
            kept_by.setdefault(rule.source, set()).add(name)

    # Every literal name is a module (or builtin) of this kernel unless known otherwise.
    for preset, patterns in PRESETS.items():
        for text in patterns:
            rule = parse_rule(text, source=preset)
            if rule.kind == "name" and not rule.is_glob:
                assert (rule.pattern in modules or rule.pattern in builtins
                        or rule.pattern in _OTHER_KERNELS_ONLY), (preset, text)
    # Every preset keeps something here, each small next to ~4,000 modules; the default
    # policy lists none (the platform set and restore on demand stand in for them).
    assert set(kept_by) == {f"preset:{p}" for p in PRESETS}
    assert 4 <= len(kept_by["preset:kernel-requested"]) <= 30
    assert all(len(names) <= 300 for names in kept_by.values())
    default = default_policy()
    assert [n for n, (r, a) in modules.items() if default.decide(n, r, a)] == []


def test_a_stash_compression_kmodtrim_does_not_implement_is_refused(tmp_path: Path) -> None:
    for value in ("xz", "none"):
        main_file(tmp_path, f'stash_compression = "{value}"\n')
        assert "stash_compression" in policy_error(tmp_path)
