"""The package archive as a restore source: a trimmed file whose package the archive serves
at exactly its installed version need not be kept locally.

- At trim time, ``origins`` names each file's owning package and installed version (the
  package database) and ``served`` asks the package manager whether the archive still has
  that exact version (its own metadata, no download).
- At restore, ``fetch`` downloads each package once with the package manager's own
  downloader (so the archive's signatures and hashes are checked as for any install) into
  a private directory, takes the wanted files out of its payload, and checks each against
  the package database's own record of that file (dpkg's md5sums, rpm's file digests) and
  against the sha256 kmodtrim recorded when it took the file out. Only then may a file
  enter the tree.

A family per package manager (deb.py: apt and dpkg; rpm.py: dnf and rpm), chosen by the
root's package database; a root without one keeps every file locally. Each family names
the digest algorithm of its record (md5 for dpkg, rpm's FILEDIGESTALGO: sha256 normally).
Any failure — archive unreachable, version gone, a digest that differs, no
record of the file — is an ArchiveError naming the file, raised before anything is
written to the tree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..backends.package import other_spelling
from ..backends.select import detect_backend
from ..errors import ArchiveError
from ..records import StashedFile
from ..state.files import state_dir
from .families import Family, family_named
from .payload import DEFAULT_DOWNLOAD, DownloadLimits, Origin, extract

__all__ = ["Origin", "fetch", "fetch_dir", "origins", "served"]


def family(root: Path) -> Family | None:
    """The archive family of ``root``'s package manager (None without one; families.py
    says which have one)."""
    return family_named(detect_backend(root).name)


def fetch_dir(root: Path) -> Path:
    """Where downloads of a restore in progress live (swept after every operation)."""
    return state_dir(root) / "fetch"


def origins(root: Path, paths: Sequence[str]) -> dict[str, Origin]:
    """The owning package and installed version of each of ``paths`` the package database
    lists (paths no installed package owns are left out)."""
    archive = family(root)
    return archive.origins(root, paths) if archive is not None else {}


def served(root: Path, wanted: Iterable[Origin]) -> set[Origin]:
    """The origins the archive serves at exactly that version, by the package manager's
    metadata for ``root`` (none without a package manager or its downloader)."""
    archive = family(root)
    return archive.served(root, wanted) if archive is not None else set()


def fetch(root: Path, entries: Sequence[StashedFile], work: Path,
          limits: DownloadLimits = DEFAULT_DOWNLOAD) -> dict[str, Path]:
    """Download the packages of ``entries`` (each once, each within ``limits``) into
    ``work``, take their files out and verify them; returns each entry's path → its
    verified copy under ``work``. Raises ArchiveError naming the first file that cannot
    come back this way."""
    by_origin: dict[Origin, list[StashedFile]] = {}
    for entry in entries:
        if entry.package is None or entry.version is None:
            raise ArchiveError(f"cannot fetch {entry.path}: its record names no package "
                               "version")
        by_origin.setdefault(Origin(entry.package, entry.version), []).append(entry)
    archive = family(root)
    if archive is None and by_origin:
        first = next(iter(by_origin.values()))[0]
        raise ArchiveError(f"cannot restore {first.path}: the root has no package manager "
                           "to fetch it with")
    out: dict[str, Path] = {}
    for n, (origin, wanted) in enumerate(sorted(by_origin.items(), key=lambda i: str(i[0]))):
        assert archive is not None
        directory = work / f"p{n}"
        package_file = archive.download(root, origin, directory, wanted[0].path, limits)
        algorithm, sums = archive.digests(root, origin)
        members: dict[str, StashedFile] = {}
        for entry in wanted:
            spelling = next((s for s in (entry.path, other_spelling(entry.path))
                             if s is not None and s.lstrip("/") in sums), None)
            if spelling is None:
                raise ArchiveError(
                    f"cannot restore {entry.path} from {origin}: the package database has no "
                    f"digest for it ({archive.record_name(origin)})",
                    hint="restore it from a stash copy, or reinstall the package")
            members[spelling.lstrip("/")] = entry
        copies = extract(archive.payload(package_file),
                         {m: e.path for m, e in members.items()}, directory, origin)
        for member, entry in members.items():
            data = copies[member].read_bytes()
            if hashlib.new(algorithm, data, usedforsecurity=False).hexdigest() != sums[member]:
                raise ArchiveError(
                    f"refusing {entry.path} from {origin}: its {algorithm} differs from the "
                    "package database's record; nothing was written",
                    hint="the archive serves a different package under that version")
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise ArchiveError(
                    f"refusing {entry.path} from {origin}: it differs from the file kmodtrim "
                    "took out (sha256); nothing was written",
                    hint="check the package database and the archive")
            out[entry.path] = copies[member]
        package_file.unlink()
    return out
