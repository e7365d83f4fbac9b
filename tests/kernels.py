"""Real Debian kernels for tests, downloaded once and cached across runs.

The fixtures fetch the kernel that Debian currently ships for a flavour (the dependency of
the `linux-image-<flavour>` metapackage) with `apt-get download`, unpack it with
`dpkg-deb -x`, run `depmod` on it once, and unpack the matching headers package for
`Module.symvers`. Everything lives in `$KMODTRIM_TEST_CACHE`, else `<repo>/.cache/kernels`:

    debs/<package>_<version>_<arch>.deb
    roots/<package>_<version>/            the unpacked package (pristine; do not modify)
    roots/<package>_<version>.unpacked    stamp: unpack completed
    roots/<package>_<version>.depmod      stamp: depmod completed

Each step writes its stamp only after it succeeded, so an interrupted run is redone.
A lock file serialises concurrent test sessions sharing the cache.

If the kernel cannot be fetched the test fails; with `KMODTRIM_TEST_OFFLINE=1` it uses
whatever is cached and skips when nothing is.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "KernelTree",
    "cloud_kernel",
    "copy_kernel_tree",
    "generic_kernel",
    "kernel_cache_dir",
]

_REPO = Path(__file__).resolve().parent.parent
_OFFLINE_HINT = "set KMODTRIM_TEST_OFFLINE=1 to skip kernel tests when offline"


@dataclass(frozen=True)
class KernelTree:
    """An unpacked Debian kernel image package plus its headers' Module.symvers."""

    root: Path  # filesystem root holding lib/modules/<kver> and boot/
    kver: str  # kernel release, e.g. "6.1.0-56-cloud-amd64"
    symvers: Path  # Module.symvers from the matching linux-headers package
    deb: Path  # the downloaded linux-image .deb

    @property
    def moddir(self) -> Path:
        """The module directory, root/lib/modules/<kver>."""
        return self.root / "lib" / "modules" / self.kver


class _Unavailable(Exception):
    """A kernel package could not be resolved, fetched or unpacked."""


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
        # apt-get download as root warns that it cannot drop privileges; that is noise.
        stderr = "\n".join(
            line for line in proc.stderr.splitlines() if "performed unsandboxed" not in line
        )
        raise _Unavailable(f"`{' '.join(argv)}` exited {proc.returncode}:\n{stderr.strip()}")
    return proc.stdout


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _resolve_metapackage(meta: str) -> str:
    """The versioned package a metapackage's candidate depends on (linux-image-6.1.0-NN-...)."""
    out = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", meta])
    prefix = re.sub(r"^(linux-[a-z]+-).*", r"\1", meta)  # "linux-image-"
    for line in out.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(\S+)", line)
        if m and m.group(1).startswith(prefix) and re.search(r"-\d", m.group(1)):
            return m.group(1)
    raise _Unavailable(f"`apt-cache depends {meta}` names no {prefix}* package:\n{out}")


def _candidate_version(package: str) -> str:
    out = _run(["apt-cache", "policy", package])
    m = re.search(r"^\s*Candidate:\s*(\S+)", out, re.MULTILINE)
    if not m or m.group(1) == "(none)":
        raise _Unavailable(f"apt knows no installable version of {package} (run apt-get update)")
    return m.group(1)


def _deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field]).strip()


