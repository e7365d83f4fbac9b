"""Filesystems: those mounted now (mounts, mountinfo) and those in fstab, and the
``fs-TYPE`` module aliases they need."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .inroot import _printable, _read_text

MOUNTS_FILES = ("/proc/self/mounts", "/proc/mounts")
MOUNTINFO_FILE = "/proc/self/mountinfo"
FSTAB_FILE = "/etc/fstab"

# Filesystems that are always built into the kernel (or are not filesystems at all): no
# module alias is worth asking for. Anything not listed here is passed on — an fstype that
# names no module simply matches nothing, while wrongly skipping a modular one (fuse,
# overlay, nfs, 9p, vfat, isofs, autofs, configfs, efivarfs, pstore, …) would trim a
# filesystem the machine mounts.
PSEUDO_FILESYSTEMS = frozenset({
    "anon_inodefs", "bdev", "bpf", "cgroup", "cgroup2", "cpuset", "dax", "debugfs",
    "devpts", "devtmpfs", "hugetlbfs", "mqueue", "nsfs", "pidfs", "pipefs", "proc",
    "ramfs", "rootfs", "securityfs", "selinuxfs", "smackfs", "sockfs", "sysfs", "tmpfs",
    "tracefs",
})
# fstab types that name no filesystem: let mount probe ("auto"), bind/move ("none"),
# entries mount(8) ignores ("ignore"), swap space ("swap").
_NOT_A_FILESYSTEM = frozenset({"auto", "none", "ignore", "swap"})

_OCTAL_ESCAPE = re.compile(r"\\([0-3][0-7]{2})")
_DEVNUM = re.compile(r"^(\d+):(\d+)$")


@dataclass(frozen=True)
class MountedFilesystem:
    """A filesystem mounted now (``source`` ``/proc/self/mounts``) or declared in
    ``/etc/fstab``. ``device`` is what is mounted (``/dev/vda1``, ``UUID=…``, ``tmpfs``)."""

    fstype: str
    mountpoint: str
    source: str
    device: str = ""


def read_filesystems(root: Path) -> list[MountedFilesystem]:
    """Filesystems mounted now (ROOT/proc/self/mounts, else ROOT/proc/mounts) followed by
    those in ROOT/etc/fstab, in file order, without repeats within a source.

    fstab ``swap`` entries and types that name no filesystem (``auto``, ``none``,
    ``ignore``) are left out; a comma-separated type list gives one entry per type;
    octal escapes (``\\040`` for a space) are decoded. Missing files give nothing.
    """
    result: list[MountedFilesystem] = []
    for origin in MOUNTS_FILES:
        entries = _read_mounts_file(root, origin)
        if entries is not None:
            result.extend(_unique(_as_filesystems(entries, "/proc/self/mounts")))
            break
    result.extend(_unique(_as_filesystems(_read_mounts_file(root, FSTAB_FILE) or [], FSTAB_FILE)))
    return result


def filesystem_module_aliases(
    filesystems: Iterable[MountedFilesystem],
) -> dict[str, list[MountedFilesystem]]:
    """The module alias modprobe would request for each filesystem type (``fs-ext4``) →
    the filesystems needing it. Types never built as modules (proc, sysfs, tmpfs,
    cgroup2, devpts, … see PSEUDO_FILESYSTEMS) are skipped; a FUSE subtype such as
    ``fuse.sshfs`` asks for its base type (``fs-fuse``)."""
    aliases: dict[str, list[MountedFilesystem]] = {}
    for fs in filesystems:
        fstype = fs.fstype.split(".", 1)[0]  # fuse.sshfs, fuseblk.ntfs: the kernel type
        if not fstype or fstype in PSEUDO_FILESYSTEMS or fstype in _NOT_A_FILESYSTEM:
            continue
        users = aliases.setdefault(f"fs-{fstype}", [])
        if fs not in users:
            users.append(fs)
    return aliases


@dataclass(frozen=True)
class _Mount:
    device: str
    mountpoint: str
    fstype: str
    devnum: tuple[int, int] | None = None  # from mountinfo; 0:N is an anonymous device


def _read_mounts_file(root: Path, inroot: str) -> list[_Mount] | None:
    """Entries of a mounts/fstab-format file (None if it cannot be read). Lines with fewer
    than three fields are skipped, as mount(8) does."""
    text = _read_text(root, inroot)
    if text is None:
        return None
    entries = []
    for raw in text.splitlines():
        fields = raw.split()
        if len(fields) < 3:
            continue
        if inroot == FSTAB_FILE and fields[0].startswith("#"):  # fstab(5): comment lines
            continue
        device, mountpoint, fstype = (_unescape(f) for f in fields[:3])
        entries.append(_Mount(device, mountpoint, fstype))
    return entries


def _read_mountinfo(root: Path) -> list[_Mount] | None:
    """Entries of ROOT/proc/self/mountinfo, which (unlike mounts) has the device number:
    ``ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL…] - FSTYPE SOURCE SUPEROPTS``."""
    text = _read_text(root, MOUNTINFO_FILE)
    if text is None:
        return None
    entries = []
    for raw in text.splitlines():
        fields = raw.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        match = _DEVNUM.match(fields[2])
        devnum = (int(match[1]), int(match[2])) if match else None
        entries.append(_Mount(
            _unescape(fields[sep + 2]), _unescape(fields[4]), _unescape(fields[sep + 1]), devnum
        ))
    return entries


def _as_filesystems(entries: Iterable[_Mount], origin: str) -> Iterator[MountedFilesystem]:
    for entry in entries:
        for fstype in entry.fstype.split(","):
            if fstype and fstype not in _NOT_A_FILESYSTEM:
                yield MountedFilesystem(
                    _printable(fstype), _printable(entry.mountpoint), origin,
                    _printable(entry.device),
                )


def _unique(items: Iterable[MountedFilesystem]) -> list[MountedFilesystem]:
    return list(dict.fromkeys(items))


def _unescape(field: str) -> str:
    """Decode the octal escapes mounts and fstab use for space, tab, newline, backslash."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m[1], 8)), field)
