"""Restore from the package archive, for real: a kernel-like package (xz modules built with
gcc) served by a local apt archive (dpkg-scanpackages, a ``file:`` source), installed with
dpkg into a scratch root whose own apt configuration names that archive. A trim under
``[stash] keep = "none"`` keeps no local copy of what the archive serves; rollback and
restore fetch the exact version with ``apt-get download`` and check each file against
dpkg's md5sums before it enters the tree. A tampered archive or md5sums, an unreachable
archive, a version the archive no longer serves and a crash mid-restore are each handled
without losing or leaving a file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kmodtrim.backends.dpkg import DpkgBackend, dpkg_command
from kmodtrim.executor import recover
from kmodtrim.store import current_generation, read_journal
from kmodtrim.takeout import Source
from modbuild import ModSpec, module_bytes
from pkgbuild import build_deb, init_dpkg_root, need, sh

KVER = "9.9.9-test"
MODDIR = f"/lib/modules/{KVER}/kernel/drivers/test"
IMAGE = f"linux-image-{KVER}"
VERSION = "1.0-1"


def _bulk(name: str) -> tuple[tuple[str, str], ...]:
    """A modinfo note of ~12 KiB that xz cannot shrink below half: module-sized files."""
    return (("note", "".join(hashlib.sha256(f"{name}{i}".encode()).hexdigest()
                             for i in range(200))),)


SPECS = (ModSpec("core", exports=("core_fn",)),
         ModSpec("nic", imports=("core_fn",), depends=("core",)),
         ModSpec("unused_a", exports=("a_fn",), extra_modinfo=_bulk("unused_a")),
         ModSpec("unused_b", imports=("a_fn",), depends=("unused_a",),
                 extra_modinfo=_bulk("unused_b")),
         ModSpec("virtio_scsi", extra_modinfo=_bulk("virtio_scsi")))
UNUSED = [f"{MODDIR}/{n}.ko.xz" for n in ("unused_a", "unused_b", "virtio_scsi")]


def _payload(out: Path, tampered: bool = False) -> dict[str, bytes]:
    files = {}
    for spec in SPECS:
        if tampered and spec.name == "unused_a":
            spec = ModSpec("unused_a", exports=("a_fn",), extra_modinfo=(
                *_bulk("unused_a"), ("description", "not what was installed")))
        files[f"{MODDIR}/{spec.name}.ko.xz"] = module_bytes(spec, out, compress="xz")
    files[f"/boot/vmlinuz-{KVER}"] = b"kernel image\n"
    return files


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need("dpkg", "dpkg-deb", "dpkg-scanpackages", "apt-get", "depmod", "xz")
    out = tmp_path_factory.mktemp("debs")
    tampered_dir = out / "tampered"
    tampered_dir.mkdir()
    newer_dir = out / "newer"
    newer_dir.mkdir()
    return {
        "installed": build_deb(out, IMAGE, VERSION, _payload(out)),
        "tampered": build_deb(tampered_dir, IMAGE, VERSION, _payload(out, tampered=True)),
        "newer": build_deb(newer_dir, IMAGE, "1.0-2", _payload(out)),
    }


def publish(repo: Path, *debs: Path) -> None:
    """Make ``repo`` a flat apt archive holding exactly ``debs``."""
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    for deb in debs:
        shutil.copy(deb, repo / deb.name)
    sh("dpkg-scanpackages", "--multiversion", ".", "/dev/null", cwd=repo)
    packages = sh("dpkg-scanpackages", "--multiversion", ".", "/dev/null", cwd=repo).stdout
    (repo / "Packages").write_text(packages)


def apt_update(root: Path) -> None:
    sh("apt-get", "-q", "-o", f"Dir={root}", "update")


def make_root(base: Path, deb: Path, repo: Path, *, keep: str = "none",
              usrmerged: bool = False) -> Path:
    root = init_dpkg_root(base / "root")
    if usrmerged:
        (root / "usr/lib").mkdir(parents=True)
        (root / "lib").symlink_to("usr/lib")
    (root / "etc/kmodtrim").mkdir(parents=True)
    (root / "etc/kmodtrim/policy.toml").write_text(
        'presets = []\nclouds = []\ninitramfs = "skip"\n[min_observation]\nboots = 0\ndays = 0\n'
        f'[stash]\nkeep = "{keep}"\n')
    sh(*dpkg_command(root), "--install", deb)
    sh("depmod", "-b", root, KVER)
    (root / "observed").write_text("nic\n")
    for sub in ("etc/apt/sources.list.d", "etc/apt/preferences.d", "var/lib/apt/lists/partial",
                "var/cache/apt/archives/partial"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/sources.list").write_text(f"deb [trusted=yes] file:{repo} ./\n")
    apt_update(root)
    return root


def kmodtrim(root: Path, *args: str, fault: str | None = None
             ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KMODTRIM_FAULT"}
    if fault:
        env["KMODTRIM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "kmodtrim.cli", *args, "--root", str(root),
                           "--kernel", KVER, "--offline"], capture_output=True, text=True,
                          check=False, stdin=subprocess.DEVNULL, env=env)


def apply(root: Path) -> dict[str, Any]:
    proc = kmodtrim(root, "apply", "--yes", "--json", "--observed", str(root / "observed"))
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every module file and the kernel image → (sha256, mode, mtime)."""
    found = {}
    for top in ("lib", "usr/lib", "boot"):
        base = root / top
        if base.is_symlink() or not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("modules."):
                st = path.stat()
                found[str(path.relative_to(root))] = (
                    hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode & 0o7777,
                    st.st_mtime_ns)
    return found


