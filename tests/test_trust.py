"""kmodtrim tried as an attacker and as a new admin would: planted or damaged state, links
out of the root, lost manifests and journals, crashes, a full disk, restores that must
stick — real CLI processes on scratch roots with gcc-built modules and real depmod."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmodtrim.store import current_generation
from test_executor import KVER, _cli, _snapshot, make_observed, make_root

STATE = "var/lib/kmodtrim"
TEST_DIR = f"lib/modules/{KVER}/kernel/drivers/test"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path)


@pytest.fixture
def observed(tmp_path: Path) -> Path:
    return make_observed(tmp_path)


def _apply(root: Path, observed: Path, *extra: str,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return _cli(root, "apply", "--yes", "--initramfs", "skip", "--observed", str(observed),
                *extra, env=env)


def _out(root: Path) -> list[str]:
    """Module files missing from the test directory (trimmed ones)."""
    return sorted(n for n in ("unused_c", "unused_d", "unused_e")
                  if not (root / TEST_DIR / f"{n}.ko").exists())


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kmodtrim: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# -- 1. state only root can write ------------------------------------------------------


def test_state_gets_explicit_modes_whatever_the_umask(root: Path, observed: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import os, sys; os.umask(0); from kmodtrim.cli import main; "
         "sys.exit(main(sys.argv[1:]))", "apply", "--yes", "--initramfs", "skip",
         "--observed", str(observed), "--root", str(root), "--kernel", KVER],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    state = root / STATE
    for path in [state, *state.rglob("*")]:
        mode = path.lstat().st_mode & 0o777
        assert not mode & 0o022, f"{path} has mode {mode:o}"


@pytest.mark.parametrize("how", ["world-writable", "foreign-owner", "symlink"])
def test_planted_state_is_refused_and_nothing_is_written(
        root: Path, observed: Path, tmp_path: Path, how: str) -> None:
    assert _apply(root, observed).returncode == 0
    state = root / STATE
    target = tmp_path / "elsewhere"
    # The attacker's journal: "undo" by writing its own bytes somewhere.
    journal = {"action": "apply", "number": 9, "from": 0, "stash": [], "restore": [],
               "stashed_entries": [], "kernels": []}
    if how == "world-writable":
        state.chmod(0o777)
        (state / "journal.json").write_text(json.dumps(journal))
    elif how == "foreign-owner":
        (state / "journal.json").write_text(json.dumps(journal))
        os.chown(state / "journal.json", 65534, 65534)
    else:
        shutil.copytree(state, target)
        shutil.rmtree(state)
        state.symlink_to(target)
    trimmed = _out(root)
    proc = _cli(root, "rollback", "0", "--yes", "--initramfs", "skip")
    assert proc.returncode == 1
    assert "refusing kmodtrim state" in _one_line_error(proc)
    assert _out(root) == trimmed  # nothing was put back, nothing written


@pytest.mark.parametrize("bad", ["/../../../..{victim}", "/etc/passwd",
                                 f"/lib/modules/{KVER}/../../../x"])
def test_a_state_path_outside_the_managed_trees_is_refused(
        root: Path, observed: Path, tmp_path: Path, bad: str) -> None:
    before = _snapshot(root)
    assert _apply(root, observed).returncode == 0
    manifest = root / STATE / "generations/1.json"
    doc = json.loads(manifest.read_text())
    victim = tmp_path / "victim"
    doc["removed"][0]["path"] = bad.format(victim=victim)
    manifest.write_text(json.dumps(doc))
    status = _cli(root, "status")
    assert "refusing path" in status.stdout + status.stderr
    # The manifest is refused as damaged: the state is rebuilt from the stash's own
    # records, and nothing is ever written where the planted path points.
    proc = _cli(root, "rollback", "0", "--yes", "--initramfs", "skip")
    assert proc.returncode == 0, proc.stderr
    assert "refusing path" in proc.stderr
    assert not victim.exists() and not (root / "etc/passwd").exists()
    assert not (root / "x").exists()
    assert _snapshot(root) == before


def test_a_symlinked_module_directory_never_redirects_a_restore(
        root: Path, observed: Path, tmp_path: Path) -> None:
    before = _snapshot(root)
    assert _apply(root, observed).returncode == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    test_dir = root / TEST_DIR
    moved = tmp_path / "real-test-dir"
    shutil.move(test_dir, moved)
    test_dir.symlink_to(outside)  # absolute: leaves the root if followed as-is
    proc = _cli(root, "rollback", "0", "--yes", "--initramfs", "skip")
    assert proc.returncode == 0, proc.stderr
    assert list(outside.iterdir()) == []  # nothing written outside the root
    # The link was resolved inside the root, as chroot would.
    inside = root / str(outside).lstrip("/")
    assert sorted(p.name for p in inside.iterdir()) == [
        "unused_c.ko", "unused_d.ko", "unused_e.ko"]
    test_dir.unlink()
    shutil.move(moved, test_dir)
    for path in inside.iterdir():
        shutil.copy2(path, test_dir / path.name)
    assert _snapshot(root) == before


# -- 6, 7. damage costs only what it hit; lost records are rebuilt ----------------------


def _pack(root: Path) -> Path:
    packs = sorted((root / STATE / "stash/packs").glob("*.pack"))
    assert len(packs) == 1
    return packs[0]


def test_a_damaged_blob_costs_only_its_own_file(root: Path, observed: Path) -> None:
    before = _snapshot(root)
    assert _apply(root, observed).returncode == 0
    entries = [f for f in current_generation(root).removed if f.link is None]
    victim = max(entries, key=lambda f: f.size)
    # Garbage in the middle of one blob's frame (found by its record in the index).
    from kmodtrim.state.packfile import read_index
    pack = _pack(root)
    offset, length = next((o, n) for sha, o, n in read_index(pack) if sha == victim.sha256)
    with open(pack, "r+b") as f:
        f.seek(offset + length // 2)
        f.write(os.urandom(min(256, length // 4)))
    assert _cli(root, "plan").returncode == 0
    explained = _cli(root, "explain", "unused_e")
    assert explained.returncode == 0 and "REMOVED" in explained.stdout, explained.stderr
    status = _cli(root, "status", "--verify", "--json")
    assert status.returncode == 1
    assert [line for line in json.loads(status.stdout)["damaged"] if victim.path in line]
    proc = _cli(root, "rollback", "0", "--yes", "--initramfs", "skip")
    assert proc.returncode == 1 and victim.path in proc.stderr, proc.stderr
    after = _snapshot(root)
    missing = set(before) - set(after)
    assert missing == {victim.path.lstrip("/")}  # every other file is back
    assert current_generation(root).removed == (victim,)  # still out, still recorded


def test_a_pack_truncated_to_half_gives_back_its_first_half(root: Path, observed: Path) -> None:
    before = _snapshot(root)
    assert _apply(root, observed).returncode == 0
    pack = _pack(root)
    os.truncate(pack, pack.stat().st_size // 2)
    proc = _cli(root, "rollback", "0", "--yes", "--initramfs", "skip")
    assert proc.returncode == 1, proc.stderr
    after = _snapshot(root)
    assert set(after) < set(before) and len(set(before) - set(after)) < 5
    assert {f.path.lstrip("/") for f in current_generation(root).removed} >= \
        set(before) - set(after)


@pytest.mark.parametrize("damage", ["deleted", "garbage", "wrong-types"])
def test_a_lost_manifest_is_rebuilt_from_the_stash(
        root: Path, observed: Path, damage: str) -> None:
    before = _snapshot(root)
    assert _apply(root, observed).returncode == 0
    trimmed = _out(root)
    manifest = root / STATE / "generations/1.json"
    if damage == "deleted":
        manifest.unlink()
    elif damage == "garbage":
        manifest.write_bytes(b"\x00garbage{")
    else:
        doc = json.loads(manifest.read_text())
        doc["removed"][0]["size"] = "big"
        manifest.write_text(json.dumps(doc))
    status = _cli(root, "status", "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["removed_files"] >= len(trimmed) and doc["pending"], doc  # never "0 files"
    assert _cli(root, "explain", "unused_e").returncode == 0
    proc = _cli(root, "rollback", "0", "--yes", "--initramfs", "skip")
    assert proc.returncode == 0, proc.stderr
    assert "rebuilt the state" in proc.stderr
    assert _snapshot(root) == before
    if damage != "deleted":
        assert (root / STATE / "generations/1.json.damaged").exists()  # kept, never deleted


def test_a_damaged_journal_after_the_unlink_phase_loses_nothing(
        root: Path, observed: Path) -> None:
    before = _snapshot(root)
    assert _apply(root, observed, env={"KMODTRIM_FAULT": "after-unlink"}).returncode == -9
    assert _out(root)  # files are out, the journal says so
    (root / STATE / "journal.json").write_text('{"action": "apply", "numb')
    status = _cli(root, "status", "--json")
    assert "damaged" in " ".join(json.loads(status.stdout)["problems"])
    proc = _cli(root, "rollback", "0", "--yes", "--initramfs", "skip")
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(root) == before
    assert (root / STATE / "journal.json.damaged").exists()


# -- 9, 10, 11. crashes are visible, leave nothing behind, a full disk gives space back -


def test_a_crash_is_visible_and_dry_run_never_recovers(root: Path, observed: Path) -> None:
    assert _apply(root, observed, env={"KMODTRIM_FAULT": "after-unlink"}).returncode == -9
    crashed = _snapshot(root)
    status = json.loads(_cli(root, "status", "--json").stdout)
    assert status["pending"] and status["removed_files"] > 0
    human = _cli(root, "status").stdout
    assert "PENDING" in human and "interrupted apply" in human
    plan = _cli(root, "plan")
    assert plan.returncode == 0 and "kmodtrim: warning: an interrupted apply" in plan.stderr
    explained = _cli(root, "explain", "unused_e")
    assert explained.returncode == 0 and "REMOVED" in explained.stdout, explained.stderr
    dry = _cli(root, "rollback", "0", "--dry-run", "--initramfs", "skip")
    assert dry.returncode == 0, dry.stderr
    assert _snapshot(root) == crashed and (root / STATE / "journal.json").exists()


def test_recovery_sweeps_temporary_files_a_killed_restore_left(
        root: Path, observed: Path) -> None:
    before = _snapshot(root)
    assert _apply(root, observed).returncode == 0
    proc = _cli(root, "rollback", "0", "--yes", "--initramfs", "skip",
                env={"KMODTRIM_FAULT": "restore:1"})
    assert proc.returncode == -9
    # What a kill in the middle of the next file's write leaves beside it.
    leftovers = [root / TEST_DIR / f".{n}.ko.kmodtrim-tmp" for n in ("unused_d", "unused_e")]
    for path in leftovers:
        path.write_bytes(b"")
    assert _cli(root, "rollback", "0", "--yes", "--initramfs", "skip").returncode == 0
    assert not any(p.exists() for p in leftovers)
    assert not list(root.rglob("*.kmodtrim-tmp")) and not list(root.rglob("*.kmodtrim"))
    assert _snapshot(root) == before


def test_a_full_disk_after_the_pack_is_written_gives_the_space_back(
        root: Path, observed: Path) -> None:
    before = _snapshot(root)
    proc = _apply(root, observed, env={"KMODTRIM_FAULT": "after-stash=enospc"})
    assert proc.returncode == 1
    line = _one_line_error(proc)
    assert "undone" in line and "space" in line
    assert not list((root / STATE / "stash/packs").glob("*.pack"))
    assert _snapshot(root) == before


# -- 12. a restore sticks -----------------------------------------------------------------


def test_a_restored_module_is_kept_until_forgotten(root: Path, observed: Path) -> None:
    assert _apply(root, observed).returncode == 0
    assert "unused_e" in _out(root)
    assert _cli(root, "restore", "unused_e", "--yes", "--initramfs", "skip").returncode == 0
    assert _apply(root, observed).returncode == 0
    assert "unused_e" not in _out(root)
    explained = _cli(root, "explain", "unused_e").stdout
    assert "restored (restored by hand on" in explained, explained
    forget = _cli(root, "forget", "unused-e")
    assert forget.returncode == 0 and "no longer kept" in forget.stdout
    assert _apply(root, observed).returncode == 0
    assert "unused_e" in _out(root)


# -- 13, 14. clear errors, never tracebacks -------------------------------------------


READ_VERBS = [("status",), ("history",), ("show", "1"), ("plan",), ("explain", "unused_e"),
              ("observe",), ("index",)]
CHANGE_VERBS = [("apply", "--yes"), ("rollback", "0", "--yes"),
                ("restore", "unused_e", "--yes"), ("forget", "unused_e")]


def test_every_verb_as_an_unprivileged_user_is_a_clean_answer(
        root: Path, observed: Path) -> None:
    assert _apply(root, observed).returncode == 0
    os.chmod(root.parent, 0o755)  # let uid 65534 reach the scratch root
    trimmed = _out(root)
    for verb in READ_VERBS + CHANGE_VERBS:
        proc = subprocess.run(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
             sys.executable, "-m", "kmodtrim.cli", *verb, "--root", str(root),
             "--kernel", KVER, "--offline", "--no-cache"],
            capture_output=True, text=True, check=False, env={**os.environ, "HOME": "/"})
        assert "Traceback" not in proc.stderr, (verb, proc.stderr)
        if verb in CHANGE_VERBS:
            assert proc.returncode == 1, (verb, proc.stderr)
            assert "root" in _one_line_error(proc), verb
        else:
            assert proc.returncode in (0, 1), (verb, proc.stderr)
    assert _out(root) == trimmed


def _corrupt(root: Path, name: str, how: str) -> None:
    path = root / STATE / name
    doc = json.loads(path.read_text())
    if how == "truncated":
        path.write_text(path.read_text()[: len(path.read_text()) // 2])
        return
    if how == "wrong-types":
        if isinstance(doc, dict) and "removed" in doc:
            doc["removed"] = [{"path": 7, "size": []}]
        elif isinstance(doc, dict) and "boots" in doc:
            doc["boots"] = {"b": {"modules": "x"}}
        else:
            doc["number"] = "one"
    else:  # missing keys
        for key in ("number", "action", "boots", "path"):
            doc.pop(key, None) if isinstance(doc, dict) else None
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("name", ["generations/1.json", "journal.json", "observations.json"])
@pytest.mark.parametrize("how", ["truncated", "wrong-types", "missing-keys"])
def test_every_verb_with_a_corrupt_state_file_is_a_clean_answer_and_loses_nothing(
        root: Path, observed: Path, name: str, how: str) -> None:
    before = _snapshot(root)
    if name == "journal.json":
        assert _apply(root, observed, env={"KMODTRIM_FAULT": "after-unlink"}).returncode == -9
    else:
        assert _apply(root, observed).returncode == 0
    if name == "observations.json":
        assert _cli(root, "restore", "unused_e", "--yes", "--initramfs", "skip").returncode == 0
    _corrupt(root, name, how)
    for verb in READ_VERBS:
        proc = _cli(root, *verb)
        assert "Traceback" not in proc.stderr, (verb, proc.stderr)
        assert proc.returncode in (0, 1, 2), (verb, proc.stderr)
    proc = _cli(root, "rollback", "0", "--yes", "--initramfs", "skip")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(root) == before  # every file is back


def test_a_state_directory_that_is_a_file_is_a_clean_error(root: Path) -> None:
    (root / STATE).parent.mkdir(parents=True, exist_ok=True)
    (root / STATE).write_text("not a directory")
    for verb in (("status",), ("history",), ("rollback", "0", "--yes")):
        proc = _cli(root, *verb)
        assert proc.returncode in (1, 2), (verb, proc.stderr)
        _one_line_error(proc)


def test_small_input_mistakes_get_clear_answers(root: Path, observed: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kmodtrim.cli", "plan", "--root", str(root),
                           "--kernel", ""], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "not a kernel version" in _one_line_error(proc)
    record = _cli(root, "observe", "--record")
    assert record.returncode == 2 and "not a running system" in _one_line_error(record)
    assert not (root / STATE / "observations.json").exists()
    observed.write_text("net_a\nno_such_module\n")
    plan = _cli(root, "plan", "--observed", str(observed))
    assert plan.returncode == 0
    assert "kmodtrim: warning: observed module 'no_such_module'" in plan.stderr
    assert "warning" not in plan.stdout


@pytest.mark.parametrize("seed", [9, 14])
def test_random_kills_of_apply_rollback_and_restore_lose_nothing_and_leave_nothing(
        root: Path, observed: Path, seed: int) -> None:
    """SIGKILL at seeded random moments of whole CLI runs; after each, the next command
    recovers: no module lost, no temporary file left, and rollback 0 is byte-identical."""
    rng = random.Random(seed)
    before = _snapshot(root)
    commands = [
        ("apply", "--yes", "--initramfs", "skip", "--observed", str(observed), "--force"),
        ("rollback", "0", "--yes", "--initramfs", "skip"),
        ("restore", "unused_e", "--yes", "--initramfs", "skip"),
    ]
    for _ in range(8):
        verb = rng.choice(commands)
        running = subprocess.Popen(
            [sys.executable, "-m", "kmodtrim.cli", *verb, "--root", str(root),
             "--kernel", KVER], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.9))
        running.send_signal(signal.SIGKILL)
        running.wait()
        status = _cli(root, "status", "--json")
        assert "Traceback" not in status.stderr, status.stderr
    proc = _cli(root, "rollback", "0", "--yes", "--initramfs", "skip")
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(root) == before
    assert not list(root.rglob("*.kmodtrim-tmp")) and not list(root.rglob(".*.kmodtrim"))


def test_package_manager_exclusions_never_follow_a_link_out_of_the_root(tmp_path: Path) -> None:
    from kmodtrim.backends.dpkg import DpkgBackend

    root, outside = tmp_path / "root", tmp_path / "host-etc-dpkg"
    (outside / "dpkg.cfg.d").mkdir(parents=True)
    (root / "etc").mkdir(parents=True)
    (root / "etc/dpkg").symlink_to(outside)  # absolute: the host's, if followed as-is
    DpkgBackend().write_exclusions(root, {"/lib/modules/6.1.0-test/kernel/x.ko"})
    assert list((outside / "dpkg.cfg.d").iterdir()) == []
    written = root / str(outside).lstrip("/") / "dpkg.cfg.d/kmodtrim"
    assert "path-exclude=/lib/modules/6.1.0-test/kernel/x.ko" in written.read_text()


def test_an_image_boot_link_never_sends_the_initramfs_to_the_hosts_boot(tmp_path: Path) -> None:
    from kmodtrim.regen import initramfs_path

    root = tmp_path / "root"
    (root / "bootfs").mkdir(parents=True)
    (root / "boot").symlink_to("/bootfs")  # absolute: inside the root, read as chroot would
    image = initramfs_path(root, "6.1.0-test", "update-initramfs")
    assert image == (root / "bootfs/initrd.img-6.1.0-test").resolve()


def test_an_index_cache_others_could_write_is_neither_read_nor_written(root: Path) -> None:
    cache = root / "var/cache/kmodtrim"
    assert _cli(root, "index").returncode == 0
    (cache_file,) = cache.glob("index-*")
    cache.chmod(0o777)  # anyone could have planted what is in there
    before = cache_file.stat().st_mtime_ns
    proc = _cli(root, "index", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cached"] == 0  # every module read from its file
    assert cache_file.stat().st_mtime_ns == before  # and nothing written there
