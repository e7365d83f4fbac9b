"""Real Debian kernels for tests, downloaded once and cached across runs.

Two releases, side by side: Debian 12 (bookworm, kernel 6.1, uncompressed ``.ko`` under
``/lib/modules``) and Debian 13 (trixie, kernel 6.12, ``.ko.xz`` under ``/usr/lib/modules``
of a usrmerged root). For each release and flavour the fixtures resolve the kernel the
release's archive serves today (the dependency of the ``linux-image-<flavour>``
metapackage) through a private apt configuration that reads only that release's signed
indexes, download it with ``apt-get download``, check its SHA256 against the index, unpack
it with ``dpkg-deb -x``, run the host's ``depmod`` on it once, and unpack the matching
headers package for ``Module.symvers``. Everything lives in ``$KMODTRIM_TEST_CACHE``, else
``<repo>/.cache/kernels``:

    apt/<release>/                      private apt sources, lists and package cache
    debs/<package>_<version>_<arch>.deb
    resolved/<release>-<flavour>        the image and headers .deb last resolved (offline use)
    roots/<package>_<version>/          the unpacked package (pristine; do not modify)
    roots/<package>_<version>.unpacked  stamp: unpack completed
    roots/<package>_<version>.depmod    stamp: depmod completed

A usrmerged release's root has ``lib -> usr/lib``, so ``KernelTree.moddir`` (``lib/modules``)
names the same directory on both releases. Each step writes its stamp only after it
succeeded, so an interrupted run is redone. A lock file serialises concurrent test sessions
sharing the cache. A release's indexes are refreshed at most once a day.

If the kernel cannot be fetched the test fails; with ``KMODTRIM_TEST_OFFLINE=1`` it uses
whatever is cached and skips when nothing is.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "KernelTree",
    "cloud_kernel",
    "copy_kernel_tree",
    "each_cloud_kernel",
    "each_generic_kernel",
    "generic_kernel",
    "kernel_cache_dir",
    "trixie_cloud_kernel",
    "trixie_generic_kernel",
]

_REPO = Path(__file__).resolve().parent.parent
_OFFLINE_HINT = "set KMODTRIM_TEST_OFFLINE=1 to skip kernel tests when offline"
_ARCHIVE = "http://deb.debian.org/debian"
_SECURITY = "http://deb.debian.org/debian-security"
_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
_REFRESH_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Release:
    """A Debian release whose kernels the tests run on."""

    name: str  # codename, "trixie"
    debian: int  # 13
    usrmerged: bool  # modules under /usr/lib/modules, with lib -> usr/lib in the root
    compressed: bool  # modules ship as .ko.xz

    def sources(self) -> str:
        """The one-line apt sources for the release, its updates and its security suite."""
        signed = f"[signed-by={_KEYRING}]"
        return (f"deb {signed} {_ARCHIVE} {self.name} main\n"
                f"deb {signed} {_ARCHIVE} {self.name}-updates main\n"
                f"deb {signed} {_SECURITY} {self.name}-security main\n")


BOOKWORM = Release("bookworm", 12, usrmerged=False, compressed=False)
TRIXIE = Release("trixie", 13, usrmerged=True, compressed=True)
RELEASES = {r.name: r for r in (BOOKWORM, TRIXIE)}
FLAVOURS = {"generic": "amd64", "cloud": "cloud-amd64"}


@dataclass(frozen=True)
class KernelTree:
    """An unpacked Debian kernel image package plus its headers' Module.symvers."""

    root: Path  # filesystem root holding lib/modules/<kver> and boot/
    kver: str  # kernel release, e.g. "6.1.0-56-cloud-amd64"
    symvers: Path  # Module.symvers from the matching linux-headers package
    deb: Path  # the downloaded linux-image .deb
    release: Release = BOOKWORM

    @property
    def moddir(self) -> Path:
        """The module directory, root/lib/modules/<kver> (through lib -> usr/lib when the
        release is usrmerged)."""
        return self.root / "lib" / "modules" / self.kver

    @property
    def package(self) -> str:
        """The image package's name, linux-image-<kver>."""
        return f"linux-image-{self.kver}"

    @property
    def module_suffix(self) -> str:
        """How the package's module files end: ".ko" or ".ko.xz"."""
        return ".ko.xz" if self.release.compressed else ".ko"


class _Unavailable(Exception):
    """A kernel package could not be resolved, fetched, verified or unpacked."""


def kernel_cache_dir() -> Path:
    """Where downloaded and unpacked kernels are kept: $KMODTRIM_TEST_CACHE or .cache/kernels."""
    env = os.environ.get("KMODTRIM_TEST_CACHE")
    return Path(env) if env else _REPO / ".cache" / "kernels"


