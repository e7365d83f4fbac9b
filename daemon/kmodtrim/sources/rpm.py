"""The rpm family's archive: dnf serves packages, rpm's file digests are the record.

``origins`` names each file's owning package (``name-version-release.arch``) and its
installed ``[epoch:]version-release`` (the root's rpm database, through rpm_command);
``served`` asks dnf whether the root's repositories still have that exact version (``dnf
repoquery``: dnf's own metadata, no package download); ``download`` fetches it with ``dnf
download`` — dnf's own downloader, so the repository metadata's checksums are checked as
for any install; ``digests`` are rpm's ``FILEDIGESTS`` in ``FILEDIGESTALGO`` (sha256 for
any rpm of the last decade); the payload is read as a tar stream by ``rpm2archive``.

For an image root dnf reads the root's repositories (ROOT/etc/yum.repos.d, its variables
in ROOT/etc/dnf/vars, its release from ROOT/etc/os-release) and writes nothing there: its
configuration file (an empty one: the root's dnf.conf could name plugin code to run),
metadata cache, state and logs live in the private directory of the operation, and so
does its ``--installroot`` — dnf opens an rpm database under the install root (on Debian
at INSTALLROOT/root/.rpmdb), which must not be the root's own. Plugins other than
``download`` stay off. On the live system dnf runs with its own configuration.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..backends.package import PM_ENV, is_live
from ..backends.rpm import RpmBackend, rpm_command
from ..errors import ArchiveError, CommandError, ObservationError
from ..observe.osrelease import read_os_release
from ..run import run
from ..state.files import make_dirs
from .payload import (
    DEFAULT_DOWNLOAD,
    DownloadLimits,
    Origin,
    Payload,
    download_error,
    download_timeout,
    origins_of,
)

_EVR = "%|EPOCH?{%{EPOCH}:}|%{VERSION}-%{RELEASE}"
# rpm's PGPHASHALGO numbers, as FILEDIGESTALGO gives them; packages without the tag: md5
_ALGORITHMS = {"1": "md5", "2": "sha1", "8": "sha256", "9": "sha384", "10": "sha512",
               "11": "sha224", "(none)": "md5"}
_QUERY_TIMEOUT = 300.0  # seconds for dnf to read the repositories' metadata


def dnf_spec(origin: Origin) -> str:
    """``origin`` as dnf names exactly that package: ``name-epoch:version-release.arch``
    (epoch 0 when the version has none)."""
    arch = origin.package.rpartition(".")[2]
    release = origin.version.partition(":")[2] or origin.version
    name = origin.package.removesuffix(f"-{release}.{arch}")
    epoch = origin.version.partition(":")[0] if ":" in origin.version else "0"
    return f"{name}-{epoch}:{release}.{arch}"


def dnf_command(root: Path, directory: Path) -> list[str]:
    """dnf for ``root``, keeping everything it writes under ``directory`` (which must
    exist): the root's own repositories when it is not the live system."""
    if is_live(root):
        return ["dnf", "--quiet", f"--setopt=cachedir={directory / 'cache'}"]
    config = directory / "dnf.conf"
    config.write_text("[main]\n")
    make_dirs(directory / "log")  # hawkey's log is not under the install root
    argv = ["dnf", "--quiet", f"--config={config}", f"--installroot={directory / 'installroot'}",
            "--disableplugin=*", "--enableplugin=download",
            f"--setopt=reposdir={root / 'etc/yum.repos.d'}",
            f"--setopt=varsdir={root / 'etc/dnf/vars'},{root / 'etc/yum/vars'}",
            f"--setopt=cachedir={directory / 'cache'}",
            f"--setopt=persistdir={directory / 'persist'}",
            f"--setopt=logdir={directory / 'log'}"]
    try:
        release = read_os_release(root)["version_id"]  # what $releasever means there
    except ObservationError:  # not a regular file, or too big: no release given
        release = None
    if release is not None:
        argv.append(f"--releasever={release}")
    return argv


class RpmArchive:
    name = "rpm"
    tool = "dnf"

    def origins(self, root: Path, paths: Sequence[str]) -> dict[str, Origin]:
        def version(package: str) -> str | None:
            done = run([*rpm_command(root), "-q", "--qf", _EVR, package], env=PM_ENV,
                       check=False)
            found = done.stdout.strip()
            return found if done.returncode == 0 and " " not in found else None

        return origins_of(RpmBackend().owners(root, paths), version)

    def served(self, root: Path, wanted: Iterable[Origin]) -> set[Origin]:
        if shutil.which(self.tool, path=PM_ENV["PATH"]) is None:
            return set()
        specs = {dnf_spec(origin): origin for origin in set(wanted)}
        if not specs:
            return set()
        with tempfile.TemporaryDirectory(prefix="kmodtrim-dnf-") as scratch:
            try:
                done = run([*dnf_command(root, Path(scratch)), "repoquery", "--qf",
                            "%{name}-%{epoch}:%{version}-%{release}.%{arch}\\n",
                            *sorted(specs)], env=PM_ENV, check=False,
                           timeout=_QUERY_TIMEOUT)
            except CommandError:  # timed out: then nothing counts as served
                return set()
        if done.returncode != 0:
            return set()
        return {specs[line.strip()] for line in done.stdout.splitlines()
                if line.strip() in specs}

    def download(self, root: Path, origin: Origin, directory: Path, first: str,
                 limits: DownloadLimits = DEFAULT_DOWNLOAD) -> Path:
        make_dirs(directory)
        argv = dnf_command(root, directory)
        if limits.stall is not None:  # librepo's connect and low-speed timeout, one retry
            argv += [f"--setopt=timeout={limits.stall:g}", "--setopt=retries=1"]
        out = directory / "out"
        try:
            done = run([*argv, "download", f"--destdir={out}", dnf_spec(origin)],
                       env=PM_ENV, cwd=directory, check=False, timeout=limits.seconds)
        except CommandError:  # it timed out (run has killed it)
            raise download_timeout(first, origin, limits) from None
        rpms = sorted(out.glob("*.rpm")) if out.is_dir() else []
        if done.returncode != 0 or len(rpms) != 1:
            raise download_error(first, origin, done.stderr, "dnf repolist")
        return rpms[0]

    def digests(self, root: Path, origin: Origin) -> tuple[str, dict[str, str]]:
        nevra = origin.package
        done = run([*rpm_command(root), "-q", "--qf",
                    "%{FILEDIGESTALGO}\\n[%{FILENAMES}\\t%{FILEDIGESTS}\\n]", nevra],
                   env=PM_ENV, check=False)
        lines = done.stdout.splitlines()
        if done.returncode != 0 or not lines:
            raise ArchiveError(f"cannot check files of {origin} from the archive: rpm does "
                               f"not list {nevra} ({(done.stdout + done.stderr).strip()[:200]})",
                               hint="restore from a stash copy, or reinstall the package")
        algorithm = _ALGORITHMS.get(lines[0].strip())
        if algorithm is None:
            raise ArchiveError(f"cannot check files of {origin} from the archive: unknown "
                               f"rpm file digest algorithm {lines[0].strip()[:20]}",
                               hint="restore from a stash copy, or reinstall the package")
        sums = {}
        for line in lines[1:]:
            path, _, digest = line.rpartition("\t")
            if path and digest and digest != "(none)":
                sums[path.lstrip("/")] = digest.lower()
        return algorithm, sums

    def record_name(self, origin: Origin) -> str:
        return f"the FILEDIGESTS of {origin.package} in the rpm database"

    def payload(self, package_file: Path) -> Payload:
        return Payload(["rpm2archive", "--nocompression", "-"], package_file, "r|")
