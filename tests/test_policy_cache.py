"""The validated-policy cache (policy/cache.py): a run whose policy files are unchanged
reads the settings and rules back without validating; any change to a file, a drop-in
added or removed, a link retargeted, or an untrusted cache file means validating again;
a broken policy is never cached."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kmodtrim.errors import PolicyError
from kmodtrim.policy import load_policy
from kmodtrim.policy.cache import CACHE_NAME, SettingsView, cached_policy


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def rules_of(loaded: object) -> list[tuple[str, str, int | None, bool]]:
    return [(r.pattern, r.source, r.line, r.exclude) for r in loaded.rules]  # type: ignore[attr-defined]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    write(root, "etc/kmodtrim/policy.toml",
          'presets = ["filesystems"]\nclouds = ["kvm"]\nrules = [\n  "dm_crypt",\n'
          '  "-xfs",\n]\n[min_observation]\nboots = 2\n')
    write(root, "etc/kmodtrim/policy.d/50-site.toml", 'rules = ["alias:fs-nfs*"]\n')
    return root


def cache(root: Path) -> Path:
    return root / "var/cache/kmodtrim"


def test_an_unchanged_policy_is_read_back_as_validated(root: Path) -> None:
    fresh = load_policy(root)
    first = cached_policy(root, None, cache(root))
    assert not isinstance(first.settings, SettingsView)  # validated, then written
    assert (cache(root) / CACHE_NAME).is_file()
    again = cached_policy(root, None, cache(root))
    assert isinstance(again.settings, SettingsView)
    assert rules_of(again) == rules_of(fresh) == rules_of(first)
    assert again.sources == fresh.sources
    s = again.settings
    assert (s.mode, s.presets, s.clouds, s.min_observation.boots, s.min_observation.days,
            s.stash.keep, s.firmware) == ("manual", ["filesystems"], ["kvm"], 2, 7.0,
                                          "likely", "trim")
    assert again.decide("xfs", "kernel/fs/xfs/xfs.ko") == fresh.decide(
        "xfs", "kernel/fs/xfs/xfs.ko")
    with pytest.raises(AttributeError):
        s.mode = "auto"


@pytest.mark.parametrize("change", ["edit", "add-dropin", "remove-dropin", "mask-dropin"])
def test_any_change_to_the_files_validates_again(root: Path, change: str) -> None:
    cached_policy(root, None, cache(root))
    dropin = root / "etc/kmodtrim/policy.d/50-site.toml"
    if change == "edit":
        main = root / "etc/kmodtrim/policy.toml"
        stat = main.stat()
        main.write_text(main.read_text().replace("boots = 2", "boots = 5"))
        os.utime(main, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: ctime tells
    elif change == "add-dropin":
        write(root, "etc/kmodtrim/policy.d/60-more.toml", 'rules = ["vxlan"]\n')
    elif change == "remove-dropin":
        dropin.unlink()
    else:
        dropin.unlink()
        dropin.symlink_to("/dev/null")
    again = cached_policy(root, None, cache(root))
    assert not isinstance(again.settings, SettingsView)
    assert rules_of(again) == rules_of(load_policy(root))
    assert isinstance(cached_policy(root, None, cache(root)).settings, SettingsView)


def test_a_broken_policy_is_never_cached(root: Path) -> None:
    cached_policy(root, None, cache(root))
    write(root, "etc/kmodtrim/policy.d/70-bad.toml", 'mdoe = "auto"\n')
    for _ in range(2):
        with pytest.raises(PolicyError, match="unknown key 'mdoe'"):
            cached_policy(root, None, cache(root))


def test_an_untrusted_or_damaged_cache_is_ignored_and_rewritten(root: Path) -> None:
    cached_policy(root, None, cache(root))
    path = cache(root) / CACHE_NAME
    doc = json.loads(path.read_text())
    # A planted cache (matching key, other rules) that others could have written.
    doc["rules"] = [["-dm_crypt", "/etc/kmodtrim/policy.toml", 1]]
    path.write_text(json.dumps(doc))
    path.chmod(0o666)
    loaded = cached_policy(root, None, cache(root))
    assert not isinstance(loaded.settings, SettingsView)
    assert rules_of(loaded) == rules_of(load_policy(root))
    path.unlink()
    cached_policy(root, None, cache(root))
    path.write_bytes(b"{not json")
    assert not isinstance(cached_policy(root, None, cache(root)).settings, SettingsView)
    assert isinstance(cached_policy(root, None, cache(root)).settings, SettingsView)


def test_an_explicit_policy_file_is_keyed_too(root: Path, tmp_path: Path) -> None:
    other = write(tmp_path, "other.toml", 'rules = ["vxlan"]\n')
    loaded = cached_policy(root, other, cache(root))
    assert [r.pattern for r in loaded.rules if not r.from_preset] == ["vxlan", "fs_nfs*"]
    main = cached_policy(root, None, cache(root))
    assert "vxlan" not in [r.pattern for r in main.rules]
    with pytest.raises(PolicyError, match="policy file not found"):
        cached_policy(root, tmp_path / "missing.toml", cache(root))
