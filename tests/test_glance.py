"""The state at a glance (state/glance.py): ``status``, ``history`` and a warm ``plan`` read
the newest generation's summary and the stash's pack indexes instead of its manifest when
the records are whole, and the full view otherwise. The quick answer must be the full
one: each test compares them, on whole state and on every kind of damage that sends the
glance away."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kmodtrim import usecases
from kmodtrim.operations import CurrentStash, Target, load_index, make_plan_for
from kmodtrim.records import GENERATION_ZERO, Generation
from kmodtrim.state.glance import glance
from kmodtrim.state.summary import summary_of, summary_path, zero_summary
from kmodtrim.store import generations_dir, journal_path, state_dir
from modbuild import ModSpec, build_tree

pytestmark = pytest.mark.integration

KVER = "6.1.0-test"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("user", imports=("core_fn",), depends=("core",)),
    ModSpec("unused"),
    ModSpec("spare", exports=("spare_fn",)),
    ModSpec("spare_user", imports=("spare_fn",), depends=("spare",)),
)


def _kmodtrim(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "kmodtrim.cli", *args], capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A module tree with a policy keeping ``user`` (and so ``core``), trimmed once."""
    root = tmp_path / "root"
    build_tree(root, KVER, SPECS)
    policy = root / "etc/kmodtrim/policy.toml"
    policy.parent.mkdir(parents=True)
    policy.write_text('presets = []\nclouds = []\nrules = ["user"]\n')
    _kmodtrim("apply", "--yes", "--force", "--initramfs", "skip", "--offline",
              "--root", str(root))
    return root


