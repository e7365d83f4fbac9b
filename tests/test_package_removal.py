"""Whole-package removal with the real dpkg: a modules-extra package whose every module is
unneeded leaves through dpkg, comes back rebuilt from the stash (offline) when one of its
modules is restored, and a crash at any package step loses nothing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmodtrim.backends.dpkg import DpkgBackend, dpkg_command
from kmodtrim.backends.package import PackageManagerBusy, VerifyProblem
from kmodtrim.backends.rpm import RpmBackend, rpm_command
from kmodtrim.engine.packages import gone
from kmodtrim.errors import StashError
from kmodtrim.executor import recover
from kmodtrim.store import current_generation, read_journal
from modbuild import ModSpec, module_bytes
from pkgbuild import (
    MAINTAINER_SCRIPTS,
    build_deb,
    build_rpm,
    hold_lock,
    init_dpkg_root,
    init_rpm_root,
    install_shell,
    need,
    run_under_lock,
    small_tmpfs,
)

KVER = "9.9.9-test"
MODDIR = f"/lib/modules/{KVER}/kernel/drivers/test"
IMAGE = f"linux-image-{KVER}"
EXTRA = f"linux-modules-extra-{KVER}"
OTHER = f"linux-modules-other-{KVER}"
USER = "other-user"
SPECS = {
    IMAGE: (ModSpec("core", exports=("core_fn",)),
            ModSpec("nic", imports=("core_fn",), depends=("core",)),
            ModSpec("unused", exports=("unused_fn",))),
    EXTRA: (ModSpec("e_one", exports=("e_fn",)),
            ModSpec("e_two", imports=("e_fn",), depends=("e_one",)),
            ModSpec("e_three")),
    OTHER: (ModSpec("o_one"),),
}
E_ONE, E_TWO, E_THREE = (f"{MODDIR}/extra/{n}.ko" for n in ("e_one", "e_two", "e_three"))
EXTRA_DOC = f"/usr/share/doc/{EXTRA}/copyright"


def kmodtrim(root: Path, *args: str, fault: str | None = None
             ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KMODTRIM_FAULT"}
    if fault:
        env["KMODTRIM_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "kmodtrim.cli", *args, "--root", str(root),
                           "--kernel", KVER, "--offline"], capture_output=True, text=True,
                          check=False, stdin=subprocess.DEVNULL, env=env)


def dpkg(root: Path, *args: str, tool: str = "dpkg") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*dpkg_command(root, tool), *args], capture_output=True, text=True,
                          check=False, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and link the packages put under lib/, boot/ and usr/ → (sha256 or link
    target, mode)."""
    found = {}
    for top in ("lib", "boot", "usr"):
        for path in sorted((root / top).rglob("*")):
            if path.name.startswith("modules.") or (path.is_dir() and not path.is_symlink()):
                continue
            st = path.lstat()
            content = (os.readlink(path) if path.is_symlink()
                       else hashlib.sha256(path.read_bytes()).hexdigest())
            found[str(path.relative_to(root))] = (content, st.st_mode & 0o7777)
    return found


def installed_version(root: Path, package: str) -> str | None:
    done = dpkg(root, "--show", "--showformat=${db:Status-Abbrev}${Version}", package,
                tool="dpkg-query")
    if done.returncode != 0 or not done.stdout.startswith("ii "):
        return None
    return done.stdout[3:].strip()


def audit(root: Path) -> str:
    done = dpkg(root, "--audit")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def present(root: Path, path: str) -> bool:
    return os.path.lexists(root / path.lstrip("/"))


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    need("dpkg", "dpkg-deb", "depmod")
    out = tmp_path_factory.mktemp("debs")
    image = {f"{MODDIR}/{s.name}.ko": module_bytes(s, out) for s in SPECS[IMAGE]}
    image[f"/boot/vmlinuz-{KVER}"] = b"kernel image\n"
    image[f"/usr/share/doc/{IMAGE}/copyright"] = b"GPL-2\n"
    extra = {f"{MODDIR}/extra/{s.name}.ko": module_bytes(s, out) for s in SPECS[EXTRA]}
    extra[EXTRA_DOC] = b"GPL-2 extra\n"
    other = {f"{MODDIR}/other/{s.name}.ko": module_bytes(s, out) for s in SPECS[OTHER]}
    return {
        IMAGE: build_deb(out, IMAGE, "1.2-3", image),
        EXTRA: build_deb(out, EXTRA, "1.2-3", extra, fields=f"Depends: {IMAGE} (= 1.2-3)\n",
                         control={"shlibs": b"libextra 1 extra (>= 1)\n"},
                         modes={E_THREE: 0o600}),
        OTHER: build_deb(out, OTHER, "1", other),
        USER: build_deb(out, USER, "1", {f"/usr/share/{USER}/data": b"x\n"},
                        fields=f"Depends: {OTHER}\n"),
    }


