"""The root device's driver chain: every module driving the block devices ``/`` and
``/usr`` are mounted from, through stacked dm/md devices down to the disks and their bus."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..names import is_valid_module_name, normalize
from .filesystems import (
    _DEVNUM,
    FSTAB_FILE,
    MOUNTS_FILES,
    _Mount,
    _read_mountinfo,
    _read_mounts_file,
)
from .inroot import _host, _inroot_realpath, _read_text, _scandir

ROOT_MOUNTPOINTS: tuple[str, ...] = ("/", "/usr")
# Virtual block devices carry no driver link; their module follows from the name.
_VIRTUAL_BLOCK_MODULES = (
    (re.compile(r"^loop\d+$"), "loop"),
    (re.compile(r"^nbd\d+$"), "nbd"),
    (re.compile(r"^zram\d+$"), "zram"),
)
# /sys/block/mdN/md/level → the md personality module.
_MD_LEVEL_MODULES = {
    "linear": "linear", "multipath": "multipath", "raid0": "raid0", "raid1": "raid1",
    "raid4": "raid456", "raid5": "raid456", "raid6": "raid456", "raid10": "raid10",
}


@dataclass(frozen=True)
class RootDriver:
    """A module driving (part of) the device a boot filesystem lives on: e.g. virtio_blk
    for ``/`` at ``/devices/pci0000:00/0000:00:04.0/virtio1``."""

    module: str
    mountpoint: str
    devpath: str


def root_device_drivers(
    root: Path, mountpoints: Sequence[str] = ROOT_MOUNTPOINTS
) -> list[RootDriver]:
    """The storage driver chain of the devices ``/`` and ``/usr`` (if separate) are mounted
    from: every driver bound to the block device or one of its sysfs ancestors (disk
    driver, controller, bus), through dm/md ``slaves`` to the disks below, plus the module
    of a virtual block device (dm_mod, dm_crypt, md_mod and its RAID level, loop, nbd).

    The mount comes from ROOT/proc/self/mountinfo (else mounts, else fstab); its device is
    found by number, or by resolving its source (``/dev/…``, ``UUID=…``, ``/dev/mapper/…``,
    ``/dev/root``) under ROOT/dev or against ROOT/sys/class/block. A driver without a
    ``module`` link is built in; its driver name is given, which on other kernels is
    usually the module's. No sysfs, a network or overlay root: []. Never raises for
    missing or odd files.
    """
    mounts = _read_mountinfo(root) or _read_mounts_file(root, MOUNTS_FILES[0]) or \
        _read_mounts_file(root, MOUNTS_FILES[1]) or []
    fstab = _read_mounts_file(root, FSTAB_FILE) or []
    found: dict[tuple[str, str], RootDriver] = {}
    for mountpoint in mountpoints:
        entry = _last_mount(mounts, mountpoint) or _last_mount(fstab, mountpoint)
        if entry is None:
            continue
        devnum = _device_number(root, entry)
        if devnum is None:
            continue
        start = _inroot_realpath(root, f"/sys/dev/block/{devnum[0]}:{devnum[1]}")
        for module, devpath in _drivers_of_block_device(root, start, set()):
            found.setdefault((module, mountpoint), RootDriver(module, mountpoint, devpath))
    return list(found.values())


def _last_mount(entries: Sequence[_Mount], mountpoint: str) -> _Mount | None:
    """The topmost mount on ``mountpoint`` (later mounts hide earlier ones)."""
    for entry in reversed(entries):
        if entry.mountpoint == mountpoint:
            return entry
    return None


def _device_number(root: Path, entry: _Mount) -> tuple[int, int] | None:
    if entry.devnum is not None and entry.devnum[0] != 0:  # 0:N: btrfs, overlay, tmpfs…
        return entry.devnum
    device = entry.device
    if device == "/dev/root":
        # The kernel's name for root=; no such node exists. The command line says which.
        device = _kernel_root_argument(root) or device
    return _block_device_number(root, device)


def _kernel_root_argument(root: Path) -> str | None:
    text = _read_text(root, "/proc/cmdline") or ""
    for arg in reversed(text.split()):  # the last root= wins, as in the kernel
        if arg.startswith("root="):
            return arg[5:]
    return None


def _block_device_number(root: Path, device: str) -> tuple[int, int] | None:
    """MAJ:MIN of a mount source, or None if it is not a block device we can find."""
    for tag, directory in (("UUID=", "by-uuid"), ("PARTUUID=", "by-partuuid"),
                           ("LABEL=", "by-label"), ("PARTLABEL=", "by-partlabel")):
        if device.startswith(tag):
            device = f"/dev/disk/{directory}/{device[len(tag):].strip(chr(34))}"
            break
    if not device.startswith("/dev/"):
        return None
    resolved = _inroot_realpath(root, device)
    try:
        st = os.stat(_host(root, resolved))
    except (OSError, ValueError):
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        return os.major(st.st_rdev), os.minor(st.st_rdev)
    # No device node (an image root, a sysfs-only tree): find it by name in sysfs.
    name = resolved.rsplit("/", 1)[-1]
    if resolved.startswith("/dev/mapper/"):
        name = _dm_device_by_name(root, name) or name
    text = _read_text(root, f"/sys/class/block/{name}/dev") if name else None
    match = _DEVNUM.match(text.strip()) if text else None
    return (int(match[1]), int(match[2])) if match else None


def _dm_device_by_name(root: Path, dm_name: str) -> str | None:
    """The ``dm-N`` whose device-mapper name is ``dm_name`` (``/dev/mapper/NAME``)."""
    for entry in sorted(_scandir(_host(root, "/sys/class/block")), key=lambda e: e.name):
        text = _read_text(root, f"/sys/class/block/{entry.name}/dm/name")
        if text is not None and text.strip() == dm_name:
            return entry.name
    return None


def _drivers_of_block_device(
    root: Path, start: str, seen: set[str]
) -> Iterator[tuple[str, str]]:
    """(module, devpath) for every driver from the sysfs dir ``start`` (in-root path) up
    through its ancestors, recursing into ``slaves`` of stacked devices."""
    if start in seen or not start.startswith("/sys/devices/"):
        return
    seen.add(start)
    yield from _virtual_block_modules(root, start)
    path = start
    while path.startswith("/sys/devices/"):
        devpath = path[len("/sys"):]
        host = _host(root, path)
        if os.path.islink(host / "driver"):
            driver = _inroot_realpath(root, f"{path}/driver")
            module_link = _host(root, driver) / "module"
            if os.path.islink(module_link):
                name = _inroot_realpath(root, f"{driver}/module").rsplit("/", 1)[-1]
            else:
                name = driver.rsplit("/", 1)[-1]  # built in: no module link
            if is_valid_module_name(name):
                yield normalize(name), devpath
        for slave in sorted(e.name for e in _scandir(host / "slaves")):
            slave_path = _inroot_realpath(root, f"{path}/slaves/{slave}")
            yield from _drivers_of_block_device(root, slave_path, seen)
        path = path.rsplit("/", 1)[0]


def _virtual_block_modules(root: Path, path: str) -> Iterator[tuple[str, str]]:
    """Modules behind virtual block devices, which have no ``driver`` link."""
    name = path.rsplit("/", 1)[-1]
    devpath = path[len("/sys"):]
    host = _host(root, path)
    if (host / "dm").is_dir():
        yield "dm_mod", devpath
        uuid = _read_text(root, f"{path}/dm/uuid") or ""
        if uuid.startswith("CRYPT-"):
            yield "dm_crypt", devpath
    level = _read_text(root, f"{path}/md/level")
    if level is not None:
        yield "md_mod", devpath
        personality = _MD_LEVEL_MODULES.get(level.strip())
        if personality:
            yield personality, devpath
    for pattern, module in _VIRTUAL_BLOCK_MODULES:
        if pattern.match(name):
            yield module, devpath
