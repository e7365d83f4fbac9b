"""Build kmodtrim's .deb from this tree with dpkg-buildpackage (packaging/debian copied to
debian/), as a maintainer would; used by tests/test_packaging.py and the install tests."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from need import need

REPO = Path(__file__).resolve().parent.parent
DEBIAN = REPO / "packaging" / "debian"
BUILD_INPUTS = ("pyproject.toml", "README.md", "daemon/kmodtrim", "units", "config")

# A clean environment for package tools: no virtualenv or user-installed interpreter
# ahead of the distribution's python3 on PATH.
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def build_kmodtrim_deb(work: Path) -> Path:
    """kmodtrim_VERSION_all.deb built under ``work``; skips when build dependencies are
    missing (under CI=true a skip fails: scripts/setup installs them)."""
    need("dpkg-buildpackage", "dpkg-checkbuilddeps", path=SYSTEM_ENV["PATH"])
    tree = work / f"kmodtrim-{project_version()}"
    tree.mkdir()
    for name in BUILD_INPUTS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, tree / name)
    shutil.copytree(DEBIAN, tree / "debian")
    missing = subprocess.run(["dpkg-checkbuilddeps"], cwd=tree, capture_output=True,
                             text=True, env=SYSTEM_ENV, check=False)
    if missing.returncode != 0:
        pytest.skip(f"build dependencies missing: {missing.stderr.strip()}")
    env = {**SYSTEM_ENV, "HOME": str(work), "DEB_BUILD_OPTIONS": "nocheck"}
    proc = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=tree,
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    debs = list(work.glob("kmodtrim_*_all.deb"))
    assert len(debs) == 1, debs
    return debs[0]