def stray_files(root: Path) -> list[str]:
    """Temporaries or downloads an operation left behind."""
    left = [str(p) for p in root.rglob("*.kmodtrim-tmp")]
    left += [str(p) for p in root.rglob(".*.kmodtrim")]
    fetch = root / "var/lib/kmodtrim/fetch"
    if fetch.exists():
        left.append(str(fetch))
    return left


def stash_bytes(root: Path) -> int:
    stash = root / "var/lib/kmodtrim/stash"
    return sum(p.stat().st_size for p in stash.rglob("*") if p.is_file())


def present(root: Path, path: str) -> bool:
    return os.path.lexists(root / path.lstrip("/"))


@pytest.fixture
def repo(tmp_path: Path, debs: dict[str, Path]) -> Path:
    repo = tmp_path / "archive"
    publish(repo, debs["installed"])
    return repo


@pytest.mark.parametrize("usrmerged", [False, True], ids=["split", "usrmerged"])
def test_archive_served_files_keep_no_local_copy_and_come_back_byte_identical(
        tmp_path: Path, debs: dict[str, Path], repo: Path, usrmerged: bool) -> None:
    root = make_root(tmp_path, debs["installed"], repo, usrmerged=usrmerged)
    before = snapshot(root)
    doc = apply(root)
    generation = current_generation(root)
    assert {f.path.rsplit("/", 1)[-1] for f in generation.removed} == {
        "unused_a.ko.xz", "unused_b.ko.xz", "virtio_scsi.ko.xz"}
    assert {(f.source, f.package, f.version) for f in generation.removed} == {
        (Source.ARCHIVE, IMAGE, VERSION)}
    # The stash holds only the pack's manifest: no module bytes.
    tree_out = sum(f.size for f in generation.removed)
    assert stash_bytes(root) < 4096 < tree_out
    assert doc["tree_bytes_out"] == tree_out
    assert doc["net_freed_bytes"] == tree_out - doc["stash_growth_bytes"]
    status = json.loads(kmodtrim(root, "status", "--json").stdout)
    assert status["damaged"] == [] and status["net_freed_bytes"] == tree_out - status[
        "stash_bytes_on_disk"]

    # One module back: downloaded, checked, placed with its mode and mtime.
    proc = kmodtrim(root, "restore", "unused_a", "--yes")
    assert proc.returncode == 0, proc.stderr
    spelled = next(p for p in before if p.endswith("unused_a.ko.xz"))
    assert snapshot(root)[spelled] == before[spelled]

    proc = kmodtrim(root, "rollback", "0", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(root) == before
    assert DpkgBackend().verify(root, [IMAGE]) == []
    assert stray_files(root) == []

    # Forward again: the archive still serves that version, so still no local copies.
    proc = kmodtrim(root, "rollback", "1", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert {f.source for f in current_generation(root).removed} == {Source.ARCHIVE}
    assert stash_bytes(root) < 4096


def test_a_tampered_archive_is_refused_and_nothing_is_written(
        tmp_path: Path, debs: dict[str, Path], repo: Path) -> None:
    root = make_root(tmp_path, debs["installed"], repo)
    apply(root)
    trimmed = snapshot(root)
    # Someone replaces the package with another build under the same version and
    # publishes a matching index: apt accepts it ([trusted=yes]); dpkg's md5sums do not.
    publish(repo, debs["tampered"])
    apt_update(root)
    proc = kmodtrim(root, "rollback", "0", "--yes")
    assert proc.returncode == 1
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("kmodtrim: error:")]
    assert f"refusing {MODDIR}/unused_a.ko.xz from {IMAGE} {VERSION}: its md5 differs" in line
    assert snapshot(root) == trimmed
    assert current_generation(root).number == 1
    assert read_journal(root) is None
    assert stray_files(root) == []


def test_tampered_md5sums_are_refused(tmp_path: Path, debs: dict[str, Path],
                                      repo: Path) -> None:
    root = make_root(tmp_path, debs["installed"], repo)
    apply(root)
    trimmed = snapshot(root)
    sums = root / f"var/lib/dpkg/info/{IMAGE}.md5sums"
    lines = sums.read_text().splitlines()
    sums.write_text("".join(
        ("0" * 32 + ln[32:] if ln.endswith("unused_b.ko.xz") else ln) + "\n" for ln in lines))
    proc = kmodtrim(root, "restore", "unused_b", "--yes")
    assert proc.returncode == 1
    assert f"refusing {MODDIR}/unused_b.ko.xz" in proc.stderr
    assert snapshot(root) == trimmed and stray_files(root) == []
    # Without any md5sums entry the file is refused too, naming the package database.
    sums.write_text("".join(ln + "\n" for ln in lines if not ln.endswith("unused_b.ko.xz")))
    proc = kmodtrim(root, "restore", "unused_b", "--yes")
    assert proc.returncode == 1
    assert "the package database has no digest for it" in proc.stderr
    assert f"info/{IMAGE}.md5sums" in proc.stderr
    assert snapshot(root) == trimmed and stray_files(root) == []


def test_an_unreachable_archive_is_a_clear_error_and_nothing_is_lost(
        tmp_path: Path, debs: dict[str, Path], repo: Path) -> None:
    root = make_root(tmp_path, debs["installed"], repo)
    before = snapshot(root)
    apply(root)
    trimmed = snapshot(root)
    repo.rename(repo.with_name("gone"))
    proc = kmodtrim(root, "rollback", "0", "--yes")
    assert proc.returncode == 1
    assert f"the archive does not give {IMAGE} {VERSION}" in proc.stderr
    assert "nothing was written" in proc.stderr
    assert snapshot(root) == trimmed and stray_files(root) == []
    repo.with_name("gone").rename(repo)  # back online
    assert kmodtrim(root, "rollback", "0", "--yes").returncode == 0
    assert snapshot(root) == before


def test_status_verify_names_files_whose_version_the_archive_dropped_since(
        tmp_path: Path, debs: dict[str, Path], repo: Path) -> None:
    root = make_root(tmp_path, debs["installed"], repo)
    apply(root)
    assert kmodtrim(root, "status", "--verify").returncode == 0
    publish(repo, debs["newer"])  # a point release superseded the installed version
    apt_update(root)
    proc = kmodtrim(root, "status", "--verify", "--json")
    assert proc.returncode == 1
    [line] = json.loads(proc.stdout)["damaged"]
    assert line.endswith(f"(and 2 more) come back from the archive, which no longer serves "
                         f"{IMAGE} {VERSION}")


def test_a_version_the_archive_no_longer_serves_is_kept_in_the_stash(
        tmp_path: Path, debs: dict[str, Path]) -> None:
    repo = tmp_path / "archive"
    publish(repo, debs["newer"])  # the archive moved on to 1.0-2
    root = make_root(tmp_path, debs["installed"], repo)
    before = snapshot(root)
    apply(root)
    generation = current_generation(root)
    assert generation.removed and all(f.source is Source.STASH for f in generation.removed)
    # Stored as they are (.ko.xz): the stash grows by about the bytes out.
    assert stash_bytes(root) >= sum(f.size for f in generation.removed)
    shutil.rmtree(repo)
    assert kmodtrim(root, "rollback", "0", "--yes").returncode == 0
    assert snapshot(root) == before


def test_likely_keeps_local_copies_of_hotplug_drivers_only(
        tmp_path: Path, debs: dict[str, Path], repo: Path) -> None:
    root = make_root(tmp_path, debs["installed"], repo, keep="likely")
    apply(root)
    sources = {f.module: f.source for f in current_generation(root).removed}
    assert sources == {"virtio_scsi": Source.STASH, "unused_a": Source.ARCHIVE,
                       "unused_b": Source.ARCHIVE}


@pytest.mark.parametrize("step", ["after-fetch", "restore:1", "restore:2", "after-restore",
                                  "after-commit"])
def test_a_crash_during_an_archive_restore_leaves_no_stray_file(
        tmp_path: Path, debs: dict[str, Path], repo: Path, step: str) -> None:
    root = make_root(tmp_path, debs["installed"], repo)
    before = snapshot(root)
    apply(root)
    trimmed = snapshot(root)
    proc = kmodtrim(root, "rollback", "0", "--yes", fault=step)
    assert proc.returncode == -9, (step, proc.stderr)
    assert recover(root) is not None
    assert stray_files(root) == []
    assert snapshot(root) == (before if current_generation(root).number == 2 else trimmed)
    assert kmodtrim(root, "rollback", "0", "--yes").returncode == 0
    assert snapshot(root) == before
    assert stray_files(root) == []


def test_without_an_index_cache_trimmed_modules_are_read_from_the_archive(
        tmp_path: Path, debs: dict[str, Path], repo: Path) -> None:
    root = make_root(tmp_path, debs["installed"], repo)
    before = snapshot(root)
    apply(root)
    # No cached rows: the index reads the trimmed modules' metadata from the package
    # (downloaded once into a private temporary directory), so names still resolve.
    explained = json.loads(kmodtrim(root, "explain", "unused_b", "--json", "--no-cache").stdout)
    assert explained["status"] == "removed" and "trimmed" in explained["now"]
    proc = kmodtrim(root, "restore", "unused_b", "--yes", "--no-cache")
    assert proc.returncode == 0, proc.stderr
    for name in ("unused_a", "unused_b"):  # unused_b needs unused_a
        spelled = next(p for p in before if p.endswith(f"{name}.ko.xz"))
        assert snapshot(root)[spelled] == before[spelled]
    assert stray_files(root) == []
