"""Which package-manager backend serves a root: the one module that knows every backend
(so package.py, the protocol they share, imports none of them)."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .dpkg import DpkgBackend
from .package import NoPackageBackend, PackageBackend, rpm_db_dir
from .rpm import RpmBackend

BACKEND_NAMES = ("dpkg", "rpm", "none")


def detect_backend(root: Path) -> PackageBackend:
    """dpkg if ROOT/var/lib/dpkg/status exists, else rpm if ROOT has an rpm database, else
    a backend whose operations do nothing."""
    if (root / "var/lib/dpkg/status").is_file():
        return backend_by_name("dpkg")
    if rpm_db_dir(root) is not None:
        return backend_by_name("rpm")
    return NoPackageBackend()


def backend_by_name(name: str) -> PackageBackend:
    """The backend called ``name`` ("dpkg", "rpm" or "none"); raises InputError otherwise."""
    if name == "dpkg":
        return DpkgBackend()
    if name == "rpm":
        return RpmBackend()
    if name == "none":
        return NoPackageBackend()
    raise InputError(f"unknown package backend {name!r}",
                     hint="use one of: auto, dpkg, rpm, none")
