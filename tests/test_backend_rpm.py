"""The rpm backend against the real rpm: tiny noarch kernel-like rpms in scratch roots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kmodtrim.backends.package import PackageManagerBusy, VerifyProblem
from kmodtrim.backends.rpm import (
    MACRO_FILE,
    RpmBackend,
    effective_netsharedpath,
    rpm_command,
    system_netsharedpath,
)
from kmodtrim.backends.select import detect_backend
from kmodtrim.errors import CommandError, InputError
from pkgbuild import (
    KVER,
    MODDIR,
    build_rpm,
    hold_lock,
    init_rpm_root,
    kernel_files,
    need,
    sh,
)

NAME = "kernel-test"
V1 = f"{NAME}-9.9.9-1.noarch"
V2 = f"{NAME}-9.9.9-2.noarch"
A, B, C = (f"{MODDIR}/{n}.ko" for n in "abc")


@pytest.fixture(scope="module")
def rpms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need("rpm", "rpmbuild")
    out = tmp_path_factory.mktemp("rpms")
    return {"v1": build_rpm(out, NAME, "9.9.9", "1", kernel_files("1")),
            "v2": build_rpm(out, NAME, "9.9.9", "2", kernel_files("2"))}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    need("rpm")
    return init_rpm_root(tmp_path / "root")


def rpm(root: Path, *args: str | Path) -> str:
    return sh(*rpm_command(root), *args).stdout


def present(root: Path, path: str) -> bool:
    return (root / path.lstrip("/")).exists()


def file_states(root: Path, package: str) -> dict[str, str]:
    out = rpm(root, "-q", "--qf", "[%{FILESTATES:fstate}\t%{FILENAMES}\n]", package)
    return {path: state for state, path in (ln.split("\t") for ln in out.splitlines())}


def trim(root: Path, backend: RpmBackend, path: str) -> None:
    backend.write_exclusions(root, {path})
    (root / path.lstrip("/")).unlink()


def test_verify_reports_trimmed_module_until_the_package_is_next_installed(
        root: Path, rpms: dict[str, Path]) -> None:
    # rpm keeps each file's state from install time: a file trimmed from an installed
    # package is "missing" to rpm -V until a reinstall/upgrade records it as net shared.
    backend = RpmBackend()
    rpm(root, "-i", rpms["v1"])
    assert backend.verify(root, [V1]) == []
    trim(root, backend, B)
    assert backend.verify(root, [V1]) == [VerifyProblem(B, "missing")]
    backend.reinstall(root, [V1], archives={V1: rpms["v1"]})
    assert not present(root, B)
    assert file_states(root, V1)[B] == "net shared"
    assert backend.verify(root, [V1]) == []
    (root / C.lstrip("/")).unlink()  # an untrimmed file going missing is still reported
    assert backend.verify(root, [V1]) == [VerifyProblem(C, "missing")]


def test_trimmed_path_not_written_on_install_reinstall_and_upgrade(
        root: Path, rpms: dict[str, Path]) -> None:
    backend = RpmBackend()
    backend.write_exclusions(root, {B})
    rpm(root, "-i", rpms["v1"])
    assert not present(root, B) and present(root, A)
    assert file_states(root, V1)[B] == "net shared"
    rpm(root, "--reinstall", rpms["v1"])
    assert not present(root, B)
    rpm(root, "-U", rpms["v2"])
    assert not present(root, B)
    assert (root / A.lstrip("/")).read_bytes().endswith(b"version 2\n")
    assert file_states(root, V2)[B] == "net shared"
    assert backend.verify(root, [V2]) == []


def test_lifting_macro_and_reinstalling_brings_module_back(root: Path,
                                                           rpms: dict[str, Path]) -> None:
    backend = RpmBackend()
    rpm(root, "-i", rpms["v1"])
    trim(root, backend, B)
    backend.write_exclusions(root, set())
    assert not (root / MACRO_FILE).exists()
    backend.reinstall(root, [V1], archives={V1: rpms["v1"]})
    assert (root / B.lstrip("/")).read_bytes() == kernel_files("1")[B]
    assert file_states(root, V1)[B] == "normal"
    assert backend.verify(root, [V1]) == []


def test_macro_merges_with_the_systems_netsharedpath(root: Path,
                                                     rpms: dict[str, Path]) -> None:
    # /etc/rpm/macros.* load in name order: "custom" before "kmodtrim"
    (root / "etc/rpm/macros.custom").write_text("%_netsharedpath /srv/nfs:/mnt/shared\n")
    backend = RpmBackend()
    backend.write_exclusions(root, {B})
    assert system_netsharedpath(root) == ["/srv/nfs", "/mnt/shared"]
    assert effective_netsharedpath(root) == ["/srv/nfs", "/mnt/shared", B, "/usr" + B]
    backend.write_exclusions(root, {A, B})  # rewriting does not fold our paths into "system"
    assert effective_netsharedpath(root) == ["/srv/nfs", "/mnt/shared", A, B,
                                             "/usr" + A, "/usr" + B]
    rpm(root, "-i", rpms["v1"])
    assert not present(root, A) and not present(root, B) and present(root, C)
    backend.write_exclusions(root, set())
    assert effective_netsharedpath(root) == ["/srv/nfs", "/mnt/shared"]


@pytest.mark.parametrize("later", ["macros", "macros.site"])
def test_later_macro_file_overriding_ours_is_an_error(root: Path, later: str) -> None:
    (root / "etc/rpm" / later).write_text("%_netsharedpath /srv/nfs\n")
    with pytest.raises(CommandError, match="overridden"):
        RpmBackend().write_exclusions(root, {B})
    (root / "etc/rpm" / later).write_text(
        "%_netsharedpath /srv/nfs:%{?_kmodtrim_netsharedpath}\n")
    RpmBackend().write_exclusions(root, {B})  # the documented fix works
    assert effective_netsharedpath(root) == ["/srv/nfs", B, "/usr" + B]


def test_exclusions_read_back_and_usrmerge_spelling_covered(root: Path) -> None:
    backend = RpmBackend()
    backend.write_exclusions(root, {A, "/usr" + B})
    assert backend.read_exclusions(root) == {A, "/usr" + B}
    assert set(effective_netsharedpath(root)) == {A, "/usr" + A, B, "/usr" + B}
    text = (root / MACRO_FILE).read_text()
    assert text.startswith("# Managed by kmodtrim")
    inode = (root / MACRO_FILE).stat().st_ino
    backend.write_exclusions(root, [A, "/usr" + B])
    assert (root / MACRO_FILE).stat().st_ino == inode


def test_long_exclusion_lists_survive_rpms_line_limit(root: Path) -> None:
    # rpm truncates macro-file lines at 16 KiB; a generic kernel trim lists thousands.
    paths = {f"/lib/modules/{KVER}/kernel/drivers/some/deep/dir/module_{i:05}.ko"
             for i in range(4000)}
    backend = RpmBackend()
    backend.write_exclusions(root, paths)
    assert max(len(ln) for ln in (root / MACRO_FILE).read_text().splitlines()) < 16000
    assert backend.read_exclusions(root) == paths
    effective = effective_netsharedpath(root)
    assert len(effective) == 8000
    assert set(effective) == paths | {"/usr" + p for p in paths}


def test_path_a_macro_cannot_hold_is_refused(root: Path) -> None:
    with pytest.raises(InputError, match="':'"):
        RpmBackend().write_exclusions(root, {"/lib/modules/x:y.ko"})
    assert not (root / MACRO_FILE).exists()


def test_percent_in_path_is_not_expanded(root: Path) -> None:
    odd = f"{MODDIR}/100%{{_lib}}.ko"
    RpmBackend().write_exclusions(root, {odd})
    assert odd in effective_netsharedpath(root)
    assert RpmBackend().read_exclusions(root) == {odd}


def test_owners_and_package_files(root: Path, rpms: dict[str, Path]) -> None:
    backend = RpmBackend()
    rpm(root, "-i", rpms["v1"])
    trim(root, backend, B)
    local = f"/lib/modules/{KVER}/extra/local.ko"
    (root / local.lstrip("/")).parent.mkdir(parents=True)
    (root / local.lstrip("/")).write_bytes(b"x")
    gone = f"/lib/modules/{KVER}/extra/gone.ko"
    assert backend.owners(root, [A, B, local, gone]) == {A: V1, B: V1, local: None, gone: None}
    files = backend.package_files(root, V1)
    assert {A, B, C, f"/boot/vmlinuz-{KVER}"} <= set(files)
    assert backend.package_files(root, NAME) == files
    with pytest.raises(InputError, match="not installed"):
        backend.package_files(root, "kernel-modules-extra")


def test_remove_packages_erases_the_package(root: Path, rpms: dict[str, Path]) -> None:
    backend = RpmBackend()
    rpm(root, "-i", rpms["v1"])
    backend.remove_packages(root, [V1])
    assert not present(root, A)
    assert backend.owners(root, [A]) == {A: None}
    with pytest.raises(CommandError, match="not installed"):
        backend.verify(root, [V1])


def test_wait_for_lock_times_out_while_rpm_is_locked(root: Path) -> None:
    holder = hold_lock(root / "var/lib/rpm/.rpm.lock")
    try:
        with pytest.raises(PackageManagerBusy, match=r"\.rpm\.lock"):
            RpmBackend().wait_for_lock(root, 0.3)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
    RpmBackend().wait_for_lock(root, 0.3)


def test_wait_for_lock_does_not_wait_for_the_dnf_it_runs_under(root: Path) -> None:
    pid_file = root / "var/lib/dnf/rpmdb_lock.pid"
    pid_file.parent.mkdir(parents=True)
    code = ("import sys; from pathlib import Path; from kmodtrim.backends.rpm import RpmBackend;"
            "RpmBackend().wait_for_lock(Path(sys.argv[1]), 120)")
    # As dnf does: its pid in the file while it runs the transaction (and its scriptlets).
    proc = subprocess.run(["sh", "-c", 'echo $$ > "$1"; shift; "$@"', "sh", str(pid_file),
                           sys.executable, "-c", code, str(root)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "PackageManagerBusy" in proc.stderr and "which kmodtrim runs under" in proc.stderr


def test_wait_for_lock_honours_a_live_dnf_lock(root: Path) -> None:
    pid_file = root / "var/lib/dnf/rpmdb_lock.pid"
    pid_file.parent.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        pid_file.write_text(str(sleeper.pid))
        with pytest.raises(PackageManagerBusy, match="dnf"):
            RpmBackend().wait_for_lock(root, 0.3)
    finally:
        sleeper.kill()
        sleeper.wait()
    RpmBackend().wait_for_lock(root, 0.3)  # a dead holder's file does not count


def test_detected_as_rpm_and_host_rpmdb_untouched(root: Path) -> None:
    assert detect_backend(root).name == "rpm"
    assert "--dbpath=/var/lib/rpm" in rpm_command(root)


# -- whole-package removal ----------------------------------------------------------------


def test_describe_refuse_remove_rebuild_reinstall(root: Path, tmp_path: Path,
                                                  rpms: dict[str, Path]) -> None:
    from kmodtrim.state.stash import Stash
    from kmodtrim.store import RemovedPackage

    backend = RpmBackend()
    extra = build_rpm(tmp_path, "extra-mods", "2.0", "1",
                      {f"{MODDIR}/x.ko": b"x module\n", "/usr/share/doc/extra-mods/README": b"r"},
                      fields=f"Epoch: 3\nRequires: {NAME} >= 9.9.9\nProvides: xmods = 2\n",
                      modes={f"{MODDIR}/x.ko": 0o600})
    rpm(root, "-i", "--nodeps", rpms["v1"], extra)
    pkg = "extra-mods-2.0-1.noarch"
    assert backend.package_state(root, pkg) == "installed"
    desc = backend.describe_package(root, pkg)
    assert (desc.version, desc.arch) == ("3:2.0-1", "noarch")
    deps = desc.metadata["dependencies"]
    assert deps["Requires"] == [f"{NAME} >= 9.9.9"] and deps["Provides"] == ["xmods = 2"]
    refusal = backend.removal_refusal(root, [V1])
    assert refusal is not None and "needed by (installed) extra-mods-3:2.0-1" in refusal
    assert backend.removal_refusal(root, [pkg]) is None

    stash = Stash(root)
    files = tuple(stash.put(p) for p in desc.paths if (root / p.lstrip("/")).is_file())
    record = RemovedPackage(desc.name, desc.version, desc.arch, "rpm", desc.metadata, files)
    before = rpm(root, "-q", "--dump", pkg)
    backend.remove_packages(root, [pkg])
    assert backend.package_state(root, pkg) == "not-installed"
    tree = tmp_path / "tree"
    for entry in files:
        stash.restore_to(entry, tree)
    built = backend.build_archive(record, tree, tmp_path / "control", tmp_path / "out")
    for query in ("--requires", "--provides", "--docfiles"):
        assert sh("rpm", "-qp", query, built).stdout == sh("rpm", "-qp", query, extra).stdout
    backend.install_archives(root, [built])
    # --dump: path size mtime digest mode owner group …: all as first installed
    assert rpm(root, "-q", "--dump", pkg) == before
    assert backend.verify(root, [pkg]) == []