def _full(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every reader take the full view."""
    monkeypatch.setattr(usecases, "quick_or_none", lambda *a, **k: None)


def _status(root: Path) -> dict[str, Any]:
    return usecases.status(root, kernel=KVER)


def test_status_at_a_glance_is_the_full_status(root: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    quick = glance(root, stash=True)
    assert quick is not None and quick["generation"] == 1
    at_a_glance = _status(root)
    assert at_a_glance["removed_files"] == 3 and at_a_glance["damaged"] == []
    with monkeypatch.context() as m:
        _full(m)
        assert _status(root) == at_a_glance


def test_status_reads_no_manifest_when_the_records_are_whole(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(doc: object) -> Generation:
        raise AssertionError("a manifest was parsed")

    monkeypatch.setattr(Generation, "from_json", staticmethod(refuse))
    assert _status(root)["generation"] == 1
    assert usecases.history(root)["generations"][-1]["current"] is True


def _lose_a_pack(root: Path) -> None:
    packs = sorted((state_dir(root) / "stash/packs").iterdir())
    assert packs
    packs[0].unlink()


def _stale_summary(root: Path) -> None:
    path = summary_path(root, 1)
    doc = json.loads(path.read_text())
    doc["manifest"][1] ^= 1  # written for another manifest
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o644)


def _old_summary(root: Path) -> None:
    path = summary_path(root, 1)
    doc = json.loads(path.read_text())
    for key in ("blobs", "from_archive_files", "others_out"):
        del doc[key]  # as a kmodtrim before these keys wrote it
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o644)


def _pending_journal(root: Path) -> None:
    journal_path(root).write_text(json.dumps({"action": "apply", "number": 2}))
    os.chmod(journal_path(root), 0o644)


def _newer_pack(root: Path) -> None:
    packs = sorted((state_dir(root) / "stash/packs").iterdir())
    packs[0].rename(packs[0].with_name("g7-" + packs[0].name.split("-", 1)[1]))


@pytest.mark.parametrize("damage", [_lose_a_pack, _stale_summary, _old_summary,
                                    _pending_journal, _newer_pack],
                         ids=lambda f: f.__name__.strip("_"))
def test_anything_amiss_sends_the_glance_to_the_full_view(
        root: Path, monkeypatch: pytest.MonkeyPatch, damage: object) -> None:
    assert callable(damage)
    damage(root)
    assert glance(root, stash=True) is None
    at_a_glance = _status(root)
    with monkeypatch.context() as m:
        _full(m)
        assert _status(root) == at_a_glance
    if damage is _lose_a_pack:
        assert at_a_glance["damaged"] and all("is missing" in d for d in at_a_glance["damaged"])
    if damage is _old_summary:  # history still reads it: it has the history row
        assert glance(root) is not None


def test_a_loose_blob_counts_as_present(root: Path) -> None:
    """A blob stashed one at a time (stash/objects/AB/SHA.zst) is found as a pack's is."""
    quick = glance(root, stash=True)
    assert quick is not None and quick["blobs"]
    packs = state_dir(root) / "stash/packs"
    moved = packs.parent / "packs-aside"
    packs.rename(moved)
    objects = state_dir(root) / "stash/objects"
    blobs = [quick["blobs"][i:i + 16] for i in range(0, len(quick["blobs"]), 16)]
    for short in blobs:
        (objects / short[:2]).mkdir(parents=True, exist_ok=True)
        (objects / short[:2] / f"{short}{'0' * 48}.zst").write_bytes(b"x" * 10)
    found = glance(root, stash=True)
    assert found is not None and found["stash_bytes_on_disk"] == 10 * len(blobs)
    (objects / blobs[0][:2] / f"{blobs[0]}{'0' * 48}.zst").unlink()
    assert glance(root, stash=True) is None


def test_generation_zero_at_a_glance_is_its_summary() -> None:
    expected = {k: v for k, v in summary_of(GENERATION_ZERO).items()}
    assert zero_summary() == expected


def test_an_untrimmed_root_is_seen_at_a_glance(tmp_path: Path) -> None:
    root = tmp_path / "root"
    build_tree(root, KVER, SPECS)
    quick = glance(root, stash=True)
    assert quick is not None and quick["generation"] == 0
    assert quick["stash_bytes_on_disk"] == 0


def test_a_warm_plan_reads_no_manifest_and_plans_as_a_cold_one(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = Target(root=root, kernel=KVER)
    cold = usecases.plan_document(make_plan_for(Target(root=root, kernel=KVER,
                                                       use_cache=False)), root)
    load_index(target)  # the cache now has the stashed rows under this manifest's key

    def refuse(doc: object) -> Generation:
        raise AssertionError("a manifest was parsed")

    with monkeypatch.context() as m:
        m.setattr(Generation, "from_json", staticmethod(refuse))
        index, stats = load_index(target)
        assert stats.parsed == 0
        assert {e.name for e in index.modules.values() if e.stashed} == {
            "unused", "spare", "spare_user"}
        warm = usecases.plan_document(make_plan_for(target), root)
    assert warm == cold
    with monkeypatch.context() as m:
        _full(m)
        assert usecases.plan_document(make_plan_for(target), root) == cold


def test_a_new_generation_lists_its_own_stashed_modules(root: Path) -> None:
    target = Target(root=root, kernel=KVER)
    load_index(target)
    before = CurrentStash(root, KVER).key
    _kmodtrim("restore", "--yes", "--initramfs", "skip", "--offline", "--root", str(root),
              "spare_user")
    after = CurrentStash(root, KVER).key
    assert before is not None and after is not None and after != before
    index, _ = load_index(target)
    assert {e.name for e in index.modules.values() if e.stashed} == {"unused"}
    assert sorted(p.name for p in generations_dir(root).iterdir()) == [
        "1.json", "1.summary.json", "2.json", "2.summary.json"]


def test_a_glance_never_writes(root: Path) -> None:
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns)
                    for p in state_dir(root).rglob("*"))
    _lose_a_pack(root)
    glance(root, stash=True)
    _status(root)
    after = sorted((p.relative_to(root), p.stat().st_mtime_ns)
                   for p in state_dir(root).rglob("*"))
    assert len(after) == len(before) - 1