def _fetch(cache: Path, package: str, version: str) -> Path:
    """The .deb of package=version in the cache, downloading it with apt-get if absent."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    # Debian file names encode an epoch's ':' as %3a.
    quoted = version.replace(":", "%3a")
    found = sorted(debs.glob(f"{package}_{quoted}_*.deb"))
    if found:
        return found[0]
    # Download into a scratch dir and rename, so an interrupted download leaves no .deb.
    with tempfile.TemporaryDirectory(dir=debs, prefix=".download-") as tmp:
        _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=Path(tmp))
        got = sorted(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise _Unavailable(f"apt-get download {package}={version} produced {got}")
        dest = debs / got[0].name
        os.replace(got[0], dest)
    return dest


def _newest_cached_deb(cache: Path, pattern: str) -> Path | None:
    """For offline use: the cached .deb matching pattern with the highest version."""
    found = sorted((cache / "debs").glob(pattern))
    best: Path | None = None
    best_version = ""
    for deb in found:
        version = _deb_field(deb, "Version")
        if best is None or subprocess.run(
            ["dpkg", "--compare-versions", version, "gt", best_version], check=False
        ).returncode == 0:
            best, best_version = deb, version
    return best


def _unpack(cache: Path, deb: Path) -> Path:
    """The unpacked root of deb, extracting it (once) into roots/<package>_<version>/."""
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


def _prepare(flavour: str) -> KernelTree:
    """Fetch, unpack and depmod the current Debian kernel of a flavour ("cloud-amd64")."""
    cache = kernel_cache_dir()
    with _locked(cache):
        image_deb: Path | None
        headers_deb: Path | None
        try:
            image_pkg = _resolve_metapackage(f"linux-image-{flavour}")
            version = _candidate_version(image_pkg)
            image_deb = _fetch(cache, image_pkg, version)
            kver = image_pkg.removeprefix("linux-image-")
            headers_deb = _fetch(cache, f"linux-headers-{kver}", version)
        except _Unavailable:
            if not _offline():
                raise
            image_deb = _newest_cached_deb(cache, f"linux-image-*-{flavour}_*.deb")
            if image_deb is None:
                pytest.skip(f"KMODTRIM_TEST_OFFLINE=1 and no {flavour} kernel is cached")
            kver = _deb_field(image_deb, "Package").removeprefix("linux-image-")
            version = _deb_field(image_deb, "Version").replace(":", "%3a")
            headers_deb = next(
                iter((cache / "debs").glob(f"linux-headers-{kver}_{version}_*.deb")), None
            )
            if headers_deb is None:
                pytest.skip(f"KMODTRIM_TEST_OFFLINE=1 and linux-headers-{kver} is not cached")
        root = _unpack(cache, image_deb)
        found_kver = _kver_of(root, image_deb)
        if found_kver != kver:
            raise _Unavailable(f"{image_deb.name} holds lib/modules/{found_kver}, not {kver}")
        _depmod(root, kver)
        headers_root = _unpack(cache, headers_deb)
        symvers = headers_root / "usr" / "src" / f"linux-headers-{kver}" / "Module.symvers"
        if not symvers.is_file():
            raise _Unavailable(f"{headers_deb.name} has no {symvers.relative_to(headers_root)}")
        return KernelTree(root=root, kver=kver, symvers=symvers, deb=image_deb)


@functools.cache
def _kernel(flavour: str) -> KernelTree:
    # Cached per process so fixtures imported into several conftest/plugin namespaces
    # still do the work (and take the lock) only once.
    try:
        return _prepare(flavour)
    except _Unavailable as exc:
        problem = str(exc)
    # Failing outside the except block keeps the report to the message, without a chain.
    pytest.fail(
        f"cannot provide the Debian {flavour} kernel for tests: {problem}\n({_OFFLINE_HINT})",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def cloud_kernel() -> KernelTree:
    """The current Debian bookworm linux-image-cloud-amd64 kernel, unpacked (read-only)."""
    return _kernel("cloud-amd64")


@pytest.fixture(scope="session")
def generic_kernel() -> KernelTree:
    """The current Debian bookworm linux-image-amd64 kernel, unpacked (read-only)."""
    return _kernel("amd64")


def copy_kernel_tree(tree: KernelTree, dest: Path) -> KernelTree:
    """A writable copy of tree's root at dest (created; must be absent or empty).

    Files are copied, not hard-linked, so changing the copy never touches the pristine
    cache. Raises ValueError if dest is not empty, CalledProcessError if cp fails.
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


def prepare_kernel(flavour: str) -> KernelTree:
    """The Debian kernel of a flavour ("generic" or "cloud"), for scripts outside pytest
    (the demo and the benchmarks). Raises RuntimeError with the reason if unavailable."""
    name = {"generic": "amd64", "cloud": "cloud-amd64"}.get(flavour, flavour)
    try:
        return _prepare(name)
    except _Unavailable as exc:
        raise RuntimeError(f"cannot provide the Debian {name} kernel: {exc}") from None


if __name__ == "__main__":
    # `python tests/kernels.py --shell FLAVOUR` prints KROOT/KVER/SYMVERS for shell scripts.
    import shlex
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--shell":
        print("usage: kernels.py --shell generic|cloud", file=sys.stderr)
        sys.exit(2)
    tree = prepare_kernel(sys.argv[2])
    print(f"KROOT={shlex.quote(str(tree.root))}")
    print(f"KVER={shlex.quote(tree.kver)}")
    print(f"SYMVERS={shlex.quote(str(tree.symvers))}")
