"""Which package-manager backend serves a root: the one module that knows every backend
(so package.py, the protocol they share, imports none of them)."""

from __future__ import annotations

from pathlib import Path

from .detect import checked_name, detected_name
from .dpkg import DpkgBackend
from .package import NoPackageBackend, PackageBackend
from .rpm import RpmBackend


def detect_backend(root: Path) -> PackageBackend:
    """dpkg if ROOT/var/lib/dpkg/status exists, else rpm if ROOT has an rpm database, else
    a backend whose operations do nothing (detect.detected_name)."""
    return backend_by_name(detected_name(root))


def backend_by_name(name: str) -> PackageBackend:
    """The backend called ``name`` ("dpkg", "rpm" or "none"); raises InputError otherwise."""
    if name == "dpkg":
        return DpkgBackend()
    if name == "rpm":
        return RpmBackend()
    checked_name(name)
    return NoPackageBackend()