def _offline() -> bool:
    return os.environ.get("KMODTRIM_TEST_OFFLINE", "") not in ("", "0")


def _run(argv: list[str], cwd: Path | None = None) -> str:
    """Run a command and return its stdout; raise _Unavailable with its stderr on failure."""
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
    except FileNotFoundError as exc:
        raise _Unavailable(f"{argv[0]} is not installed (run scripts/setup)") from exc
    if proc.returncode != 0:
        # The private apt configuration's `-o` pairs are left out of the message.
        shown = [a for i, a in enumerate(argv) if a != "-o" and (i == 0 or argv[i - 1] != "-o")]
        raise _Unavailable(f"`{' '.join(shown)}` exited {proc.returncode}:\n"
                           f"{proc.stderr.strip()}")
    return proc.stdout


@contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Hold ``cache``'s lock file: one session at a time fills a cache directory."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------
# The release's archive, through a private apt configuration


def apt_options(cache: Path, release: Release) -> list[str]:
    """apt options that read only the release's indexes, kept under cache/apt/<release>,
    and leave the host's own lists, package cache, status and pins alone."""
    home = cache / "apt" / release.name
    options = {
        "Dir::Etc::sourcelist": home / "sources.list",
        "Dir::Etc::sourceparts": home / "sources.list.d",
        "Dir::Etc::preferences": home / "preferences",
        "Dir::Etc::preferencesparts": home / "preferences.d",
        "Dir::State::Lists": home / "lists",
        "Dir::State::status": home / "status",
        "Dir::Cache": home / "cache",
        # Some hosts (container images) switch the binary caches off; each apt-cache call
        # would parse the whole index again.
        "Dir::Cache::pkgcache": "pkgcache.bin",
        "Dir::Cache::srcpkgcache": "srcpkgcache.bin",
        "Acquire::Languages": "none",
        "APT::Architectures": "amd64",
        "APT::Sandbox::User": "root",
    }
    return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]


def _refresh_indexes(cache: Path, release: Release, force: bool = False) -> list[str]:
    """The apt options for the release, its signed indexes fetched if older than a day
    (or ``force``)."""
    home = cache / "apt" / release.name
    for sub in ("sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    # Rewritten only when changed: apt's binary cache is stale once these are newer.
    sources = home / "sources.list"
    if not sources.exists() or sources.read_text() != release.sources():
        sources.write_text(release.sources())
    if not (home / "status").exists():
        (home / "status").touch()
    options = apt_options(cache, release)
    stamp = home / "updated"
    if force or not stamp.exists() or time.time() - stamp.stat().st_mtime > _REFRESH_SECONDS:
        # apt-get update checks InRelease against the Debian archive keyring and every
        # index against InRelease; `-o APT::Update::Error-Mode=any` makes a failed source
        # an error instead of a warning.
        _run(["apt-get", *options, "-o", "APT::Update::Error-Mode=any", "-q", "update"])
        stamp.touch()
    return options


def _resolve_metapackage(options: list[str], meta: str) -> str:
    """The versioned package a metapackage's candidate depends on (linux-image-6.1.0-NN-...)."""
    out = _run(["apt-cache", *options, "depends", "--no-recommends", "--no-suggests", meta])
    prefix = re.sub(r"^(linux-[a-z]+-).*", r"\1", meta)  # "linux-image-"
    for line in out.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(\S+)", line)
        if m and m.group(1).startswith(prefix) and re.search(r"-\d", m.group(1)):
            return m.group(1)
    raise _Unavailable(f"`apt-cache depends {meta}` names no {prefix}* package:\n{out}")


def _record(options: list[str], package: str) -> tuple[str, str]:
    """(version, SHA256) of the candidate of package, from the release's signed index."""
    policy = _run(["apt-cache", *options, "policy", package])
    m = re.search(r"^\s*Candidate:\s*(\S+)", policy, re.MULTILINE)
    if not m or m.group(1) == "(none)":
        raise _Unavailable(f"the archive serves no installable version of {package}")
    version = m.group(1)
    show = _run(["apt-cache", *options, "show", f"{package}={version}"])
    digest = re.search(r"^SHA256:\s*([0-9a-f]{64})$", show, re.MULTILINE)
    if not digest:
        raise _Unavailable(f"the index has no SHA256 for {package}={version}")
    return version, digest.group(1)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field]).strip()


