"""A Debian 13 or 12 system on a bootloader-less ext4 disk for the from-disk end-to-end
test.

The base root is ``debootstrap --variant=minbase`` of the release with systemd, udev, dbus,
systemd-networkd (DHCP on every ethernet link), initramfs-tools and Debian's *cloud* kernel
(``linux-image-cloud-amd64``: the kernel Debian's cloud images ship, a third of the
generic kernel's modules, so indexing, depmod and mkinitramfs inside a TCG guest take
minutes, not tens of minutes), plus kmodtrim's run-time dependencies, so that installing
the .deb with apt later needs no network. It is built once and cached under
.cache/e2e/RELEASE-cloud (a ``.partial`` directory renamed when complete, a lock file
against concurrent sessions).

Each test copies the root, installs the built .deb with apt inside it (chroot, services
kept from starting by policy-rc.d, which is removed afterwards), makes a local flat apt
repository in it its only apt source (``kernel_packages``: the installed kernel's package
and, on Debian 13, a second cloud kernel of another version, downloaded through
tests/kernels.py's
private apt configuration; ``local_repository``), and writes it to a sparse ext4 image
with ``mkfs.ext4 -d`` (no loop device, no mount). Should the archive drop the cached
root's kernel, the root is built again. qemu boots that image as a
virtio disk with ``-kernel``/``-initrd`` read out of the image's own /boot with
``debugfs`` before every boot, so a boot always uses the initramfs the guest last wrote.
"""

from __future__ import annotations

import email.utils
import hashlib
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import kernels  # noqa: E402
from debroots import CHROOT_ENV, chroot, debootstrap  # noqa: E402
from kernels import cache_lock, kernel_cache_dir  # noqa: E402
from need import need  # noqa: E402
from pkgbuild import sh  # noqa: E402
from vm import Guest  # noqa: E402

KERNEL_PACKAGE = "linux-image-cloud-amd64"
# the kernel flavours a base root can have: the e2e's cloud kernel, and the generic one
# (benchmarks/bench_boot.py boots it before and after a trim)
KERNEL_PACKAGES = {"cloud": KERNEL_PACKAGE, "generic": "linux-image-amd64"}
SYSTEM_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "kmod", "iproute2", "e2fsprogs",
    "initramfs-tools", "python3",
)
BASE_PACKAGES = (*SYSTEM_PACKAGES, KERNEL_PACKAGE)
# kmodtrim's Depends, installed with apt in the chroot (debootstrap's resolver does not
# follow virtual packages such as python3-zstandard's python3-cffi-backend-api-*), so
# that `apt install ./kmodtrim_*.deb` needs no network later.
PYTHON_PACKAGES = ("python3-dbus-next", "python3-pydantic", "python3-pyelftools",
                   "python3-systemd", "python3-zstandard")
DISK_BYTES = 3 * 1024**3
TOOLS = ("qemu-system-x86_64", "debootstrap", "chroot", "mkfs.ext4", "debugfs")


def need_e2e_tools() -> None:
    need(*TOOLS, root=True)


def e2e_cache() -> Path:
    return kernel_cache_dir().parent / "e2e"


def base_root(release: kernels.Release, rebuild: bool = False,
              flavour: str = "cloud") -> Path:
    """The cached root of ``release`` with the ``flavour`` kernel (KERNEL_PACKAGES) and its
    initramfs (built once: a few minutes and about 400 MB with the cloud kernel; again
    when ``rebuild``)."""
    suite = release.name
    cache = e2e_cache()
    base = cache / f"{suite}-{flavour}"
    with cache_lock(cache):
        if rebuild:
            shutil.rmtree(base, ignore_errors=True)
        if (base / "etc/os-release").exists():
            return base
        partial = cache / f"{suite}-{flavour}.partial"
        debootstrap(suite, partial, (*SYSTEM_PACKAGES, KERNEL_PACKAGES[flavour]))
        chroot(partial, "apt-get", "update", "-qq")
        chroot(partial, "apt-get", "install", "-y", "-q", "--no-install-recommends",
               *PYTHON_PACKAGES)
        chroot(partial, "apt-get", "clean")
        _configure(partial)
        partial.rename(base)
    return base


