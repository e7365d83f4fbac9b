"""Restore from the package archive on an rpm root, for real: a kernel-like noarch rpm
(rpmbuild) served by a local repository (createrepo_c, a ``file://`` baseurl), installed
with rpm into a scratch root whose own /etc/yum.repos.d names that repository. Deciding a
trim's sources under ``keep = "none"`` leaves what the repository serves to the archive;
a restore after the local copy is gone downloads the exact version with ``dnf download``
and checks each file against rpm's own file digests before it enters the tree. A tampered
repository and an unreachable one each fail with one line naming the file, writing
nothing to the tree, and dnf leaves nothing in the root."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from kmodtrim.errors import ArchiveError
from kmodtrim.records import StashedFile
from kmodtrim.sources.archive import family, origins, served
from kmodtrim.sources.decide import assign_sources
from kmodtrim.sources.payload import Origin
from kmodtrim.sources.restore import Restorer
from kmodtrim.takeout import PutRequest, Source
from pkgbuild import KVER, MODDIR, build_rpm, init_rpm_root, kernel_files, need, sh

NAME = "kernel-test"
NEVRA = f"{NAME}-1.0-1.noarch"
ORIGIN = Origin(NEVRA, "1.0-1")
MODULES = [f"{MODDIR}/{n}.ko" for n in ("a", "b", "c")]


@pytest.fixture(scope="module")
def rpms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need("rpm", "rpmbuild", "rpm2archive", "createrepo_c", "dnf")
    out = tmp_path_factory.mktemp("rpms")
    tampered = kernel_files("1.0-1")
    tampered[MODULES[0]] = b"\x7fELF a module, not what was installed\n"
    return {"installed": build_rpm(out / "installed", NAME, "1.0", "1", kernel_files("1.0-1")),
            "tampered": build_rpm(out / "tampered", NAME, "1.0", "1", tampered),
            "newer": build_rpm(out / "newer", NAME, "1.0", "2", kernel_files("1.0-2"))}


def publish(repo: Path, *rpms: Path) -> None:
    """Make ``repo`` an rpm repository holding exactly ``rpms``."""
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    for rpm in rpms:
        shutil.copy(rpm, repo / rpm.name)
    sh("createrepo_c", "--quiet", repo)


def point_at(root: Path, url: str) -> None:
    (root / "etc/yum.repos.d/test.repo").write_text(
        f"[test]\nname=test\nbaseurl={url}\nenabled=1\ngpgcheck=0\n")


@pytest.fixture
def repo(tmp_path: Path, rpms: dict[str, Path]) -> Path:
    repo = tmp_path / "repo"
    publish(repo, rpms["installed"])
    return repo


@pytest.fixture
def root(tmp_path: Path, rpms: dict[str, Path], repo: Path) -> Path:
    root = init_rpm_root(tmp_path / "root")
    (root / "etc/yum.repos.d").mkdir(parents=True)
    (root / "etc/os-release").write_text('NAME="Test"\nVERSION_ID="1"\n')
    point_at(root, f"file://{repo}")
    sh("rpm", f"--root={root}", "--dbpath=/var/lib/rpm", "--install", "--nodeps",
       rpms["installed"])
    return root


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` → its sha256 (or "dir"), leaving out the rpm
    database (rpm queries may touch its sqlite side files) and kmodtrim's state directory
    (where downloads go, dnf's install root and cache among them; swept by every
    operation)."""
    found = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if name.startswith(("var/lib/rpm", "var/lib/kmodtrim")):
            continue
        found[name] = ("dir" if path.is_dir() else
                       hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def take_out(root: Path) -> list[StashedFile]:
    """Remove the modules from the tree as a trim leaving them to the archive would,
    returning their records."""
    entries = []
    for path in MODULES:
        file = root / path.lstrip("/")
        st = file.stat()
        entries.append(StashedFile(
            path, st.st_size, hashlib.sha256(file.read_bytes()).hexdigest(),
            st.st_mode & 0o7777, st.st_uid, st.st_gid, st.st_mtime_ns, module=file.stem,
            kernel="9.9.9-test", package=NEVRA, source=Source.ARCHIVE, version="1.0-1"))
        file.unlink()
    return entries


def test_origins_are_the_installed_nevra_and_served_asks_the_roots_repositories(
        root: Path) -> None:
    before = tree(root)
    assert origins(root, [*MODULES, "/etc/os-release"]) == {p: ORIGIN for p in MODULES}
    gone = Origin(f"{NAME}-1.0-2.noarch", "1.0-2")
    assert served(root, {ORIGIN, gone}) == {ORIGIN}
    algorithm, sums = family(root).digests(root, ORIGIN)  # type: ignore[union-attr]
    assert algorithm == "sha256"
    assert sums[MODULES[0].lstrip("/")] == hashlib.sha256(
        (root / MODULES[0].lstrip("/")).read_bytes()).hexdigest()
    assert tree(root) == before  # dnf wrote nothing into the root


def test_a_trim_keeps_no_local_copy_of_what_the_repository_serves(root: Path) -> None:
    requests = [PutRequest(p, "module", Path(p).stem, "9.9.9-test") for p in MODULES]
    assigned = assign_sources(root, requests, keep="none", budget_mib=0, archive=True,
                              likely=lambda _: False)
    assert {(r.source, r.package, r.version) for r in assigned.requests} == {
        (Source.ARCHIVE, NEVRA, "1.0-1")}
    assert assigned.local_bytes == 0 < assigned.archive_bytes


def test_restore_after_the_local_copy_is_gone_is_byte_identical(root: Path) -> None:
    before = tree(root)
    stats = {p: os.stat(root / p.lstrip("/")) for p in MODULES}
    entries = take_out(root)
    with Restorer(root) as restorer:
        assert restorer.prepare(entries) == len(MODULES)
        for entry in entries:
            restorer.restore(entry)
    assert tree(root) == before  # every module back, and no download left behind
    for path, st in stats.items():
        now = os.stat(root / path.lstrip("/"))
        assert (now.st_mode, now.st_mtime_ns) == (st.st_mode, st.st_mtime_ns)


def refused(root: Path) -> str:
    """Take the modules out, then ask for them back: the one-line error, once it is
    checked that nothing was written to the tree."""
    entries = take_out(root)
    before = tree(root)
    with Restorer(root) as restorer, pytest.raises(ArchiveError) as raised:
        restorer.prepare(entries)
    assert tree(root) == before
    message: str = raised.value.message
    assert "\n" not in message
    return message


def test_a_tampered_package_is_refused_naming_the_file(
        root: Path, repo: Path, rpms: dict[str, Path]) -> None:
    publish(repo, rpms["tampered"])  # same NEVRA, other bytes, metadata regenerated
    message = refused(root)
    assert message.startswith(f"refusing {MODULES[0]} from {ORIGIN}: its sha256 differs")


@pytest.mark.parametrize("where", ["missing", "version-gone"])
def test_an_unreachable_repository_fails_clearly_and_loses_nothing(
        tmp_path: Path, root: Path, repo: Path, rpms: dict[str, Path], where: str) -> None:
    if where == "missing":
        point_at(root, f"file://{tmp_path / 'nowhere'}")
    else:
        publish(repo, rpms["newer"])
    assert served(root, {ORIGIN}) == set()
    message = refused(root)
    assert message.startswith(f"cannot restore {MODULES[0]}: the archive does not give "
                              f"{ORIGIN} (")
    assert message.endswith("nothing was written")


@pytest.fixture(scope="module")
def module_rpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernel-like rpm of real (gcc-built, xz-compressed) modules: a NIC and its core,
    kept for the observation; two unused modules the trim takes out."""
    from modbuild import ModSpec, module_bytes

    need("rpm", "rpmbuild", "createrepo_c", "dnf", "depmod", "xz")
    out = tmp_path_factory.mktemp("modrpm")
    specs = (ModSpec("core", exports=("core_fn",)),
             ModSpec("nic", imports=("core_fn",), depends=("core",)),
             ModSpec("unused_a", exports=("a_fn",)),
             ModSpec("unused_b", imports=("a_fn",), depends=("unused_a",)))
    files = {f"{MODDIR}/{s.name}.ko.xz": module_bytes(s, out, compress="xz") for s in specs}
    files[f"/boot/vmlinuz-{KVER}"] = b"kernel image\n"
    return build_rpm(out / "pkg", "kernel-mods", "1.0", "1", files)


def test_apply_restore_and_rollback_through_the_cli(tmp_path: Path, module_rpm: Path) -> None:
    """``kmodtrim apply`` on an rpm root leaves what the repository serves to it (no
    local copy), ``restore`` and ``rollback 0`` download and check it, byte-identical, and
    ``rpm -V`` is clean again."""
    from kmodtrim.backends.rpm import RpmBackend
    from kmodtrim.store import current_generation

    repo = tmp_path / "repo"
    publish(repo, module_rpm)
    root = init_rpm_root(tmp_path / "root")
    (root / "etc/yum.repos.d").mkdir(parents=True)
    (root / "etc/os-release").write_text('NAME="Test"\nVERSION_ID="1"\n')
    point_at(root, f"file://{repo}")
    sh("rpm", f"--root={root}", "--dbpath=/var/lib/rpm", "--install", "--nodeps", module_rpm)
    sh("depmod", "-b", root, KVER)
    (root / "etc/modprobe.d").mkdir(parents=True)  # as every system has it
    (root / "etc/kmodtrim").mkdir(parents=True)
    (root / "etc/kmodtrim/policy.toml").write_text(
        'presets = []\nclouds = []\ninitramfs = "skip"\n[min_observation]\nboots = 0\n'
        'days = 0\n[stash]\nkeep = "none"\n')
    (root / "observed").write_text("nic\n")
    before = tree(root)

    def kmodtrim(*args: str) -> str:
        import subprocess
        import sys

        proc = subprocess.run([sys.executable, "-m", "kmodtrim.cli", *args, "--root",
                               str(root), "--kernel", KVER, "--offline"],
                              capture_output=True, text=True, check=False,
                              stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    kmodtrim("apply", "--yes", "--observed", str(root / "observed"))
    removed = current_generation(root).removed
    assert {f.path.rsplit("/", 1)[-1] for f in removed} == {"unused_a.ko.xz",
                                                            "unused_b.ko.xz"}
    assert {(f.source, f.package, f.version) for f in removed} == {
        (Source.ARCHIVE, "kernel-mods-1.0-1.noarch", "1.0-1")}
    stash = root / "var/lib/kmodtrim/stash"
    assert sum(p.stat().st_size for p in stash.rglob("*") if p.is_file()) < 4096
    kmodtrim("restore", "unused_a", "--yes")
    assert (root / MODDIR.lstrip("/") / "unused_a.ko.xz").is_file()
    kmodtrim("rollback", "0", "--yes")
    after = {k: v for k, v in tree(root).items() if not k.startswith("var/cache")}
    assert after == before  # the caches kmodtrim keeps aside
    assert RpmBackend().verify(root, ["kernel-mods"]) == []
    assert not (root / "var/lib/kmodtrim/fetch").exists()


def test_releasever_comes_from_the_roots_own_os_release(tmp_path: Path) -> None:
    """An image's /etc/os-release is usually a link to /usr/lib/os-release: absolute, so
    it is resolved inside the root (read through the host, it named the host's release)."""
    from kmodtrim.sources.rpm import dnf_command

    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/os-release").write_text('NAME="Image"\nVERSION_ID="7.4"\n')
    (root / "etc/os-release").symlink_to("/usr/lib/os-release")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    assert "--releasever=7.4" in dnf_command(root, scratch)
    (root / "usr/lib/os-release").write_text('NAME="Image"\n')
    assert not any(a.startswith("--releasever") for a in dnf_command(root, scratch))
