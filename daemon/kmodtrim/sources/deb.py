"""The dpkg family's archive: apt serves packages, dpkg's md5sums are the record.

``origins`` names each file's owning package and installed version (dpkg's database);
``served`` asks apt whether the archive still has that exact version (``apt-get download
--print-uris PKG=VERSION``: apt's own lists, no download); ``download`` fetches it with
``apt-get download`` — apt's own downloader, so the archive's signatures and hashes are
checked as for any install; ``digests`` are ``/var/lib/dpkg/info/PKG.md5sums`` (or
``PKG:ARCH.md5sums``). For an image root apt runs with ``-o Dir=ROOT``: the root's own
sources, keys, package lists and dpkg status.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..backends.dpkg import ADMIN_DIR, DpkgBackend, dpkg_command
from ..backends.package import PM_ENV, is_live
from ..errors import ArchiveError, CommandError, InputError
from ..inputs import MAX_KERNEL_METADATA_BYTES, read_input
from ..run import run
from .payload import (
    DEFAULT_DOWNLOAD,
    DownloadLimits,
    Origin,
    Payload,
    download_dir,
    download_error,
    download_timeout,
    origins_of,
)


class DebArchive:
    name = "dpkg"
    tool = "apt-get"

    @staticmethod
    def apt_get(root: Path) -> list[str]:
        """apt-get for ``root``: its own configuration when it is not the live system."""
        argv = ["apt-get", "--quiet", "--quiet"]
        if not is_live(root):
            argv += ["-o", f"Dir={root}"]
        return argv

    def origins(self, root: Path, paths: Sequence[str]) -> dict[str, Origin]:
        def version(package: str) -> str | None:
            done = run([*dpkg_command(root, "dpkg-query"), "--show",
                        "--showformat=${Version}", package], env=PM_ENV, check=False)
            return done.stdout.strip() if done.returncode == 0 else None

        return origins_of(DpkgBackend().owners(root, paths), version)

    def served(self, root: Path, wanted: Iterable[Origin]) -> set[Origin]:
        if shutil.which(self.tool, path=PM_ENV["PATH"]) is None:
            return set()
        found = set()
        for origin in set(wanted):
            done = run([*self.apt_get(root), "download", "--print-uris",
                        f"{origin.package}={origin.version}"], env=PM_ENV, check=False)
            if done.returncode == 0 and done.stdout.startswith("'"):
                found.add(origin)
        return found

    def download(self, root: Path, origin: Origin, directory: Path, first: str,
                 limits: DownloadLimits = DEFAULT_DOWNLOAD) -> Path:
        download_dir(directory)
        argv = self.apt_get(root)
        if limits.stall is not None:  # apt's own: connect and no-data timeouts, no retry
            argv += ["-o", f"Acquire::http::Timeout={limits.stall:g}",
                     "-o", f"Acquire::https::Timeout={limits.stall:g}",
                     "-o", "Acquire::Retries=0"]
        try:
            done = run([*argv, "download", f"{origin.package}={origin.version}"],
                       env=PM_ENV, cwd=directory, check=False, timeout=limits.seconds)
        except CommandError:  # it timed out (run has killed it)
            raise download_timeout(first, origin, limits) from None
        debs = sorted(directory.glob("*.deb"))
        if done.returncode != 0 or len(debs) != 1:
            raise download_error(first, origin, done.stderr, "apt-get update")
        return debs[0]

    def digests(self, root: Path, origin: Origin) -> tuple[str, dict[str, str]]:
        info = root / ADMIN_DIR / "info"
        package = origin.package
        file = info / f"{package}.md5sums"
        if not file.is_file() and ":" not in package:
            candidates = sorted(info.glob(f"{package}:*.md5sums"))
            file = candidates[0] if len(candidates) == 1 else file
        try:
            text = read_input(file, limit=MAX_KERNEL_METADATA_BYTES, what="dpkg md5sums")
        except InputError as exc:
            raise ArchiveError(f"cannot check files of {origin} from the archive: "
                               f"{exc.message}",
                               hint="restore from a stash copy, or reinstall the package"
                               ) from None
        sums = {}
        for line in text.decode("utf-8", "surrogateescape").splitlines():
            digest, _, path = line.partition("  ")
            if len(digest) == 32 and path:
                sums[path] = digest.lower()
        return "md5", sums

    def record_name(self, origin: Origin) -> str:
        return f"{ADMIN_DIR}/info/{origin.package}.md5sums"

    def payload(self, package_file: Path) -> Payload:
        return Payload(["dpkg-deb", "--fsys-tarfile", str(package_file)], None, "r|")
