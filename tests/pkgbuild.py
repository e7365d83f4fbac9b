"""Build small kernel-like packages with the real tools (dpkg-deb, rpmbuild) and prepare
scratch roots with an empty package database, for the package-manager backend tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from need import need as need  # re-exported: the package tests import it from here

KVER = "9.9.9-test"
MODDIR = f"/lib/modules/{KVER}/kernel/drivers"


def sh(*argv: str | Path, cwd: Path | None = None,
       env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a test-side command (never the code under test), failing loudly. The
    environment is a plain PATH and the C locale unless ``env`` is given."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, check=False, cwd=cwd,
                          env=env or {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    if proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def kernel_files(version: str, prefix: str = "", names: tuple[str, ...] = ("a", "b", "c"),
                 ) -> dict[str, bytes]:
    """A kernel package's payload: DIR/{a,b,c}.ko whose bytes name the package version,
    plus /boot/vmlinuz (``prefix`` "/usr" gives the usrmerged /usr/lib/modules spelling)."""
    files = {f"{prefix}{MODDIR}/{n}.ko": f"\x7fELF {n} module, version {version}\n".encode()
             for n in names}
    files[f"/boot/vmlinuz-{KVER}"] = f"kernel image {version}\n".encode()
    return files


def _write_tree(base: Path, files: Mapping[str, bytes]) -> None:
    for path, data in files.items():
        target = base / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def build_deb(out: Path, package: str, version: str, files: Mapping[str, bytes], *,
              fields: str = "", control: Mapping[str, bytes] | None = None,
              modes: Mapping[str, int] | None = None) -> Path:
    """A .deb (no maintainer scripts) installing ``files``, built with dpkg-deb; ``fields``
    are extra control lines ("Depends: x\n"), ``control`` extra control files (shlibs, …),
    ``modes`` file modes other than 0644."""
    tree = out / f"{package}_{version}.tree"
    _write_tree(tree, files)
    for path, mode in (modes or {}).items():
        (tree / path.lstrip("/")).chmod(mode)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN/control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: all\n"
        f"Maintainer: Test <test@example.org>\n{fields}"
        "Description: kernel-like test package\n with a long description\n .\n over lines\n")
    for name, data in (control or {}).items():
        (tree / "DEBIAN" / name).write_bytes(data)
        if name in MAINTAINER_SCRIPTS:
            (tree / "DEBIAN" / name).chmod(0o755)
    deb = out / f"{package}_{version}_all.deb"
    sh("dpkg-deb", "--root-owner-group", "-Zgzip", "--build", tree, deb)
    return deb


MAINTAINER_SCRIPTS = ("preinst", "postinst", "prerm", "postrm")


def install_shell(root: Path) -> None:
    """Put the host's busybox (with the libraries it links) into ``root`` as /bin/sh and
    /bin/rm, so dpkg can run maintainer scripts there (it chroots into ROOT to run them).
    Skips the calling test without busybox or ldd."""
    need("busybox", "ldd")
    busybox = Path(shutil.which("busybox") or "busybox").resolve()
    files = [(busybox, "/bin/busybox")]
    (root / "bin").mkdir(parents=True, exist_ok=True)
    for applet in ("sh", "rm"):
        (root / "bin" / applet).symlink_to("busybox")
    for line in sh("ldd", busybox).stdout.splitlines():
        words = line.split()
        lib = words[2] if "=>" in words and len(words) > 2 else words[0]
        if lib.startswith("/"):
            files.append((Path(lib), lib))
    for source, dest in files:
        target = root / dest.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def init_dpkg_root(root: Path) -> Path:
    """An empty dpkg database (and /var/log for dpkg's log) under ``root``."""
    admin = root / "var/lib/dpkg"
    for sub in ("info", "updates", "triggers"):
        (admin / sub).mkdir(parents=True, exist_ok=True)
    for name in ("status", "available"):
        (admin / name).touch()
    (root / "var/log").mkdir(parents=True, exist_ok=True)
    (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    return root


def build_rpm(out: Path, name: str, version: str, release: str,
              files: Mapping[str, bytes], *, fields: str = "",
              modes: Mapping[str, int] | None = None,
              scripts: Mapping[str, str] | None = None) -> Path:
    """A noarch .rpm installing ``files``, built with rpmbuild entirely under ``out``;
    ``fields`` are extra spec preamble lines ("Requires: x\n"), ``modes`` file modes
    other than 0644, ``scripts`` scriptlets by section ("post": "echo hi")."""
    top = out / "rpmbuild"
    src = out / f"{name}-{version}-{release}.payload"
    _write_tree(src, files)
    for path, mode in (modes or {}).items():
        (src / path.lstrip("/")).chmod(mode)
    (top / "SPECS").mkdir(parents=True, exist_ok=True)
    spec = top / "SPECS" / f"{name}-{version}-{release}.spec"
    listing = "\n".join(sorted(files))
    spec.write_text(
        f"Name: {name}\nVersion: {version}\nRelease: {release}\nSummary: kernel-like test\n"
        f"License: GPL-2.0-only\nBuildArch: noarch\nAutoReqProv: no\n{fields}"
        "%description\nkernel-like test package\n"
        f"%install\nmkdir -p %{{buildroot}}\ncp -a {src}/. %{{buildroot}}/\n"
        + "".join(f"%{section}\n{body}\n" for section, body in (scripts or {}).items())
        + f"%files\n{listing}\n")
    (out / "tmp").mkdir(exist_ok=True)
    (out / "builddb").mkdir(exist_ok=True)
    # rpmbuild opens an rpm database; keep it here, not in the default (~/.rpmdb on Debian)
    sh("rpmbuild", "--define", f"_topdir {top}", "--define", f"_tmppath {out / 'tmp'}",
       "--define", f"_dbpath {out / 'builddb'}",
       "--define", "_build_id_links none", "--define", "__os_install_post %{nil}",
       "-bb", spec)
    rpms = sorted((top / "RPMS" / "noarch").glob(f"{name}-{version}-{release}.noarch.rpm"))
    assert len(rpms) == 1, rpms
    return rpms[0]


def init_rpm_root(root: Path) -> Path:
    """An empty rpm database at ROOT/var/lib/rpm (never the invoking user's ~/.rpmdb)."""
    (root / "var/lib/rpm").mkdir(parents=True, exist_ok=True)
    (root / "etc/rpm").mkdir(parents=True, exist_ok=True)
    (root / "var/tmp").mkdir(parents=True, exist_ok=True)
    sh("rpm", f"--root={root}", "--dbpath=/var/lib/rpm", "--initdb")
    return root


@contextmanager
def small_tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (as mount's size=) on ``directory`` (created if absent), for
    running out of disk space; skips the test where mounting is not allowed."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                              str(directory)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=False)


def run_under_lock(path: Path, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as the child of a process holding an fcntl write lock on ``path``, as
    dpkg runs its hooks while holding its own lock."""
    path.touch()
    code = ("import fcntl,subprocess,sys; f=open(sys.argv[1],'r+'); "
            "fcntl.lockf(f, fcntl.LOCK_EX); sys.exit(subprocess.run(sys.argv[2:]).returncode)")
    return subprocess.run([sys.executable, "-c", code, str(path), *argv], capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL)


def hold_lock(path: Path) -> subprocess.Popen[str]:
    """Another process holding an fcntl write lock on ``path`` (created if absent), as
    dpkg, apt and rpm take theirs, until its stdin is closed."""
    path.touch()
    code = ("import fcntl,sys; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder
