"""The package archive as a restore source (dpkg and apt): a trimmed file whose package the
archive serves at exactly its installed version need not be kept locally.

- At trim time, ``origins`` names each file's owning package and installed version
  (dpkg's database) and ``served`` asks apt whether the archive still has that exact
  version (``apt-get download --print-uris PKG=VERSION``: apt's own package lists, no
  download).
- At restore, ``fetch`` downloads each package once with ``apt-get download PKG=VERSION``
  — apt's own downloader, so the archive's signatures and hashes are checked as for any
  install — into a private directory under the state directory, takes the wanted files out
  of ``dpkg-deb --fsys-tarfile``, and checks each against the package database's own
  record (``/var/lib/dpkg/info/PKG.md5sums``, or ``PKG:ARCH.md5sums``) and against the
  sha256 kmodtrim recorded when it took the file out. Only then may a file enter the tree.

For an image root (``--root``) apt runs with ``-o Dir=ROOT``: the root's own sources, keys,
package lists and dpkg status. Any failure — archive unreachable, version gone, a digest that
differs, no md5sums entry — is an ArchiveError naming the file, raised before anything is
written to the tree.

RPM-family systems have no archive source yet: their files always keep a local copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pwd
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..backends.dpkg import ADMIN_DIR, DpkgBackend, dpkg_command
from ..backends.package import PM_ENV, is_live, other_spelling
from ..errors import ArchiveError, InputError
from ..inputs import MAX_KERNEL_METADATA_BYTES, MAX_MODULE_BYTES, read_input
from ..records import StashedFile
from ..run import run, scrubbed_env
from ..store import make_dirs, state_dir

_DOWNLOAD_TIMEOUT = 900.0  # seconds for one package (a generic kernel .deb is ~100 MB)
_APT_USER = "_apt"  # apt's download sandbox user


@dataclass(frozen=True)
class Origin:
    """A package as dpkg names it (``name`` or ``name:arch``) at one version."""

    package: str
    version: str

    def __str__(self) -> str:
        return f"{self.package} {self.version}"


def fetch_dir(root: Path) -> Path:
    """Where downloads of a restore in progress live (swept after every operation)."""
    return state_dir(root) / "fetch"


def apt_get(root: Path) -> list[str]:
    """apt-get for ``root``: its own sources, keys, lists and dpkg status when it is not
    the live system."""
    argv = ["apt-get", "--quiet", "--quiet"]
    if not is_live(root):
        argv += ["-o", f"Dir={root}"]
    return argv


def origins(root: Path, paths: Sequence[str]) -> dict[str, Origin]:
    """The owning package and installed version of each of ``paths`` that dpkg lists
    (paths no installed package owns are left out)."""
    owners = DpkgBackend().owners(root, paths)
    versions: dict[str, str] = {}
    for package in sorted({p for p in owners.values() if p}):
        done = run([*dpkg_command(root, "dpkg-query"), "--show", "--showformat=${Version}",
                    package], env=PM_ENV, check=False)
        if done.returncode == 0 and done.stdout.strip():
            versions[package] = done.stdout.strip()
    return {path: Origin(package, versions[package])
            for path, package in owners.items() if package in versions}


def served(root: Path, wanted: Iterable[Origin]) -> set[Origin]:
    """The origins the archive serves at exactly that version, by apt's package lists of
    ``root`` (none without apt)."""
    if shutil.which("apt-get", path=PM_ENV["PATH"]) is None:
        return set()
    found = set()
    for origin in set(wanted):
        done = run([*apt_get(root), "download", "--print-uris",
                    f"{origin.package}={origin.version}"], env=PM_ENV, check=False)
        if done.returncode == 0 and done.stdout.startswith("'"):
            found.add(origin)
    return found


def fetch(root: Path, entries: Sequence[StashedFile], work: Path) -> dict[str, Path]:
    """Download the packages of ``entries`` (each once) into ``work``, take their files
    out and verify them; returns each entry's path → its verified copy under ``work``.
    Raises ArchiveError naming the first file that cannot come back this way."""
    by_origin: dict[Origin, list[StashedFile]] = {}
    for entry in entries:
        if entry.package is None or entry.version is None:
            raise ArchiveError(f"cannot fetch {entry.path}: its record names no package "
                               "version")
        by_origin.setdefault(Origin(entry.package, entry.version), []).append(entry)
    out: dict[str, Path] = {}
    for n, (origin, wanted) in enumerate(sorted(by_origin.items(), key=lambda i: str(i[0]))):
        directory = work / f"p{n}"
        deb = _download(root, origin, directory, wanted[0].path)
        sums = _md5sums(root, origin.package)
        members: dict[str, StashedFile] = {}
        for entry in wanted:
            spelling = next((s for s in (entry.path, other_spelling(entry.path))
                             if s is not None and s.lstrip("/") in sums), None)
            if spelling is None:
                raise ArchiveError(
                    f"cannot restore {entry.path} from {origin}: the package database has no "
                    f"md5sum for it ({ADMIN_DIR}/info/{origin.package}.md5sums)",
                    hint="restore it from a stash copy, or reinstall the package")
            members[spelling.lstrip("/")] = entry
        extracted = _extract(deb, members, directory, origin)
        for member, entry in members.items():
            copy = extracted[member]
            data = copy.read_bytes()
            if hashlib.md5(data, usedforsecurity=False).hexdigest() != sums[member]:
                raise ArchiveError(
                    f"refusing {entry.path} from {origin}: its md5 differs from the package "
                    "database's record; nothing was written",
                    hint="the archive serves a different package under that version")
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise ArchiveError(
                    f"refusing {entry.path} from {origin}: it differs from the file kmodtrim "
                    "took out (sha256); nothing was written",
                    hint="check the package database and the archive")
            out[entry.path] = copy
        deb.unlink()
    return out


def _download(root: Path, origin: Origin, directory: Path, first: str) -> Path:
    """``apt-get download`` of exactly ``origin`` into ``directory``; the .deb."""
    make_dirs(directory)
    with contextlib.suppress(KeyError, OSError):
        if os.geteuid() == 0:  # apt downloads as its sandbox user when it can write here
            os.chown(directory, pwd.getpwnam(_APT_USER).pw_uid, 0)
    done = run([*apt_get(root), "download", f"{origin.package}={origin.version}"],
               env=PM_ENV, cwd=directory, check=False, timeout=_DOWNLOAD_TIMEOUT)
    debs = sorted(directory.glob("*.deb"))
    if done.returncode != 0 or len(debs) != 1:
        errors = [ln[3:].strip() for ln in done.stderr.splitlines() if ln.startswith("E: ")]
        why = errors[0] if errors else (done.stderr.strip().splitlines() or ["no .deb"])[-1]
        raise ArchiveError(
            f"cannot restore {first}: the archive does not give {origin} ({why[:300]}); "
            "nothing was written",
            hint="check the network and the apt sources (apt-get update), or restore from "
                 "a stash copy")
    return debs[0]


def _md5sums(root: Path, package: str) -> dict[str, str]:
    """dpkg's record of ``package``'s files: path without the leading slash → md5."""
    info = root / ADMIN_DIR / "info"
    file = info / f"{package}.md5sums"
    if not file.is_file() and ":" not in package:
        candidates = sorted(info.glob(f"{package}:*.md5sums"))
        file = candidates[0] if len(candidates) == 1 else file
    try:
        text = read_input(file, limit=MAX_KERNEL_METADATA_BYTES, what="dpkg md5sums")
    except InputError as exc:
        raise ArchiveError(f"cannot check files of {package} from the archive: {exc.message}",
                           hint="restore from a stash copy, or reinstall the package") from None
    sums = {}
    for line in text.decode("utf-8", "surrogateescape").splitlines():
        digest, _, path = line.partition("  ")
        if len(digest) == 32 and path:
            sums[path] = digest.lower()
    return sums


def _extract(deb: Path, members: dict[str, StashedFile], directory: Path,
             origin: Origin) -> dict[str, Path]:
    """The wanted regular files of ``deb``'s data, streamed out of ``dpkg-deb
    --fsys-tarfile`` into ``directory``; raises ArchiveError when one is missing."""
    found: dict[str, Path] = {}
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=scrubbed_env(PM_ENV))
    assert proc.stdout is not None and proc.stderr is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name not in members or not member.isfile() or name in found:
                    continue
                if member.size > MAX_MODULE_BYTES:
                    raise ArchiveError(f"refusing {members[name].path} from {origin}: "
                                       f"{member.size} bytes is larger than any module")
                source = tar.extractfile(member)
                assert source is not None
                copy = directory / f"f{len(found)}"
                with open(copy, "xb") as f:
                    shutil.copyfileobj(source, f)
                found[name] = copy
    except (tarfile.TarError, EOFError) as exc:
        raise ArchiveError(f"cannot read {deb.name} from {origin}: {exc}") from None
    finally:
        proc.stdout.close()
        error = proc.stderr.read().decode("utf-8", "replace").strip()
        proc.stderr.close()
        proc.wait()
    if proc.returncode != 0 and len(found) < len(members):
        raise ArchiveError(f"dpkg-deb cannot read {deb.name} from {origin}: {error[-300:]}")
    missing = [members[m].path for m in members if m not in found]
    if missing:
        raise ArchiveError(f"cannot restore {missing[0]}: {origin} from the archive does not "
                           "contain it; nothing was written")
    return found
