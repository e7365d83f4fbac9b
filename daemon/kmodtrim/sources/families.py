"""Which package managers have an archive family (sources/archive.py), declared here alone
and loaded on first use: deciding whether a plan may leave files to the archive must not
load the families' downloaders and payload readers."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the families' payload reader loads with a family, not before
    from .payload import DownloadLimits, Origin, Payload


class Family(Protocol):
    """One package manager's archive (deb.py, rpm.py)."""

    name: str

    def origins(self, root: Path, paths: Sequence[str]) -> dict[str, Origin]: ...
    def served(self, root: Path, wanted: Iterable[Origin]) -> set[Origin]: ...
    def download(self, root: Path, origin: Origin, directory: Path, first: str,
                 limits: DownloadLimits = ...) -> Path: ...
    def digests(self, root: Path, origin: Origin) -> tuple[str, dict[str, str]]: ...
    def record_name(self, origin: Origin) -> str: ...
    def payload(self, package_file: Path) -> Payload: ...


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