def _fetch(cache: Path, options: list[str], package: str) -> Path:
    """The .deb of the archive's candidate of package in the cache, downloaded if absent.
    Its SHA256 is checked against the release's index before it enters the cache."""
    version, sha256 = _record(options, package)
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    # Debian file names encode an epoch's ':' as %3a.
    quoted = version.replace(":", "%3a")
    found = sorted(debs.glob(f"{package}_{quoted}_*.deb"))
    if found:
        return found[0]
    # Download into a scratch dir and rename, so an interrupted download leaves no .deb.
    with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
        _run(["apt-get", *options, "download", "-q", f"{package}={version}"], cwd=Path(tmp))
        got = sorted(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise _Unavailable(f"apt-get download {package}={version} produced {got}")
        if (actual := _sha256(got[0])) != sha256:
            raise _Unavailable(f"{got[0].name} has SHA256 {actual}, the archive's index "
                               f"says {sha256}: refusing it")
        dest = debs / got[0].name
        os.replace(got[0], dest)
    return dest


# ---------------------------------------------------------------------------------------
# Unpacking


def _unpack(cache: Path, deb: Path, release: Release) -> Path:
    """The unpacked root of deb, extracting it (once) into roots/<package>_<version>/.
    On a usrmerged release the root gets lib -> usr/lib, as on an installed system."""
    name = f"{_deb_field(deb, 'Package')}_{_deb_field(deb, 'Version')}".replace(":", "%3a")
    roots = cache / "roots"
    roots.mkdir(parents=True, exist_ok=True)
    root = roots / name
    stamp = roots / f"{name}.unpacked"
    if not stamp.exists():
        # A root without its stamp is the remains of an interrupted unpack.
        shutil.rmtree(root, ignore_errors=True)
        (roots / f"{name}.depmod").unlink(missing_ok=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        if release.usrmerged:
            if (root / "lib").exists():
                raise _Unavailable(f"{deb.name} ships /lib, not usrmerged as {release.name}")
            (root / "usr" / "lib").mkdir(parents=True, exist_ok=True)
            (root / "lib").symlink_to("usr/lib")
        stamp.touch()
    return root


def _depmod(root: Path, kver: str) -> None:
    """Run depmod on the pristine root once, as the package's postinst would."""
    stamp = root.parent / f"{root.name}.depmod"
    if not stamp.exists():
        depmod = shutil.which("depmod") or "/usr/sbin/depmod"
        if not Path(depmod).exists():
            depmod = "/sbin/depmod"
        _run([depmod, "-b", str(root), kver])
        stamp.touch()


def _kver_of(root: Path, deb: Path) -> str:
    moddirs = [p.name for p in (root / "lib" / "modules").iterdir() if p.is_dir()]
    if len(moddirs) != 1:
        raise _Unavailable(f"{deb.name} unpacks to lib/modules/{moddirs}, expected one directory")
    return moddirs[0]


def _resolve(cache: Path, release: Release, flavour: str) -> tuple[Path, Path]:
    """(image .deb, headers .deb) the release's archive serves today for a flavour, fetched.
    Offline, the pair last resolved (if cached)."""
    record = cache / "resolved" / f"{release.name}-{flavour}"

    def fetch(options: list[str]) -> tuple[Path, Path]:
        image_pkg = _resolve_metapackage(options, f"linux-image-{flavour}")
        kver = image_pkg.removeprefix("linux-image-")
        return _fetch(cache, options, image_pkg), _fetch(cache, options, f"linux-headers-{kver}")

    try:
        try:
            image_deb, headers_deb = fetch(_refresh_indexes(cache, release))
        except _Unavailable:
            # Lists less than a day old may name a version the archive has dropped since.
            image_deb, headers_deb = fetch(_refresh_indexes(cache, release, force=True))
    except _Unavailable:
        if not _offline():
            raise
        names = record.read_text().split() if record.exists() else []
        debs = [cache / "debs" / n for n in names]
        if len(debs) != 2 or not all(d.exists() for d in debs):
            pytest.skip(f"KMODTRIM_TEST_OFFLINE=1 and no {release.name} {flavour} kernel "
                        "is cached")
        return debs[0], debs[1]
    record.parent.mkdir(exist_ok=True)
    tmp = record.with_name(f".{record.name}.tmp")
    tmp.write_text(f"{image_deb.name}\n{headers_deb.name}\n")
    os.replace(tmp, record)
    return image_deb, headers_deb


def _prepare(release: Release, flavour: str) -> KernelTree:
    """Fetch, unpack and depmod the current kernel of a release and flavour ("cloud-amd64")."""
    cache = kernel_cache_dir()
    with cache_lock(cache):
        image_deb, headers_deb = _resolve(cache, release, flavour)
        kver = _deb_field(image_deb, "Package").removeprefix("linux-image-")
        root = _unpack(cache, image_deb, release)
        found_kver = _kver_of(root, image_deb)
        if found_kver != kver:
            raise _Unavailable(f"{image_deb.name} holds lib/modules/{found_kver}, not {kver}")
        _depmod(root, kver)
        headers_root = _unpack(cache, headers_deb, release)
        symvers = headers_root / "usr" / "src" / f"linux-headers-{kver}" / "Module.symvers"
        if not symvers.is_file():
            raise _Unavailable(f"{headers_deb.name} has no {symvers.relative_to(headers_root)}")
        return KernelTree(root=root, kver=kver, symvers=symvers, deb=image_deb, release=release)


@functools.cache
def _kernel(release: str, flavour: str) -> KernelTree:
    # Cached per process so fixtures imported into several conftest/plugin namespaces
    # still do the work (and take the lock) only once.
    try:
        return _prepare(RELEASES[release], FLAVOURS[flavour])
    except _Unavailable as exc:
        problem = str(exc)
    # Failing outside the except block keeps the report to the message, without a chain.
    pytest.fail(
        f"cannot provide the Debian {release} {flavour} kernel for tests: {problem}\n"
        f"({_OFFLINE_HINT})",
        pytrace=False,
    )


# ---------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def cloud_kernel() -> KernelTree:
    """The current Debian 12 (bookworm) linux-image-cloud-amd64 kernel, unpacked (read-only)."""
    return _kernel("bookworm", "cloud")


@pytest.fixture(scope="session")
def generic_kernel() -> KernelTree:
    """The current Debian 12 (bookworm) linux-image-amd64 kernel, unpacked (read-only)."""
    return _kernel("bookworm", "generic")


@pytest.fixture(scope="session")
def trixie_cloud_kernel() -> KernelTree:
    """The current Debian 13 (trixie) linux-image-cloud-amd64 kernel, unpacked (read-only)."""
    return _kernel("trixie", "cloud")


@pytest.fixture(scope="session")
def trixie_generic_kernel() -> KernelTree:
    """The current Debian 13 (trixie) linux-image-amd64 kernel, unpacked (read-only)."""
    return _kernel("trixie", "generic")


@pytest.fixture(scope="session", params=sorted(RELEASES), ids=lambda r: f"{r}-cloud")
def each_cloud_kernel(request: pytest.FixtureRequest) -> KernelTree:
    """The cloud kernel of each release in turn (ids bookworm-cloud, trixie-cloud)."""
    return _kernel(request.param, "cloud")


@pytest.fixture(scope="session", params=sorted(RELEASES), ids=lambda r: f"{r}-generic")
def each_generic_kernel(request: pytest.FixtureRequest) -> KernelTree:
    """The generic kernel of each release in turn (ids bookworm-generic, trixie-generic)."""
    return _kernel(request.param, "generic")


def copy_kernel_tree(tree: KernelTree, dest: Path) -> KernelTree:
    """A writable copy of tree's root at dest (created; must be absent or empty).

    Files are copied, not hard-linked, so changing the copy never touches the pristine
    cache; the usrmerge link is copied as a link. Raises ValueError if dest is not empty,
    CalledProcessError if cp fails.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"copy_kernel_tree: destination {dest} is not empty")
    subprocess.run(
        ["cp", "-a", "--reflink=auto", f"{tree.root}/.", str(dest)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return dataclasses.replace(tree, root=dest)


def prepare_kernel(flavour: str, release: str = "bookworm") -> KernelTree:
    """The Debian kernel of a flavour ("generic" or "cloud") and release ("bookworm" or
    "trixie"), for scripts outside pytest (the demo and the benchmarks). Raises
    RuntimeError with the reason if unavailable."""
    if flavour not in FLAVOURS or release not in RELEASES:
        raise RuntimeError(f"no kernel for flavour {flavour!r} of release {release!r}: "
                           f"flavours {sorted(FLAVOURS)}, releases {sorted(RELEASES)}")
    try:
        return _prepare(RELEASES[release], FLAVOURS[flavour])
    except _Unavailable as exc:
        raise RuntimeError(f"cannot provide the Debian {release} {flavour} kernel: "
                           f"{exc}") from None


if __name__ == "__main__":
    # `python tests/kernels.py --shell FLAVOUR [RELEASE]` prints KROOT/KVER/SYMVERS for
    # shell scripts.
    import shlex
    import sys

    if len(sys.argv) not in (3, 4) or sys.argv[1] != "--shell":
        print("usage: kernels.py --shell generic|cloud [bookworm|trixie]", file=sys.stderr)
        sys.exit(2)
    try:
        tree = prepare_kernel(*sys.argv[2:])
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    print(f"KROOT={shlex.quote(str(tree.root))}")
    print(f"KVER={shlex.quote(tree.kver)}")
    print(f"SYMVERS={shlex.quote(str(tree.symvers))}")
