"""Clean Debian roots for install tests: ``debootstrap --variant=minbase`` of a release,
built once and cached beside the kernels (.cache/roots/SUITE-minbase, a ``.partial``
directory renamed when complete, a lock file against concurrent sessions), and a chroot
in which ``apt-get`` installs from that release's own archive on deb.debian.org.

Each test works on a copy (``cp -a --reflink=auto``); downloaded packages are kept in
.cache/roots/SUITE-apt (copied in before and back after), so only the first run fetches
python3-pydantic and the rest. The package lists are refreshed in the cached root at most
once a day. Nothing is mounted: apt, dpkg and Python need no /proc for this.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from kernels import cache_lock, kernel_cache_dir
from need import need
from pkgbuild import sh

MIRROR = "http://deb.debian.org/debian"
SUITES = {"bookworm": "12", "trixie": "13"}
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
              "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
LISTS_MAX_AGE = 24 * 3600


def debootstrap(suite: str, target: Path, include: tuple[str, ...] = ()) -> None:
    """``debootstrap --variant=minbase`` of ``suite`` (with ``include``) into ``target``,
    removed again when it fails; with KMODTRIM_TEST_OFFLINE set, a failure skips."""
    shutil.rmtree(target, ignore_errors=True)
    extra = [f"--include={','.join(include)}"] if include else []
    try:
        sh("debootstrap", "--variant=minbase", *extra, suite, target, MIRROR)
    except AssertionError:
        shutil.rmtree(target, ignore_errors=True)
        if os.environ.get("KMODTRIM_TEST_OFFLINE", "") not in ("", "0"):
            pytest.skip(f"cannot debootstrap {suite} offline")
        raise


def need_root_tools() -> None:
    need("debootstrap", "chroot", root=True)


def roots_cache() -> Path:
    return kernel_cache_dir().parent / "roots"


def minbase(suite: str) -> Path:
    """The cached minbase root of ``suite`` with fresh package lists."""
    cache = roots_cache()
    base = cache / f"{suite}-minbase"
    with cache_lock(cache):
        if not (base / "etc/os-release").exists():
            partial = cache / f"{suite}-minbase.partial"
            debootstrap(suite, partial)
            # No service starts inside a chroot.
            policy = partial / "usr/sbin/policy-rc.d"
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            partial.rename(base)
        stamp = base / "var/lib/apt/lists/.kmodtrim-updated"
        if not stamp.exists() or time.time() - stamp.stat().st_mtime > LISTS_MAX_AGE:
            chroot(base, "apt-get", "update", "-qq")
            stamp.touch()
    return base


def chroot(root: Path, *argv: str, check: bool = True,
           timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside ``root`` (a clean environment, no input)."""
    proc = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=CHROOT_ENV, timeout=timeout,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} in {root.name} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


@contextmanager
def scratch_copy(suite: str, dest: Path) -> Iterator[Path]:
    """A copy of the cached root at ``dest`` whose apt cache holds the packages earlier
    runs downloaded; what this run downloads is kept for the next. Removed afterwards."""
    base = minbase(suite)
    apt_cache = roots_cache() / f"{suite}-apt"
    apt_cache.mkdir(parents=True, exist_ok=True)
    for stale in apt_cache.glob(".*.part"):  # left by an interrupted run
        stale.unlink()
    sh("cp", "-a", "--reflink=auto", f"{base}/.", dest)
    archives = dest / "var/cache/apt/archives"
    try:
        for deb in apt_cache.glob("*.deb"):
            shutil.copy2(deb, archives / deb.name)
        yield dest
        for deb in archives.glob("*.deb"):
            if not (apt_cache / deb.name).exists():
                shutil.copy2(deb, apt_cache / f".{deb.name}.part")
                os.replace(apt_cache / f".{deb.name}.part", apt_cache / deb.name)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def apt_install(root: Path, *packages: str, options: Sequence[str] = ()
                ) -> subprocess.CompletedProcess[str]:
    """``apt-get install -y PACKAGES`` inside ``root``."""
    return chroot(root, "apt-get", "install", "-y", "-q", *options, *packages)
