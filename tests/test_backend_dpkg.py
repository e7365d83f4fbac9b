"""The dpkg backend against the real dpkg: kernel-like .debs installed into scratch roots."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kmodtrim.backends.dpkg import EXCLUDE_FILE, DpkgBackend, dpkg_command
from kmodtrim.backends.package import (
    NoPackageBackend,
    PackageManagerBusy,
    VerifyProblem,
    parse_verify,
)
from kmodtrim.backends.select import backend_by_name, detect_backend
from kmodtrim.errors import InputError
from pkgbuild import (
    KVER,
    MODDIR,
    build_deb,
    hold_lock,
    init_dpkg_root,
    kernel_files,
    need,
    run_under_lock,
    sh,
)

PKG = f"linux-image-{KVER}"
A, B, C = (f"{MODDIR}/{n}.ko" for n in "abc")


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need("dpkg", "dpkg-deb")
    out = tmp_path_factory.mktemp("debs")
    return {
        "v1": build_deb(out, PKG, "1", kernel_files("1")),
        "v2": build_deb(out, PKG, "2", kernel_files("2")),
        "usr": build_deb(out, f"linux-image-{KVER}-usr", "1",
                         {k: v for k, v in kernel_files("1", prefix="/usr").items()
                          if "/modules/" in k}),
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return init_dpkg_root(tmp_path / "root")


def dpkg(root: Path, *args: str | Path) -> None:
    sh(*dpkg_command(root), *args)


def present(root: Path, path: str) -> bool:
    return (root / path.lstrip("/")).exists()


def trim(root: Path, backend: DpkgBackend, path: str) -> None:
    """What the executor does: exclusions first, then the file goes."""
    backend.write_exclusions(root, {path})
    (root / path.lstrip("/")).unlink()


def test_trimmed_module_is_the_only_thing_verify_reports(root: Path, debs: dict[str, Path]
                                                         ) -> None:
    backend = DpkgBackend()
    dpkg(root, "-i", debs["v1"])
    assert backend.verify(root, [PKG]) == []
    trim(root, backend, B)
    assert backend.verify(root, [PKG]) == [VerifyProblem(B, "missing")]


def test_trimmed_path_not_reinstalled_on_reinstall_of_same_version(
        root: Path, debs: dict[str, Path]) -> None:
    backend = DpkgBackend()
    dpkg(root, "-i", debs["v1"])
    trim(root, backend, B)
    dpkg(root, "-i", debs["v1"])
    assert not present(root, B)
    assert present(root, A) and present(root, C)
    assert backend.verify(root, [PKG]) == [VerifyProblem(B, "missing")]


def test_trimmed_path_not_reinstalled_on_upgrade(root: Path, debs: dict[str, Path]) -> None:
    backend = DpkgBackend()
    dpkg(root, "-i", debs["v1"])
    trim(root, backend, B)
    dpkg(root, "-i", debs["v2"])
    assert not present(root, B)
    assert (root / A.lstrip("/")).read_bytes().endswith(b"version 2\n")
    assert backend.verify(root, [PKG]) == [VerifyProblem(B, "missing")]


def test_lifting_exclusion_and_reinstalling_brings_module_back(
        root: Path, debs: dict[str, Path]) -> None:
    backend = DpkgBackend()
    dpkg(root, "-i", debs["v1"])
    trim(root, backend, B)
    backend.write_exclusions(root, set())
    assert not (root / EXCLUDE_FILE).exists()
    backend.reinstall(root, [PKG], archives={PKG: debs["v1"]})
    assert (root / B.lstrip("/")).read_bytes() == kernel_files("1")[B]
    assert backend.verify(root, [PKG]) == []


def test_owners_name_the_package_even_after_the_file_is_gone(
        root: Path, debs: dict[str, Path]) -> None:
    backend = DpkgBackend()
    dpkg(root, "-i", debs["v1"])
    trim(root, backend, B)
    unowned = f"/lib/modules/{KVER}/extra/local.ko"
    assert backend.owners(root, [A, B, unowned]) == {A: PKG, B: PKG, unowned: None}
    assert B in backend.package_files(root, PKG)
    assert f"/boot/vmlinuz-{KVER}" in backend.package_files(root, PKG)


def test_owners_follow_usrmerge_spelling_on_merged_root(root: Path,
                                                        debs: dict[str, Path]) -> None:
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    dpkg(root, "-i", debs["usr"])
    assert DpkgBackend().owners(root, [B]) == {B: f"linux-image-{KVER}-usr"}


def test_exclusion_covers_usrmerge_spelling(root: Path, debs: dict[str, Path]) -> None:
    backend = DpkgBackend()
    backend.write_exclusions(root, {B})  # spelled /lib/…, the package ships /usr/lib/…
    dpkg(root, "-i", debs["usr"])
    assert not present(root, "/usr" + B)
    assert present(root, "/usr" + A)
    assert backend.verify(root, [f"linux-image-{KVER}-usr"]) == [
        VerifyProblem("/usr" + B, "missing")]


def test_exclusion_file_lists_both_spellings_and_reads_back(root: Path) -> None:
    backend = DpkgBackend()
    backend.write_exclusions(root, {B, A})
    text = (root / EXCLUDE_FILE).read_text()
    assert text.startswith("# Managed by kmodtrim")
    excludes = [ln for ln in text.splitlines() if ln.startswith("path-exclude=")]
    assert excludes == [f"path-exclude={A}", f"path-exclude={B}",
                        f"path-exclude=/usr{A}", f"path-exclude=/usr{B}"]
    assert backend.read_exclusions(root) == {A, B}
    inode = (root / EXCLUDE_FILE).stat().st_ino
    backend.write_exclusions(root, [A, B])  # same set: file untouched
    assert (root / EXCLUDE_FILE).stat().st_ino == inode
    backend.write_exclusions(root, {"/usr" + A})
    assert backend.read_exclusions(root) == {"/usr" + A}
    backend.write_exclusions(root, set())
    assert not (root / EXCLUDE_FILE).exists()
    assert backend.read_exclusions(root) == set()
    assert [p.name for p in (root / EXCLUDE_FILE).parent.iterdir()] == []  # no temp files


def test_glob_metacharacters_in_paths_match_only_themselves(root: Path, tmp_path: Path) -> None:
    names = ("weird[1]?", "weird1x", "star*", "starry", "sp ace", "quo'te")
    files = {f"{MODDIR}/{n}.ko": n.encode() for n in names}
    deb = build_deb(tmp_path, "odd-names", "1", files)
    backend = DpkgBackend()
    excluded = {f"{MODDIR}/weird[1]?.ko", f"{MODDIR}/star*.ko", f"{MODDIR}/sp ace.ko",
                f"{MODDIR}/quo'te.ko"}
    backend.write_exclusions(root, excluded)
    assert backend.read_exclusions(root) == excluded
    dpkg(root, "-i", deb)
    installed = {p for p in files if present(root, p)}
    assert installed == {f"{MODDIR}/weird1x.ko", f"{MODDIR}/starry.ko"}


def test_path_dpkg_config_cannot_hold_is_refused(root: Path) -> None:
    with pytest.raises(InputError, match="not an absolute path"):
        DpkgBackend().write_exclusions(root, {"lib/modules/x.ko"})
    with pytest.raises(InputError, match="too long"):
        DpkgBackend().write_exclusions(root, {"/lib/" + "x" * 1100})
    assert not (root / EXCLUDE_FILE).exists()


def test_plain_dpkg_root_ignores_the_roots_own_config(root: Path, debs: dict[str, Path]) -> None:
    # The fact behind dpkg_command(): `dpkg --root` reads the host's /etc/dpkg, not ROOT's.
    DpkgBackend().write_exclusions(root, {B})
    sh("dpkg", f"--root={root}", "--log=/dev/null", "-i", debs["v1"])
    assert present(root, B)


def test_dpkg_reading_etc_dpkg_honours_the_file(root: Path, debs: dict[str, Path]) -> None:
    # The live case: our file *is* /etc/dpkg/dpkg.cfg.d/kmodtrim.  Shown in a private mount
    # namespace where ROOT/etc/dpkg is mounted over /etc/dpkg and plain dpkg is used.
    need("unshare")
    DpkgBackend().write_exclusions(root, {B})
    script = (f"mount --bind {root}/etc/dpkg /etc/dpkg && "
              f"exec dpkg --root={root} --log=/dev/null -i {debs['v1']}")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 and "dpkg" not in proc.stdout:
        pytest.skip(f"cannot make a private mount namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    assert present(root, A)
    assert not present(root, B)


def test_remove_packages_removes_the_package(root: Path, debs: dict[str, Path]) -> None:
    backend = DpkgBackend()
    dpkg(root, "-i", debs["v1"])
    backend.remove_packages(root, [PKG])
    assert not present(root, A)
    assert backend.owners(root, [A]) == {A: None}


@pytest.mark.parametrize("lock", ["lock-frontend", "lock"])
def test_wait_for_lock_times_out_while_dpkg_is_locked(root: Path, lock: str) -> None:
    path = root / "var/lib/dpkg" / lock
    path.touch()
    holder = hold_lock(path)
    try:
        start = time.monotonic()
        with pytest.raises(PackageManagerBusy, match=lock):
            DpkgBackend().wait_for_lock(root, 0.5)
        assert 0.4 < time.monotonic() - start < 5
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    DpkgBackend().wait_for_lock(root, 0.5)  # released: proceeds at once


_WAIT_FOR_LOCK = """
import sys
from pathlib import Path
from kmodtrim.backends.{module} import {backend}
from kmodtrim.backends.package import PackageManagerBusy
try:
    {backend}().wait_for_lock(Path(sys.argv[1]), 120)