def _configure(root: Path) -> None:
    """Boot from /dev/vda without a boot loader; DHCP with systemd-networkd; no login
    prompt on the serial console (the check service owns it)."""
    (root / "etc/fstab").write_text("/dev/vda / ext4 defaults,errors=remount-ro 0 1\n")
    (root / "etc/hostname").write_text("kmodtrim-e2e\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 kmodtrim-e2e\n")
    network = root / "etc/systemd/network/20-dhcp.network"
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text("[Match]\nType=ether\n\n[Network]\nDHCP=yes\n")
    chroot(root, "systemctl", "enable", "systemd-networkd.service")
    (root / "etc/systemd/system/serial-getty@ttyS0.service").symlink_to("/dev/null")
    (root / "etc/machine-id").write_text("")
    chroot(root, "systemd-machine-id-setup")


def serial_service(root: Path, name: str, description: str, script: Path | str,
                   after: str | None = None) -> None:
    """A service running ``script`` (a file to copy, or the script's text) on the serial
    console once multi-user is reached, enabled; multi-user made the default target
    (Debian's default.target is graphical.target)."""
    exe = root / "usr/local/sbin" / name
    if isinstance(script, Path):
        shutil.copy2(script, exe)
    else:
        exe.write_text(script)
    exe.chmod(0o755)
    order = f"After={after}\n" if after else ""
    (root / f"etc/systemd/system/{name}.service").write_text(
        f"[Unit]\nDescription={description}\n{order}\n[Service]\nType=simple\n"
        f"ExecStart=/usr/local/sbin/{name}\nStandardOutput=tty\nStandardError=tty\n"
        "TTYPath=/dev/ttyS0\n\n[Install]\nWantedBy=multi-user.target\n")
    default = root / "etc/systemd/system/default.target"
    default.unlink(missing_ok=True)
    default.symlink_to("/usr/lib/systemd/system/multi-user.target")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / f"{name}.service").symlink_to(f"/etc/systemd/system/{name}.service")


def boot_seconds(found: Path) -> float:
    """``systemd-analyze time``'s total (kernel + initrd + userspace) to the default
    target, i.e. multi-user."""
    text = (found / "analyze").read_text()
    total = text.split("=")[-1].split("\n")[0].strip()
    return _seconds(total)


def _seconds(span: str) -> float:
    value = 0.0
    for part in span.split():
        if part.endswith("ms"):
            value += float(part[:-2]) / 1000
        elif part.endswith("min"):
            value += float(part[:-3]) * 60
        elif part.endswith("s"):
            value += float(part[:-1])
    return value


def kernel_release(root: Path) -> str:
    kvers = sorted(p.name for p in (root / "usr/lib/modules").iterdir())
    assert len(kvers) == 1, kvers
    return kvers[0]


def install_deb(root: Path, deb: Path) -> str:
    """``apt-get install ./kmodtrim_*.deb`` inside ``root``; apt's output."""
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    try:
        shutil.copy2(deb, root / "tmp" / deb.name)
        proc = chroot(root, "apt-get", "install", "-y", "-q",
                      f"/tmp/{deb.name}")
        (root / "tmp" / deb.name).unlink()
    finally:
        policy.unlink()
    return proc.stdout


class KernelGone(Exception):
    """The archive no longer serves the cached root's kernel package."""


def kernel_packages(release: kernels.Release, installed: str, *, second: bool = True
                    ) -> list[Path]:
    """[the .deb of the installed kernel ``installed``, with ``second`` the .deb of a
    second cloud kernel of the release of another version], downloaded through
    tests/kernels.py's private apt configuration (signed indexes, SHA256 checked) into
    its cache. Raises KernelGone when the archive no longer has ``installed`` (the cached
    root is older than the archive)."""
    cache = kernel_cache_dir()
    with cache_lock(cache):
        try:
            options = kernels._refresh_indexes(cache, release)
            try:
                first = kernels._fetch(cache, options, f"linux-image-{installed}")
            except kernels._Unavailable:
                # Lists less than a day old may name a version the archive has dropped.
                options = kernels._refresh_indexes(cache, release, force=True)
                first = kernels._fetch(cache, options, f"linux-image-{installed}")
        except kernels._Unavailable as exc:
            raise KernelGone(str(exc)) from None
        if not second:
            return [first]
        try:
            return [first, _second_kernel(cache, options, installed)]
        except kernels._Unavailable as exc:
            pytest.fail(f"cannot download a second {release.name} cloud kernel: {exc}",
                        pytrace=False)


