"""Observation readers: what a root shows about loaded modules, devices and filesystems.

Every reader takes ``root`` (``Path("/")`` for the running system, or an image directory)
and reads only below it; nothing here writes. Sources that do not exist — an image root
usually has no ``/proc`` and no ``/sys`` — give empty results, not errors. All module names
are normalised (``-`` → ``_``) as kmod does.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ObservationError
from .inputs import MAX_OBSERVATION_BYTES, quote_input, read_input, read_optional_input
from .names import is_valid_module_name, module_name_from_path, normalize

PROC_MODULES = "/proc/modules"
MOUNTS_FILES = ("/proc/self/mounts", "/proc/mounts")
MOUNTINFO_FILE = "/proc/self/mountinfo"
FSTAB_FILE = "/etc/fstab"
ROOT_MOUNTPOINTS: tuple[str, ...] = ("/", "/usr")

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
_MAX_SYMLINK_HOPS = 40  # as the kernel's own limit


# ---------------------------------------------------------------------------------------
# Loaded modules: --observed files, /proc/modules, /sys/module


@dataclass(frozen=True)
class ObservedName:
    """A module name seen loaded, and where: ``source`` is ``/proc/modules`` or the
    ``--observed`` file as given; ``line`` is 1-based, None when not from a line."""

    name: str
    source: str
    line: int | None


def parse_observed_text(text: str, origin: str) -> list[ObservedName]:
    """Module names in ``text``: one name per line, ``#`` comments (whole-line or trailing),
    blank lines; ``/proc/modules`` lines and ``lsmod`` output (its header is skipped) give
    their first column. Names are normalised; repeats keep their first occurrence.

    Raises ObservationError naming ``origin:LINE`` for a token that cannot be a module
    name, or a line holding several names (only the first would be taken otherwise).
    """
    found: dict[str, ObservedName] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0]
        if lineno == 1:
            line = line.lstrip("\ufeff")  # a byte order mark from an editor
        tokens = line.split()
        if not tokens:
            continue
        if tokens[:2] == ["Module", "Size"]:  # lsmod's header
            continue
        token = tokens[0]
        if not is_valid_module_name(token):
            as_file = module_name_from_path(token)
            raise ObservationError(
                f"{origin}:{lineno}: {quote_input(token)} is not a module name",
                hint=(f"write the module name, e.g. {quote_input(as_file)}" if as_file else
                      "give one module name per line (letters, digits, '_' or '-'); "
                      "'#' starts a comment; /proc/modules and lsmod output work too"),
            )
        if len(tokens) > 1 and not tokens[1].isdigit():
            # Neither "NAME SIZE …" (/proc/modules, lsmod) nor one name: probably several
            # names on a line, of which only the first would be kept — say so instead.
            raise ObservationError(
                f"{origin}:{lineno}: expected one module name, "
                f"found {quote_input(line.strip())}",
                hint="give one module name per line; /proc/modules and lsmod lines work too",
            )
        name = normalize(token)
        if name not in found:
            found[name] = ObservedName(name, origin, lineno)
    return list(found.values())


def read_observed_file(path: Path) -> list[ObservedName]:
    """The module names in an ``--observed`` file (format: see parse_observed_text).

    Raises ObservationError if the file cannot be read, is not a regular file (a FIFO or
    device is never opened), is larger than MAX_OBSERVATION_BYTES, is not UTF-8, or has a
    bad line.
    """
    data = read_input(path, limit=MAX_OBSERVATION_BYTES, what="observed-modules file",
                      error=ObservationError,
                      hint="give a readable file with one module name per line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ObservationError(
            f"{path}: not UTF-8 text (byte {exc.start}): not an observed-modules file",
            hint="give a text file with one module name per line",
        ) from exc
    return parse_observed_text(text, str(path))


def merge_observed(*groups: Iterable[ObservedName]) -> list[ObservedName]:
    """The names in ``groups``, in order, each once: the first source naming a module is
    the one kept. An --observed file that was also supplied to an earlier trim (so it is
    remembered) names its modules twice; they are still one module observed each."""
    found: dict[str, ObservedName] = {}
    for group in groups:
        for observed in group:
            found.setdefault(observed.name, observed)
    return list(found.values())


def read_proc_modules(root: Path) -> list[ObservedName]:
    """Modules loaded in the running kernel, from ROOT/proc/modules ([] if absent).

    Raises ObservationError if the file exists but cannot be read or parsed, is not a
    regular file, or is larger than MAX_OBSERVATION_BYTES.
    """
    data = read_optional_input(
        _host(root, PROC_MODULES), limit=MAX_OBSERVATION_BYTES, what="the loaded modules",
        error=ObservationError, shown=PROC_MODULES,
        hint="run as a user that can read /proc/modules",
    )
    if data is None:
        return []
    return parse_observed_text(data.decode("utf-8", "replace"), PROC_MODULES)


def read_sys_modules(root: Path) -> list[str]:
    """Loadable modules loaded now, from ROOT/sys/module: the entries with an ``initstate``
    file (builtins appear there too, without one). Sorted, normalised; [] if absent."""
    base = _host(root, "/sys/module")
    names: set[str] = set()
    for entry in _scandir(base):
        if is_valid_module_name(entry.name) and os.path.isfile(
            os.path.join(entry.path, "initstate")
        ):
            names.add(normalize(entry.name))
    return sorted(names)


# ---------------------------------------------------------------------------------------
# Devices


@dataclass(frozen=True)
class DeviceModalias:
    """A device present in sysfs and its modalias, e.g. ``/devices/pci0000:00/0000:00:03.0``
    and ``pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00``."""

    devpath: str
    modalias: str


def read_modaliases(root: Path) -> list[DeviceModalias]:
    """Every device under ROOT/sys/devices with a ``modalias`` file, sorted by devpath.

    Symlinks are not followed (sysfs links form cycles); unreadable or empty modalias files
    are skipped (a device may vanish while we walk). [] if there is no sysfs. Raises
    ObservationError for a modalias that is not a regular file or is oversized.
    """
    base = _host(root, "/sys/devices")
    found: set[DeviceModalias] = set()
    for dirpath, _dirnames, filenames in os.walk(base, followlinks=False):
        if "modalias" not in filenames:
            continue
        inroot = "/sys/devices/" + os.path.relpath(dirpath, base) + "/modalias"
        raw = read_optional_input(Path(dirpath, "modalias"), limit=MAX_OBSERVATION_BYTES,
                                  what="device modalias", error=ObservationError,
                                  shown=_printable(inroot), skip_unreadable=True)
        try:
            value = (raw or b"").decode("utf-8").strip()
        except UnicodeDecodeError:
            continue
        if value:
            rel = os.path.relpath(dirpath, base)
            found.add(DeviceModalias("/devices/" + rel.replace(os.sep, "/"), value))
    return sorted(found, key=lambda d: (d.devpath, d.modalias))


# ---------------------------------------------------------------------------------------
# Filesystems


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


# ---------------------------------------------------------------------------------------
# Root device driver chain


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


# ---------------------------------------------------------------------------------------
# Root-relative file access


def _host(root: Path, inroot: str) -> Path:
    """The host path of the in-root absolute path ``inroot``."""
    return root / inroot.lstrip("/")


def _inroot_realpath(root: Path, inroot: str) -> str:
    """Resolve symlinks in ``inroot`` as if ``root`` were ``/`` (absolute link targets stay
    inside the root; ``..`` stops at it). Missing components are kept as written; a link
    loop stops resolving after _MAX_SYMLINK_HOPS links."""
    pending = [p for p in reversed(inroot.split("/")) if p]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        try:
            target = os.readlink(root.joinpath(*resolved, part))
        except (OSError, ValueError):  # not a link, missing, or a NUL in the name
            resolved.append(part)
            continue
        hops += 1
        if hops > _MAX_SYMLINK_HOPS:
            resolved.append(part)
            resolved.extend(reversed(pending))
            break
        if target.startswith("/"):
            resolved = []
        pending.extend(p for p in reversed(target.split("/")) if p)
    return "/" + "/".join(resolved)


def _read_text(root: Path, inroot: str) -> str | None:
    """A small text file below the root, or None if it cannot be read. Undecodable bytes
    are kept (surrogateescape) so that paths made from them still resolve.

    Raises ObservationError for a file that is not a regular file (never opened) or is
    larger than MAX_OBSERVATION_BYTES.
    """
    raw = read_optional_input(_host(root, inroot), limit=MAX_OBSERVATION_BYTES,
                              what="system information", error=ObservationError,
                              shown=_printable(inroot), skip_unreadable=True)
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


def _printable(value: str) -> str:
    """``value`` with undecodable bytes shown as U+FFFD: it is displayed and sent as JSON."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
