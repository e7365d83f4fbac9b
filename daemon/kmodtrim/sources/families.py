"""Which package managers have an archive family (sources/archive.py), declared here alone
and loaded on first use: deciding whether a plan may leave files to the archive must not
load the families' downloaders and payload readers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .archive import Family

# the backend name detect_backend gives a root → its family's module (under sources) and
# class. dnf runs with an install root inside the download directory, never ROOT: with
# ROOT it would write an rpm database under ROOT/root/.rpmdb (Debian's rpm keeps
# %_dbpath in the home directory).
FAMILY_CLASSES = {"dpkg": ("deb", "DebArchive"), "rpm": ("rpm", "RpmArchive")}
_MADE: dict[str, Any] = {}


def family_named(name: str) -> Family | None:
    """The archive family of the package manager ``name`` (None: it has none)."""
    where = FAMILY_CLASSES.get(name)
    if where is None:
        return None
    made = _MADE.get(name)
    if made is None:
        module, cls = where
        made = _MADE[name] = getattr(importlib.import_module(f"{__package__}.{module}"), cls)()
    family: Family = made
    return family