except PackageManagerBusy as exc:
    sys.exit(str(exc))
"""


@pytest.mark.parametrize("lock", ["lock-frontend", "lock"])
def test_wait_for_lock_does_not_wait_for_the_transaction_it_runs_under(root: Path,
                                                                      lock: str) -> None:
    # A hook dpkg runs holds no lock itself, but dpkg (its parent) does until it returns.
    code = _WAIT_FOR_LOCK.format(module="dpkg", backend="DpkgBackend")
    proc = run_under_lock(root / "var/lib/dpkg" / lock, [sys.executable, "-c", code, str(root)])
    assert proc.returncode == 1
    assert lock in proc.stderr and "which kmodtrim runs under" in proc.stderr, proc.stderr


def test_wait_for_lock_proceeds_when_lock_released_meanwhile(root: Path) -> None:
    path = root / "var/lib/dpkg/lock-frontend"
    path.touch()
    holder = hold_lock(path)
    assert holder.stdin is not None
    release = threading.Timer(0.3, holder.stdin.close)
    release.start()
    try:
        start = time.monotonic()
        DpkgBackend().wait_for_lock(root, 10)
        assert 0.2 < time.monotonic() - start < 5
    finally:
        release.join()
        holder.wait(timeout=10)


def test_detect_backend_by_database(tmp_path: Path, root: Path) -> None:
    assert detect_backend(root).name == "dpkg"
    rpm_root = tmp_path / "rpmroot"
    (rpm_root / "usr/lib/sysimage/rpm").mkdir(parents=True)
    (rpm_root / "usr/lib/sysimage/rpm/rpmdb.sqlite").touch()
    assert detect_backend(rpm_root).name == "rpm"
    bare = tmp_path / "bare"
    bare.mkdir()
    none = detect_backend(bare)
    assert isinstance(none, NoPackageBackend)
    assert none.owners(bare, [A]) == {A: None}
    none.write_exclusions(bare, {A})
    assert list(bare.iterdir()) == []
    assert backend_by_name("dpkg").name == "dpkg"
    with pytest.raises(InputError, match="unknown package backend"):
        backend_by_name("pacman")


def test_commands_on_an_image_root_obey_all_of_its_dpkg_config(root: Path,
                                                               debs: dict[str, Path]) -> None:
    cfg = root / "etc/dpkg/dpkg.cfg.d"
    (cfg / "local").write_text('# site policy\npath-exclude "/boot/*"\n')
    (cfg / "ignored.conf").write_text(f"path-exclude={A}\n")  # dpkg skips names with dots
    DpkgBackend().write_exclusions(root, {B})
    dpkg(root, "-i", debs["v1"])
    assert not present(root, f"/boot/vmlinuz-{KVER}")
    assert not present(root, B)
    assert present(root, A) and present(root, C)
    assert (root / "var/log/dpkg.log").read_text().count(PKG) > 0  # logged inside the root


def test_verify_output_of_both_tools_parses() -> None:
    text = ("missing     /lib/modules/x/a.ko\n"
            "??5??????   /lib/modules/x/b.ko\n"
            "??5?????? c /etc/dpkg/x.conf\n"
            "S.5....T.  c /etc/rpm/y\n"
            "missing   d /usr/share/doc/z\n")
    assert parse_verify(text) == [
        VerifyProblem("/lib/modules/x/a.ko", "missing"),
        VerifyProblem("/lib/modules/x/b.ko", "??5??????"),
        VerifyProblem("/etc/dpkg/x.conf", "??5??????"),
        VerifyProblem("/etc/rpm/y", "S.5....T."),
        VerifyProblem("/usr/share/doc/z", "missing"),
    ]


# -- whole-package removal ----------------------------------------------------------------


def test_describe_refuse_remove_rebuild_reinstall(root: Path, tmp_path: Path,
                                                  debs: dict[str, Path]) -> None:
    from kmodtrim.state.stash import Stash
    from kmodtrim.store import RemovedPackage

    backend = DpkgBackend()
    extra = build_deb(tmp_path, "extra-mods", "2.0-1", {f"{MODDIR}/x.ko": b"x module\n"},
                      fields=f"Depends: {PKG}\nSection: kernel\n",
                      control={"shlibs": b"libx 1 extra-mods\n"})
    dpkg(root, "-i", debs["v1"], extra)
    assert backend.package_state(root, "extra-mods") == "installed"
    assert backend.package_state(root, "never-installed") == "not-installed"
    desc = backend.describe_package(root, "extra-mods")
    assert (desc.name, desc.version, desc.arch) == ("extra-mods", "2.0-1", "all")
    control = desc.metadata["control"]
    assert "Status:" not in control and f"Depends: {PKG}\n" in control
    assert control.endswith("Description: kernel-like test package\n with a long description\n"
                            " .\n over lines\n")
    assert set(desc.control) == {"md5sums", "shlibs"}
    assert f"{MODDIR}/x.ko" in desc.paths
    # The image package is needed by extra-mods: dpkg names the dependent.
    refusal = backend.removal_refusal(root, [PKG])
    assert refusal is not None and f"extra-mods depends on {PKG}" in refusal
    assert backend.removal_refusal(root, ["extra-mods"]) is None
    assert backend.removal_refusal(root, [PKG, "extra-mods"]) is None

    stash = Stash(root)
    files = tuple(stash.put(p) for p in desc.paths
                  if (root / p.lstrip("/")).is_file() and p != "/.")
    scripts = tuple(stash.put(path, kind="package-control", module=name)
                    for name, path in desc.control.items())
    record = RemovedPackage(desc.name, desc.version, desc.arch, "dpkg", desc.metadata,
                            files, scripts)
    backend.remove_packages(root, ["extra-mods"])
    assert backend.package_state(root, "extra-mods") == "not-installed"
    tree, ctl = tmp_path / "tree", tmp_path / "control"
    for entry in files:
        stash.restore_to(entry, tree)
    for entry in scripts:
        stash.restore_to(replace(entry, path=f"/{entry.module}"), ctl)
    deb = backend.build_archive(record, tree, ctl, tmp_path)
    fields = ("Package", "Version", "Architecture", "Maintainer", "Depends", "Section",
              "Description")
    original = sh("dpkg-deb", "--field", extra, *fields).stdout
    assert sh("dpkg-deb", "--field", deb, *fields).stdout == original  # order aside
    assert sh("dpkg-deb", "--info", deb, "shlibs").stdout == "libx 1 extra-mods\n"
    backend.install_archives(root, [deb])
    assert backend.package_state(root, "extra-mods") == "installed"
    assert (root / MODDIR.lstrip("/") / "x.ko").read_bytes() == b"x module\n"
    assert backend.verify(root, ["extra-mods"]) == []
