"""What the archive families share: an origin (package at a version), the download
directory, and taking the wanted files out of a package's payload as a tar stream."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from ..backends.package import PM_ENV
from ..errors import ArchiveError
from ..inputs import MAX_MODULE_BYTES
from ..run import scrubbed_env
from ..state.files import make_dirs

DOWNLOAD_TIMEOUT = 900.0  # seconds for one package (a generic kernel is ~100 MB)
_APT_USER = "_apt"  # apt's download sandbox user


@dataclass(frozen=True)
class DownloadLimits:
    """How long one package's download may take: ``seconds`` in all, and (``stall``) how
    long the downloader may wait for a connection or for more data (None: its default,
    with its retries)."""

    seconds: float = DOWNLOAD_TIMEOUT
    stall: float | None = None


DEFAULT_DOWNLOAD = DownloadLimits()
# A restore modprobe waits for (restore --on-demand): an archive that does not answer
# fails it in seconds; a slow one that keeps sending still has two minutes.
ON_DEMAND_DOWNLOAD = DownloadLimits(seconds=120.0, stall=10.0)


@dataclass(frozen=True)
class Origin:
    """A package as its package manager names it (dpkg ``name`` or ``name:arch``, rpm
    ``name-version-release.arch``) at one version."""

    package: str
    version: str

    def __str__(self) -> str:
        return f"{self.package} {self.version}"


def origins_of(owners: Mapping[str, str | None],
               version: Callable[[str], str | None]) -> dict[str, Origin]:
    """Each owned path's Origin: its package and that package's installed ``version``
    (asked once per package, in name order; a package with none is left out)."""
    versions: dict[str, str] = {}
    for package in sorted({p for p in owners.values() if p}):
        found = version(package)
        if found:
            versions[package] = found
    return {path: Origin(package, versions[package])
            for path, package in owners.items() if package and package in versions}


@dataclass(frozen=True)
class Payload:
    """How to read a package's files as a tar stream: a command, its stdin, the tarfile
    mode."""

    argv: list[str]
    stdin: Path | None
    mode: Literal["r|", "r|gz"]


def download_dir(directory: Path) -> None:
    """Create ``directory``; apt downloads as its sandbox user when that user may write
    there (otherwise, as root, with a warning)."""
    make_dirs(directory)
    with contextlib.suppress(KeyError, OSError):
        if os.geteuid() == 0:
            os.chown(directory, pwd.getpwnam(_APT_USER).pw_uid, 0)


def download_timeout(first: str, origin: Origin, limits: DownloadLimits) -> ArchiveError:
    """The one-line error of a download that took longer than ``limits`` allow."""
    return ArchiveError(
        f"cannot restore {first}: the archive did not give {origin} within "
        f"{limits.seconds:g} s; nothing was written",
        hint="check the network and the package sources, or restore from a stash copy")


def download_error(first: str, origin: Origin, stderr: str, refresh: str) -> ArchiveError:
    """The one-line error of a download that gave no package."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(("E:", "Error:"))]
    why = errors[0] if errors else (lines[-1] if lines else "no package file")
    return ArchiveError(
        f"cannot restore {first}: the archive does not give {origin} ({why[:300]}); "
        "nothing was written",
        hint=f"check the network and the package sources ({refresh}), or restore from a "
             "stash copy")


def extract(payload: Payload, members: dict[str, str], directory: Path, origin: Origin
            ) -> dict[str, Path]:
    """The regular files named by ``members`` (member name without ``./`` → the in-root
    path it restores, for messages) streamed out of ``payload`` into ``directory``.
    Raises ArchiveError when one is missing or the payload cannot be read."""
    found: dict[str, Path] = {}
    with contextlib.ExitStack() as opened:
        stdin: IO[bytes] | int = subprocess.DEVNULL
        if payload.stdin is not None:
            stdin = opened.enter_context(open(payload.stdin, "rb"))
        proc = subprocess.Popen(payload.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=stdin, env=scrubbed_env(PM_ENV))
    assert proc.stdout is not None and proc.stderr is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode=payload.mode) as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name not in members or not member.isfile() or name in found:
                    continue
                if member.size > MAX_MODULE_BYTES:
                    raise ArchiveError(f"refusing {members[name]} from {origin}: "
                                       f"{member.size} bytes is larger than any module")
                source = tar.extractfile(member)
                assert source is not None
                copy = directory / f"f{len(found)}"
                with open(copy, "xb") as f:
                    shutil.copyfileobj(source, f)
                found[name] = copy
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"cannot read the package {origin}: {exc}") from None
    finally:
        proc.stdout.close()
        error = proc.stderr.read().decode("utf-8", "replace").strip()
        proc.stderr.close()
        proc.wait()
    if proc.returncode != 0 and len(found) < len(members):
        raise ArchiveError(f"cannot read the package {origin}: {error[-300:]}")
    missing = [members[m] for m in members if m not in found]
    if missing:
        raise ArchiveError(f"cannot restore {missing[0]}: {origin} from the archive does not "
                           "contain it; nothing was written")
    return found
