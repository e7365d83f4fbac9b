"""Which package manager a root has, by name, from its database files alone: what a plan
needs to know (whether the archive may serve files) without loading any backend.
select.py turns the name into a backend."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError

BACKEND_NAMES = ("dpkg", "rpm", "none")
RPM_DB_DIRS = ("usr/lib/sysimage/rpm", "var/lib/rpm")
_RPM_DB_FILES = ("rpmdb.sqlite", "Packages", "Packages.db")


def rpm_db_dir(root: Path) -> str | None:
    """The in-root directory ("/var/lib/rpm", …) holding an rpm database, or None."""
    for rel in RPM_DB_DIRS:
        if any((root / rel / name).is_file() for name in _RPM_DB_FILES):
            return "/" + rel
    return None


def detected_name(root: Path) -> str:
    """"dpkg" if ROOT/var/lib/dpkg/status exists, else "rpm" if ROOT has an rpm database,
    else "none"."""
    if (root / "var/lib/dpkg/status").is_file():
        return "dpkg"
    if rpm_db_dir(root) is not None:
        return "rpm"
    return "none"


def checked_name(name: str) -> str:
    """``name`` if it is a backend's; raises InputError otherwise."""
    if name not in BACKEND_NAMES:
        raise InputError(f"unknown package backend {name!r}",
                         hint="use one of: auto, dpkg, rpm, none")
    return name


def resolved_name(root: Path, option: str) -> str:
    """The backend the ``backend`` option names (engine/exclusions.resolve_backend's
    ``.name``): ``auto`` the detected one, ``stash`` none. Raises InputError."""
    if option == "stash":
        return "none"
    return detected_name(root) if option == "auto" else checked_name(option)