def _second_kernel(cache: Path, options: list[str], installed: str) -> Path:
    """The .deb of the cloud kernel the archive's metapackage names (trixie-security's,
    usually) or, if that is the installed one, of the newest other cloud kernel package
    the indexes list."""
    meta = kernels._resolve_metapackage(options, "linux-image-cloud-amd64")
    if meta != f"linux-image-{installed}":
        return kernels._fetch(cache, options, meta)
    names = kernels._run(["apt-cache", *options, "pkgnames", "linux-image-"]).split()
    others = [n for n in names if re.fullmatch(r"linux-image-\d[\w.+~]*-cloud-amd64", n)
              and n != f"linux-image-{installed}"]
    others.sort(key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)],
                reverse=True)
    problems = []
    for name in others:
        try:
            return kernels._fetch(cache, options, name)
        except kernels._Unavailable as exc:
            problems.append(str(exc))
    raise kernels._Unavailable(f"no cloud kernel other than {installed}: {problems}")


REPO_DIR = "srv/e2e-repo"


def local_repository(root: Path, debs: Sequence[Path]) -> str:
    """Make a flat apt repository of ``debs`` at ROOT/srv/e2e-repo the root's only apt
    source (``deb [trusted=yes] file:/srv/e2e-repo ./``) and update its lists, so that
    the guest installs and downloads packages without a network; apt-get update's
    output."""
    repo = root / REPO_DIR
    repo.mkdir(parents=True)
    for deb in debs:
        shutil.copy2(deb, repo / deb.name)
    packages = sh("dpkg-scanpackages", "--multiversion", ".", cwd=repo).stdout
    (repo / "Packages").write_text(packages)
    data = (repo / "Packages").read_bytes()
    (repo / "Release").write_text(
        "Origin: kmodtrim-e2e\nLabel: kmodtrim-e2e\nSuite: e2e\nCodename: e2e\n"
        f"Architectures: amd64\nDate: {email.utils.formatdate(usegmt=True)}\n"
        f"SHA256:\n {hashlib.sha256(data).hexdigest()} {len(data)} Packages\n")
    (root / "etc/apt/sources.list").write_text(f"deb [trusted=yes] file:/{REPO_DIR} ./\n")
    for extra in (root / "etc/apt/sources.list.d").glob("*"):
        extra.unlink()
    return chroot(root, "apt-get", "update", "-q").stdout


def make_disk(root: Path, image: Path) -> Path:
    """``root`` as a sparse ext4 file system image (``mkfs.ext4 -d``)."""
    with open(image, "wb") as f:
        f.truncate(DISK_BYTES)
    sh("mkfs.ext4", "-q", "-F", "-L", "root", "-E", "root_owner=0:0", "-d", root, image)
    return image


def debugfs(image: Path, request: str) -> str:
    proc = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True,
                          text=True, env=CHROOT_ENV, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def read_out(image: Path, path: str, dest: Path) -> Path:
    """Copy the regular file ``path`` out of the (unmounted) image."""
    dest.unlink(missing_ok=True)
    out = debugfs(image, f"dump -p {path} {dest}")
    assert dest.is_file() and dest.stat().st_size > 0, f"cannot read {path}: {out}"
    return dest


def read_tree(image: Path, path: str, dest: Path) -> Path:
    """Copy the directory ``path`` out of the image into ``dest`` (dest/NAME)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = debugfs(image, f"rdump {path} {dest}")
    found = dest / Path(path).name
    assert found.is_dir(), f"cannot read {path}: {out}"
    return found


@contextmanager
def boot_disk(image: Path, kver: str, workdir: Path, *, memory_mb: int = 2048,
              extra: Sequence[str] = ()) -> Iterator[Guest]:
    """Boot ``image`` (virtio disk, virtio NIC on user networking, TCG) with the kernel
    and initramfs its /boot holds now, and ``extra`` qemu arguments; powered off when the
    block ends."""
    kernel = read_out(image, f"/boot/vmlinuz-{kver}", workdir / "vmlinuz")
    initrd = read_out(image, f"/boot/initrd.img-{kver}", workdir / "initrd.img")
    qmp_path = workdir / "qmp.sock"
    qmp_path.unlink(missing_ok=True)
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", str(memory_mb),
        "-smp", "2", "-display", "none", "-serial", "stdio", "-monitor", "none",
        "-no-reboot", "-qmp", f"unix:{qmp_path},server=on,wait=off",
        "-drive", f"file={image},format=raw,if=virtio,cache=unsafe",
        "-nic", "user,model=virtio-net-pci",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", "root=/dev/vda rw console=ttyS0 panic=-1",
        *extra,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not qmp_path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        yield Guest(proc, qmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