@pytest.fixture
def root(tmp_path: Path, debs: dict[str, Path], request: pytest.FixtureRequest) -> Path:
    root = init_dpkg_root(tmp_path / "root")
    if getattr(request, "param", "split") == "usrmerged":
        # /lib is a link to usr/lib; the packages say /lib/…
        (root / "usr/lib").mkdir(parents=True)
        (root / "lib").symlink_to("usr/lib")
    (root / "etc/kmodtrim").mkdir(parents=True)
    (root / "etc/kmodtrim/policy.toml").write_text(
        'presets = []\nclouds = []\ninitramfs = "skip"\n[min_observation]\nboots = 0\ndays = 0\n')
    done = dpkg(root, "--install", *map(str, debs.values()))
    assert done.returncode == 0, done.stderr
    subprocess.run(["depmod", "-b", str(root), KVER], check=True)
    (root / "observed").write_text("nic\n")
    return root


def apply(root: Path, fault: str | None = None) -> subprocess.CompletedProcess[str]:
    return kmodtrim(root, "apply", "--yes", "--observed", str(root / "observed"), fault=fault)


@pytest.mark.parametrize("root", ["split", "usrmerged"], indirect=True)
def test_extra_package_leaves_whole_and_comes_back_offline(root: Path) -> None:
    backend = DpkgBackend()
    before = snapshot(root)
    proc = apply(root)
    assert proc.returncode == 0, proc.stderr
    assert f"removed package {EXTRA} 1.2-3 whole" in proc.stdout
    # OTHER's modules are all unneeded too, but USER depends on it: excluded file by file.
    assert f"package {OTHER} stays installed" in proc.stdout
    assert f"{USER} depends on {OTHER}" in proc.stdout
    assert installed_version(root, EXTRA) is None
    assert dpkg(root, "--status", EXTRA, tool="dpkg-query").returncode != 0
    assert not any(present(root, p) for p in (E_ONE, E_TWO, E_THREE, EXTRA_DOC))
    assert backend.verify(root, [IMAGE]) == [VerifyProblem(f"{MODDIR}/unused.ko", "missing")]
    assert backend.verify(root, [OTHER]) == [VerifyProblem(f"{MODDIR}/other/o_one.ko",
                                                           "missing")]
    assert audit(root) == ""
    generation = current_generation(root)
    assert generation.packages_removed == (EXTRA,)
    [record] = generation.packages
    assert (record.name, record.version, record.arch) == (EXTRA, "1.2-3", "all")
    assert {f.path for f in record.files} == {E_ONE, E_TWO, E_THREE, EXTRA_DOC}
    assert {c.module for c in record.control} == {"md5sums", "shlibs"}
    shown = json.loads(kmodtrim(root, "show", str(generation.number), "--json").stdout)
    assert [p["name"] for p in shown["packages_out"]] == [EXTRA]
    assert shown["packages_removed"] == [EXTRA]
    shown_text = kmodtrim(root, "show", str(generation.number)).stdout
    assert f"this generation removed package(s): {EXTRA}" in shown_text
    assert f"package out of the system: {EXTRA} 1.2-3 (4 files in the stash)" in shown_text

    # One module back: the package is rebuilt from the stash (no archive, no network) and
    # reinstalled with only that module; the others stay excluded.
    proc = kmodtrim(root, "restore", "e_three", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert f"reinstalled package {EXTRA} 1.2-3" in proc.stdout
    assert installed_version(root, EXTRA) == "1.2-3"
    assert present(root, E_THREE) and present(root, EXTRA_DOC)
    assert not present(root, E_ONE) and not present(root, E_TWO)
    assert backend.verify(root, [EXTRA]) == [VerifyProblem(E_ONE, "missing"),
                                             VerifyProblem(E_TWO, "missing")]
    assert current_generation(root).packages == ()
    restored = snapshot(root)
    for path in (E_THREE, EXTRA_DOC):
        assert restored[path.lstrip("/")] == before[path.lstrip("/")]
    assert dpkg(root, "--control-show", EXTRA, "shlibs", tool="dpkg-query").stdout == (
        "libextra 1 extra (>= 1)\n")
    assert audit(root) == ""

    proc = kmodtrim(root, "rollback", "0", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(root) == before
    assert backend.verify(root, [IMAGE, EXTRA, OTHER, USER]) == []
    assert backend.read_exclusions(root) == set()
    assert audit(root) == ""


@pytest.mark.parametrize("root", ["split", "usrmerged"], indirect=True)
def test_rollback_to_zero_reinstalls_a_removed_package(root: Path) -> None:
    before = snapshot(root)
    assert apply(root).returncode == 0
    assert installed_version(root, EXTRA) is None
    proc = kmodtrim(root, "rollback", "0", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert installed_version(root, EXTRA) == "1.2-3"
    assert snapshot(root) == before
    assert DpkgBackend().verify(root, [IMAGE, EXTRA, OTHER]) == []
    assert audit(root) == ""
    # Forward again: rolling back to generation 1 removes it again.
    proc = kmodtrim(root, "rollback", "1", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert installed_version(root, EXTRA) is None
    assert current_generation(root).packages_removed == (EXTRA,)


def test_policy_can_switch_whole_removal_off(root: Path) -> None:
    policy = root / "etc/kmodtrim/policy.toml"
    policy.write_text("remove_packages = false\n" + policy.read_text())
    proc = apply(root)
    assert proc.returncode == 0, proc.stderr
    assert installed_version(root, EXTRA) == "1.2-3"
    assert not present(root, E_ONE) and present(root, EXTRA_DOC)
    assert {p.path for p in DpkgBackend().verify(root, [EXTRA])} == {E_ONE, E_TWO, E_THREE}


@pytest.mark.parametrize("step", ["after-stash", "before-package-remove",
                                  "after-package-remove", "unlink:1", "after-unlink",
                                  "after-commit", "after-final-exclude"])
def test_crash_while_removing_a_package_loses_nothing(root: Path, step: str) -> None:
    before = snapshot(root)
    proc = apply(root, fault=step)
    assert proc.returncode == -9, (step, proc.stdout, proc.stderr)
    assert read_journal(root) is not None
    assert recover(root) is not None
    assert audit(root) == ""
    if current_generation(root).number == 0:
        assert snapshot(root) == before
        assert installed_version(root, EXTRA) == "1.2-3"
        assert DpkgBackend().verify(root, [IMAGE, EXTRA]) == []
    else:
        assert installed_version(root, EXTRA) is None
    proc = kmodtrim(root, "rollback", "0", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(root) == before
    assert DpkgBackend().verify(root, [IMAGE, EXTRA, OTHER]) == []
    assert audit(root) == ""


@pytest.mark.parametrize("step", ["after-restore", "before-package-reinstall",
                                  "after-package-reinstall", "after-commit"])
def test_crash_while_reinstalling_a_package_loses_nothing(root: Path, step: str) -> None:
    before = snapshot(root)
    assert apply(root).returncode == 0
    trimmed = snapshot(root)
    proc = kmodtrim(root, "restore", "e_three", "--yes", fault=step)
    assert proc.returncode == -9, (step, proc.stdout, proc.stderr)
    assert recover(root) is not None
    assert audit(root) == ""
    if current_generation(root).number == 1:
        assert snapshot(root) == trimmed
        assert installed_version(root, EXTRA) is None
    else:
        assert installed_version(root, EXTRA) == "1.2-3"
        assert present(root, E_THREE) and not present(root, E_ONE)
    proc = kmodtrim(root, "rollback", "0", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(root) == before
    assert DpkgBackend().verify(root, [IMAGE, EXTRA, OTHER]) == []
    assert audit(root) == ""


# -- dpkg itself killed part-way ---------------------------------------------------------
# A package with maintainer scripts, in a root with a shell, whose scripts SIGKILL dpkg
# (their parent) once when /kill-dpkg-in-SCRIPT exists: dpkg leaves the package
# half-installed or half-configured, as after a power cut.

SCRIPTED = f"linux-modules-scripted-{KVER}"
S_ONE = f"{MODDIR}/scripted/s_one.ko"


def _script(name: str) -> bytes:
    flag = f"/kill-dpkg-in-{name}"
    return (f"#!/bin/sh\nif [ -e {flag} ]; then rm -f {flag}; kill -9 $PPID; fi\n"
            f"echo {name} \"$@\" >> /var/log/scripts\nexit 0\n").encode()


@pytest.fixture
def scripted_root(tmp_path: Path, debs: dict[str, Path]) -> Path:
    install_shell(tmp_path / "root")
    out = tmp_path / "debs"
    out.mkdir()
    deb = build_deb(out, SCRIPTED, "2", {S_ONE: module_bytes(ModSpec("s_one"), out)},
                    control={n: _script(n) for n in MAINTAINER_SCRIPTS})
    root = init_dpkg_root(tmp_path / "root")
    (root / "etc/kmodtrim").mkdir(parents=True)
    (root / "etc/kmodtrim/policy.toml").write_text(
        'presets = []\nclouds = []\ninitramfs = "skip"\n[min_observation]\nboots = 0\ndays = 0\n')
    done = dpkg(root, "--install", str(debs[IMAGE]), str(deb))
    assert done.returncode == 0, done.stderr
    subprocess.run(["depmod", "-b", str(root), KVER], check=True)
    (root / "observed").write_text("nic\n")
    return root


def state(root: Path, package: str) -> str:
    return DpkgBackend().package_state(root, package)


def kill_dpkg_in(root: Path, script: str) -> None:
    (root / f"kill-dpkg-in-{script}").touch()


def test_scripts_run_and_a_removed_package_keeps_only_its_dpkg_record(
        scripted_root: Path) -> None:
    root = scripted_root
    before = snapshot(root)
    assert apply(root).returncode == 0
    # dpkg --remove (never --purge) keeps a package with a postrm as "config-files".
    assert state(root, SCRIPTED) == "config-files"
    assert not present(root, S_ONE)
    assert "prerm remove" in (root / "var/log/scripts").read_text()
    assert kmodtrim(root, "rollback", "0", "--yes").returncode == 0
    assert state(root, SCRIPTED) == "installed"
    assert (root / "var/log/scripts").read_text().splitlines()[-1].startswith("postinst")
    assert snapshot(root) == before
    assert DpkgBackend().verify(root, [IMAGE, SCRIPTED]) == []
    assert audit(root) == ""


def test_dpkg_killed_while_removing_is_undone(scripted_root: Path) -> None:
    root = scripted_root
    before = snapshot(root)
    kill_dpkg_in(root, "postrm")
    proc = apply(root)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "dpkg" in proc.stderr and "Traceback" not in proc.stderr
    assert state(root, SCRIPTED) == "installed", proc.stderr
    assert audit(root) == ""
    assert snapshot(root) == before
    assert current_generation(root).number == 0 and read_journal(root) is None


def test_kmodtrim_and_dpkg_killed_while_removing_recovers(scripted_root: Path) -> None:
    root = scripted_root
    before = snapshot(root)
    assert apply(root, fault="before-package-remove").returncode == -9
    kill_dpkg_in(root, "postrm")
    assert dpkg(root, "--remove", SCRIPTED).returncode != 0  # dpkg dies part-way
    assert state(root, SCRIPTED) == "half-installed"
    assert recover(root) is not None
    assert state(root, SCRIPTED) == "installed"
    assert audit(root) == ""
    assert snapshot(root) == before
    assert DpkgBackend().verify(root, [IMAGE, SCRIPTED]) == []


@pytest.mark.parametrize("script", ["preinst", "postinst"])
def test_dpkg_killed_while_reinstalling_is_undone(scripted_root: Path, script: str) -> None:
    root = scripted_root
    before = snapshot(root)
    assert apply(root).returncode == 0
    trimmed = snapshot(root)
    kill_dpkg_in(root, script)
    proc = kmodtrim(root, "restore", "s_one", "--yes")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert gone(state(root, SCRIPTED))
    assert audit(root) == ""
    assert snapshot(root) == trimmed
    assert current_generation(root).number == 1 and read_journal(root) is None
    assert kmodtrim(root, "rollback", "0", "--yes").returncode == 0
    assert snapshot(root) == before
    assert audit(root) == ""


@pytest.mark.parametrize("script", ["preinst", "postinst"])
def test_kmodtrim_and_dpkg_killed_while_reinstalling_recovers(scripted_root: Path,
                                                              script: str) -> None:
    root = scripted_root
    before = snapshot(root)
    assert apply(root).returncode == 0
    trimmed = snapshot(root)
    assert kmodtrim(root, "restore", "s_one", "--yes",
                    fault="before-package-reinstall").returncode == -9
    [archive] = (root / "var/lib/kmodtrim/rebuild").rglob("*.deb")
    kill_dpkg_in(root, script)
    assert dpkg(root, "--install", str(archive)).returncode != 0  # dpkg dies part-way
    assert state(root, SCRIPTED) in ("half-installed", "half-configured")
    assert recover(root) is not None
    assert gone(state(root, SCRIPTED))
    assert audit(root) == ""
    assert snapshot(root) == trimmed
    assert kmodtrim(root, "rollback", "0", "--yes").returncode == 0
    assert snapshot(root) == before
    assert DpkgBackend().verify(root, [IMAGE, SCRIPTED]) == []
    assert audit(root) == ""


# -- rpm -----------------------------------------------------------------------------------

R_IMAGE, R_EXTRA, R_OTHER, R_USER = ("kernel-core-test", "kernel-modules-extra-test",
                                     "kernel-modules-other-test", "other-user")
R_EXTRA_DOC = f"/usr/share/doc/{R_EXTRA}/README"


def rpm_q(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*rpm_command(root), *args], capture_output=True, text=True,
                          check=False, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def rpm_installed(root: Path, name: str) -> str | None:
    done = rpm_q(root, "-q", "--qf", "%{VERSION}-%{RELEASE}", name)
    return done.stdout if done.returncode == 0 else None


def nevra(name: str, vr: str) -> str:
    return f"{name}-{vr}.noarch"


def _rpm_script(name: str) -> str:
    """A scriptlet that logs, and SIGKILLs rpm (its parent) once when /kill-rpm-in-NAME
    exists."""
    flag = f"/kill-rpm-in-{name}"
    return (f"if [ -e {flag} ]; then rm -f {flag}; kill -9 $PPID; fi\n"
            f"echo {name} $1 >> /var/log/rpm-scripts")


@pytest.fixture
def rpm_root(tmp_path: Path) -> Path:
    need("rpm", "rpmbuild", "depmod")
    out = tmp_path / "rpms"
    out.mkdir()
    install_shell(tmp_path / "root")
    root = init_rpm_root(tmp_path / "root")
    image = {f"{MODDIR}/{s.name}.ko": module_bytes(s, out) for s in SPECS[IMAGE]}
    image[f"/boot/vmlinuz-{KVER}"] = b"kernel image\n"
    extra = {f"{MODDIR}/extra/{s.name}.ko": module_bytes(s, out) for s in SPECS[EXTRA]}
    extra[R_EXTRA_DOC] = b"extra modules\n"
    other = {f"{MODDIR}/other/{s.name}.ko": module_bytes(s, out) for s in SPECS[OTHER]}
    rpms = [
        build_rpm(out, R_IMAGE, "9.9.9", "1", image),
        build_rpm(out, R_EXTRA, "9.9.9", "2", extra,
                  fields=f"Epoch: 1\nRequires: {R_IMAGE} = 9.9.9-1\nProvides: extra-mods(x) = 3\n",
                  modes={E_THREE: 0o600},
                  scripts={name: _rpm_script(name) for name in ("post", "postun")}),
        build_rpm(out, R_OTHER, "9.9.9", "1", other),
        build_rpm(out, R_USER, "1", "1", {f"/usr/share/{R_USER}/data": b"x\n"},
                  fields=f"Requires: {R_OTHER}\n"),
    ]
    (root / "var/log").mkdir(parents=True, exist_ok=True)
    done = rpm_q(root, "-i", "--nodeps", *map(str, rpms))
    assert done.returncode == 0, done.stderr
    (root / "etc/kmodtrim").mkdir(parents=True)
    (root / "etc/kmodtrim/policy.toml").write_text(
        'presets = []\nclouds = []\ninitramfs = "skip"\n[min_observation]\nboots = 0\ndays = 0\n')
    subprocess.run(["depmod", "-b", str(root), KVER], check=True)
    (root / "observed").write_text("nic\n")
    return root


def test_rpm_extra_subpackage_leaves_whole_and_comes_back_offline(rpm_root: Path) -> None:
    root = rpm_root
    backend = RpmBackend()
    before = snapshot(root)
    extra = nevra(R_EXTRA, "9.9.9-2")
    proc = apply(root)
    assert proc.returncode == 0, proc.stderr
    assert f"removed package {extra} 1:9.9.9-2 whole (rpm)" in proc.stdout
    assert f"package {nevra(R_OTHER, '9.9.9-1')} stays installed" in proc.stdout
    assert rpm_installed(root, R_EXTRA) is None
    assert not any(present(root, p) for p in (E_ONE, E_TWO, E_THREE, R_EXTRA_DOC))
    assert "postun 0" in (root / "var/log/rpm-scripts").read_text()
    assert [p.path for p in backend.verify(root, [R_IMAGE])] == [f"{MODDIR}/unused.ko"]
    [record] = current_generation(root).packages
    assert {f.path for f in record.files} == {E_ONE, E_TWO, E_THREE, R_EXTRA_DOC}

    proc = kmodtrim(root, "restore", "e_three", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert rpm_installed(root, R_EXTRA) == "9.9.9-2"
    assert rpm_q(root, "-q", "--qf", "%{EPOCH}", R_EXTRA).stdout == "1"
    assert rpm_q(root, "-q", "--requires", R_EXTRA).stdout.count(f"{R_IMAGE} = 9.9.9-1") == 1
    assert "extra-mods(x) = 3" in rpm_q(root, "-q", "--provides", R_EXTRA).stdout
    assert "echo post" in rpm_q(root, "-q", "--scripts", R_EXTRA).stdout
    assert present(root, E_THREE) and present(root, R_EXTRA_DOC)
    assert not present(root, E_ONE) and not present(root, E_TWO)
    assert backend.verify(root, [R_EXTRA]) == []  # the trimmed ones are "net shared"
    restored = snapshot(root)
    for path in (E_THREE, R_EXTRA_DOC):
        assert restored[path.lstrip("/")] == before[path.lstrip("/")]

    proc = kmodtrim(root, "rollback", "0", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(root) == before
    assert rpm_installed(root, R_EXTRA) == "9.9.9-2"
    assert backend.verify(root, [R_IMAGE, R_EXTRA, R_OTHER, R_USER]) == []
    assert backend.read_exclusions(root) == set()


@pytest.mark.parametrize("step", ["before-package-remove", "after-package-remove",
                                  "after-unlink", "after-commit"])
def test_rpm_crash_while_removing_loses_nothing(rpm_root: Path, step: str) -> None:
    root = rpm_root
    before = snapshot(root)
    assert apply(root, fault=step).returncode == -9
    assert recover(root) is not None
    if current_generation(root).number == 0:
        assert snapshot(root) == before
        assert rpm_installed(root, R_EXTRA) == "9.9.9-2"
    else:
        assert rpm_installed(root, R_EXTRA) is None
    proc = kmodtrim(root, "rollback", "0", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(root) == before
    assert RpmBackend().verify(root, [R_IMAGE, R_EXTRA, R_OTHER]) == []


@pytest.mark.parametrize("step", ["before-package-reinstall", "after-package-reinstall"])
def test_rpm_crash_while_reinstalling_loses_nothing(rpm_root: Path, step: str) -> None:
    root = rpm_root
    before = snapshot(root)
    assert apply(root).returncode == 0
    trimmed = snapshot(root)
    assert kmodtrim(root, "restore", "e_three", "--yes", fault=step).returncode == -9
    assert recover(root) is not None
    assert snapshot(root) == trimmed
    assert rpm_installed(root, R_EXTRA) is None
    proc = kmodtrim(root, "rollback", "0", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(root) == before
    assert RpmBackend().verify(root, [R_IMAGE, R_EXTRA, R_OTHER]) == []


def test_rpm_killed_while_erasing_is_undone(rpm_root: Path) -> None:
    root = rpm_root
    before = snapshot(root)
    (root / "kill-rpm-in-postun").touch()
    proc = apply(root)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "rpm" in proc.stderr and "Traceback" not in proc.stderr
    assert rpm_installed(root, R_EXTRA) == "9.9.9-2"
    assert snapshot(root) == before
    assert current_generation(root).number == 0 and read_journal(root) is None
    assert RpmBackend().verify(root, [R_IMAGE, R_EXTRA, R_OTHER]) == []


def test_rpm_killed_while_reinstalling_is_undone(rpm_root: Path) -> None:
    root = rpm_root
    before = snapshot(root)
    assert apply(root).returncode == 0
    trimmed = snapshot(root)
    (root / "kill-rpm-in-post").touch()
    proc = kmodtrim(root, "restore", "e_three", "--yes")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert rpm_installed(root, R_EXTRA) is None
    assert snapshot(root) == trimmed
    assert current_generation(root).number == 1 and read_journal(root) is None
    assert kmodtrim(root, "rollback", "0", "--yes").returncode == 0
    assert snapshot(root) == before
    assert RpmBackend().verify(root, [R_IMAGE, R_EXTRA, R_OTHER]) == []


# -- dry run, a late switch, the package manager's lock, a full disk ---------------------


def test_dry_run_names_the_package_and_changes_nothing(root: Path) -> None:
    before = snapshot(root)
    proc = kmodtrim(root, "apply", "--dry-run", "--observed", str(root / "observed"))
    assert proc.returncode == 0, proc.stderr
    assert f"would remove package {EXTRA} 1.2-3 whole" in proc.stdout
    doc = json.loads(kmodtrim(root, "apply", "--dry-run", "--json",
                              "--observed", str(root / "observed")).stdout)
    assert doc["packages_removed"] == [EXTRA] and doc["generation"] is None
    assert snapshot(root) == before
    assert installed_version(root, EXTRA) == "1.2-3"


def test_switching_removal_on_later_removes_a_package_already_trimmed(root: Path) -> None:
    policy = root / "etc/kmodtrim/policy.toml"
    text = policy.read_text()
    policy.write_text("remove_packages = false\n" + text)
    assert apply(root).returncode == 0
    assert installed_version(root, EXTRA) == "1.2-3"
    policy.write_text(text)
    proc = apply(root)  # nothing left to trim file by file: only the package goes
    assert proc.returncode == 0, proc.stderr
    assert f"removed package {EXTRA} 1.2-3 whole" in proc.stdout
    assert installed_version(root, EXTRA) is None and not present(root, EXTRA_DOC)
    generation = current_generation(root)
    assert generation.stashed == () and generation.packages_removed == (EXTRA,)
    assert kmodtrim(root, "rollback", "0", "--yes").returncode == 0
    assert installed_version(root, EXTRA) == "1.2-3"
    assert DpkgBackend().verify(root, [IMAGE, EXTRA, OTHER]) == []


def _release(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(timeout=10)


def test_busy_package_manager_means_file_by_file_or_a_clean_failure(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kmodtrim import executor
    from kmodtrim.engine import packages
    from kmodtrim.operations import Target, load_index, make_plan_for

    monkeypatch.setattr(packages, "PM_CHECK_TIMEOUT", 0.3)
    monkeypatch.setattr(packages, "PM_LOCK_TIMEOUT", 0.3)
    target = Target(root=root, kernel=KVER, observed_files=(root / "observed",))
    holder = hold_lock(root / "var/lib/dpkg/lock-frontend")
    try:
        result = make_plan_for(target)
        outcome = executor.apply_plan(root, result.plan, result.index, result.evidence,
                                      result.policy, executor.Options(initramfs="skip"))
        assert any("dpkg is busy" in note and "file by file" in note
                   for note in outcome.notes), outcome.notes
        assert installed_version(root, EXTRA) == "1.2-3"
        assert not present(root, E_ONE) and present(root, EXTRA_DOC)
    finally:
        _release(holder)
    assert executor.rollback(root, 0, executor.Options(initramfs="skip")).generation
    result = make_plan_for(target)
    executor.apply_plan(root, result.plan, result.index, result.evidence, result.policy,
                        executor.Options(initramfs="skip"))
    assert installed_version(root, EXTRA) is None
    trimmed = snapshot(root)
    holder = hold_lock(root / "var/lib/dpkg/lock-frontend")
    try:
        index, _ = load_index(target)
        with pytest.raises(PackageManagerBusy, match="lock-frontend"):
            executor.restore_modules(root, ["e_three"], index,
                                     executor.Options(initramfs="skip"))
        assert snapshot(root) == trimmed and read_journal(root) is None
        assert installed_version(root, EXTRA) is None
    finally:
        _release(holder)
    index, _ = load_index(target)
    executor.restore_modules(root, ["e_three"], index, executor.Options(initramfs="skip"))
    assert installed_version(root, EXTRA) == "1.2-3" and present(root, E_THREE)


def test_a_hook_inside_the_dpkg_transaction_trims_file_by_file_without_waiting(
        root: Path) -> None:
    # As the postinst.d hook runs when no daemon takes the event: dpkg holds its lock
    # until the hook returns, so the package cannot go whole now.
    proc = run_under_lock(root / "var/lib/dpkg/lock", [
        sys.executable, "-m", "kmodtrim.cli", "apply", "--yes", "--observed",
        str(root / "observed"), "--root", str(root), "--kernel", KVER, "--offline"])
    assert proc.returncode == 0, proc.stderr
    assert "which kmodtrim runs under" in proc.stdout and "file by file" in proc.stdout
    assert "waited" not in proc.stdout
    assert installed_version(root, EXTRA) == "1.2-3"
    assert not present(root, E_ONE) and present(root, EXTRA_DOC)
    assert apply(root).returncode == 0  # later, outside the transaction: it goes whole
    assert installed_version(root, EXTRA) is None


@pytest.fixture
def small_state(root: Path) -> Iterator[Path]:
    """kmodtrim's state directory on a 256 KiB tmpfs."""
    with small_tmpfs(root / "var/lib/kmodtrim", "256k") as state:
        yield state


def fill(state: Path, leave: int) -> Path:
    """Fill the state file system but for ``leave`` bytes; returns the filler file."""
    filler = state / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 4096)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_full_disk_while_rebuilding_loses_nothing(root: Path, small_state: Path) -> None:
    before = snapshot(root)
    assert apply(root).returncode == 0
    trimmed = snapshot(root)
    filler = fill(small_state, 24 * 1024)  # room for the journal, not for the rebuild
    proc = kmodtrim(root, "restore", "e_three", "--yes")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "No space left on device" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert f"rebuild package {EXTRA}" in proc.stderr, proc.stderr
    assert snapshot(root) == trimmed
    assert installed_version(root, EXTRA) is None and read_journal(root) is None
    assert audit(root) == ""
    filler.unlink()
    proc = kmodtrim(root, "rollback", "0", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(root) == before
    assert DpkgBackend().verify(root, [IMAGE, EXTRA, OTHER]) == []


def test_full_disk_during_recovery_waits_for_space(root: Path, small_state: Path) -> None:
    before = snapshot(root)
    assert apply(root, fault="after-package-remove").returncode == -9
    filler = fill(small_state, 0)
    with pytest.raises(StashError, match=f"rebuild package {EXTRA}"):
        recover(root)
    assert read_journal(root) is not None  # still to do
    filler.unlink()
    assert recover(root) is not None
    assert snapshot(root) == before
    assert installed_version(root, EXTRA) == "1.2-3"
    assert audit(root) == ""


def test_rollback_with_the_plain_stash_still_reinstalls_removed_packages(root: Path) -> None:
    before = snapshot(root)
    assert apply(root).returncode == 0
    proc = kmodtrim(root, "rollback", "0", "--yes", "--backend", "stash")
    assert proc.returncode == 0, proc.stderr
    assert installed_version(root, EXTRA) == "1.2-3"
    assert snapshot(root) == before
    assert current_generation(root).packages == ()
    assert audit(root) == ""


def test_exclusions_are_undone_by_the_backend_that_wrote_them(root: Path) -> None:
    exclusions = root / "etc/dpkg/dpkg.cfg.d/kmodtrim"
    assert apply(root).returncode == 0
    assert "path-exclude=" in exclusions.read_text()
    # The policy (or --backend) no longer names dpkg: the state dpkg was told is still
    # taken back by dpkg, so a reinstall would not silently skip those modules.
    proc = kmodtrim(root, "rollback", "0", "--yes", "--backend", "stash")
    assert proc.returncode == 0, proc.stderr
    assert not exclusions.exists() or "path-exclude=" not in exclusions.read_text()


def test_a_package_installed_again_outside_kmodtrim_is_not_downgraded(
        root: Path, debs: dict[str, Path]) -> None:
    assert apply(root).returncode == 0
    # The admin installs it again: its trimmed modules stay out (path-exclude).
    assert dpkg(root, "--install", str(debs[EXTRA])).returncode == 0
    assert present(root, EXTRA_DOC) and not present(root, E_THREE)
    proc = kmodtrim(root, "restore", "e_three", "--yes")
    assert proc.returncode == 0, proc.stderr
    assert f"package {EXTRA} was installed again meanwhile" in proc.stdout
    assert "reinstalled package" not in proc.stdout
    assert current_generation(root).packages == ()
    assert present(root, E_THREE)
    assert DpkgBackend().verify(root, [EXTRA]) == [VerifyProblem(E_ONE, "missing"),
                                                   VerifyProblem(E_TWO, "missing")]


def test_canceled_after_the_removal_puts_the_package_back(root: Path) -> None:
    """The daemon cancels a job by raising from its progress callback; after the package
    step that means an undo that reinstalls the package."""
    from kmodtrim import executor
    from kmodtrim.operations import Target, make_plan_for

    class Canceled(Exception):
        pass

    steps: list[tuple[str, int, int]] = []

    def progress(step: str, done: int, total: int) -> None:
        steps.append((step, done, total))
        if step == "remove packages" and done == total:
            raise Canceled

    before = snapshot(root)
    result = make_plan_for(Target(root=root, kernel=KVER, observed_files=(root / "observed",)))
    with pytest.raises(Canceled):
        executor.apply_plan(root, result.plan, result.index, result.evidence, result.policy,
                            executor.Options(initramfs="skip", progress=progress))
    assert ("remove packages", 0, 1) in steps
    assert installed_version(root, EXTRA) == "1.2-3"
    assert snapshot(root) == before and read_journal(root) is None
    assert audit(root) == ""
