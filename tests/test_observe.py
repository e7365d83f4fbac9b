"""Observation readers against faithful miniature roots: /proc, /sys (with the symlinks real
sysfs has, cycles included), /etc/fstab — and against the machine running the tests."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmodtrim.errors import ObservationError
from kmodtrim.observe import (
    DeviceModalias,
    MountedFilesystem,
    ObservedName,
    RootDriver,
    filesystem_module_aliases,
    parse_observed_text,
    read_filesystems,
    read_modaliases,
    read_observed_file,
    read_proc_modules,
    read_sys_modules,
    root_device_drivers,
)

DATA = Path(__file__).parent / "data"

NET_PCI = "/devices/pci0000:00/0000:00:03.0"
BLK_PCI = "/devices/pci0000:00/0000:00:04.0"
NET_MODALIAS = "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00"
BLK_MODALIAS = "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"
ROOT_CHAIN = [
    RootDriver("virtio_blk", "/", f"{BLK_PCI}/virtio1"),
    RootDriver("virtio_pci", "/", BLK_PCI),
]


# ---------------------------------------------------------------------------------------
# Building roots


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, path)


def make_sysfs(root: Path) -> None:
    """A qemu VM's sysfs in miniature: a virtio NIC at 00:03.0 and a virtio disk (vda, with
    partition vda1) at 00:04.0, drivers as modules, ext4 built in — with the same relative
    symlinks, and the same cycles, as the real thing."""
    sys = root / "sys"
    for pci, modalias, virtio, virtio_alias, driver in (
        ("0000:00:03.0", NET_MODALIAS, "virtio0", "virtio:d00000001v00001AF4", "virtio_net"),
        ("0000:00:04.0", BLK_MODALIAS, "virtio1", "virtio:d00000002v00001AF4", "virtio_blk"),
    ):
        dev = sys / "devices/pci0000:00" / pci
        write(dev / "modalias", modalias + "\n")
        link(dev / "driver", "../../../bus/pci/drivers/virtio-pci")
        link(dev / "subsystem", "../../../bus/pci")
        link(sys / "bus/pci/devices" / pci, f"../../../devices/pci0000:00/{pci}")
        write(dev / virtio / "modalias", virtio_alias + "\n")
        link(dev / virtio / "driver", f"../../../../bus/virtio/drivers/{driver}")
        link(dev / virtio / "subsystem", "../../../../bus/virtio")
        link(sys / "bus/virtio/drivers" / driver / "module", f"../../../../module/{driver}")
        link(sys / "module" / driver / "drivers" / f"virtio:{driver}",
             f"../../../bus/virtio/drivers/{driver}")
        write(sys / "module" / driver / "initstate", "live\n")
    link(sys / "bus/pci/drivers/virtio-pci/module", "../../../../module/virtio_pci")
    link(sys / "module/virtio_pci/drivers/pci:virtio-pci", "../../../bus/pci/drivers/virtio-pci")
    write(sys / "module/virtio_pci/initstate", "live\n")
    write(sys / "module/ext4/parameters/.keep", "")  # a builtin: no initstate

    vda = sys / "devices/pci0000:00/0000:00:04.0/virtio1/block/vda"
    write(vda / "dev", "254:0\n")
    write(vda / "vda1/dev", "254:1\n")
    write(vda / "vda1/partition", "1\n")
    (vda / "slaves").mkdir()
    link(vda / "subsystem", "../../../../../../class/block")
    link(vda / "vda1/subsystem", "../../../../../../../class/block")
    link(vda / "bdi", "../../../../../virtual/bdi/254:0")
    write(sys / "devices/virtual/bdi/254:0/read_ahead_kb", "128\n")
    link(sys / "devices/virtual/bdi/254:0/subsystem", "../../../../class/bdi")
    for name, rel in (("vda", "vda"), ("vda1", "vda/vda1")):
        link(sys / "class/block" / name,
             f"../../devices/pci0000:00/0000:00:04.0/virtio1/block/{rel}")
    link(sys / "dev/block/254:0", "../../devices/pci0000:00/0000:00:04.0/virtio1/block/vda")
    link(sys / "dev/block/254:1",
         "../../devices/pci0000:00/0000:00:04.0/virtio1/block/vda/vda1")


def add_mapper_device(root: Path, dm_name: str, uuid: str) -> None:
    """dm-0 (253:0) named ``dm_name`` stacked on vda1, as LVM or cryptsetup make it."""
    dm = root / "sys/devices/virtual/block/dm-0"
    write(dm / "dev", "253:0\n")
    write(dm / "dm/name", dm_name + "\n")
    write(dm / "dm/uuid", uuid + "\n")
    link(dm / "slaves/vda1", "../../../../pci0000:00/0000:00:04.0/virtio1/block/vda/vda1")
    link(root / "sys/class/block/dm-0", "../../devices/virtual/block/dm-0")
    link(root / "sys/dev/block/253:0", "../../devices/virtual/block/dm-0")


def mounts(root: Path, *lines: str) -> None:
    write(root / "proc/self/mounts", "".join(line + "\n" for line in lines))


def names(observed: list[ObservedName]) -> list[str]:
    return [o.name for o in observed]


# ---------------------------------------------------------------------------------------
# --observed files and /proc/modules


def test_observed_text_accepts_names_comments_and_blank_lines() -> None:
    text = (
        "# recorded on a bookworm VM\n"
        "\n"
        "virtio_net\n"
        "virtio-blk   # dash spelling, trailing comment\n"
        "   ext4\t\n"
        "#virtio_pci commented out\n"
    )
    assert parse_observed_text(text, "seen.txt") == [
        ObservedName("virtio_net", "seen.txt", 3),
        ObservedName("virtio_blk", "seen.txt", 4),
        ObservedName("ext4", "seen.txt", 5),
    ]


def test_observed_duplicates_collapse_to_first_occurrence_across_spellings() -> None:
    observed = parse_observed_text("virtio-net\next4\nvirtio_net\next4\n", "f")
    assert observed == [ObservedName("virtio_net", "f", 1), ObservedName("ext4", "f", 2)]


def test_observed_text_tolerates_crlf_and_byte_order_mark() -> None:
    assert names(parse_observed_text("\ufeffvirtio_net\r\next4\r\n", "f")) == [
        "virtio_net", "ext4"
    ]


def test_proc_modules_lines_give_their_first_column() -> None:
    text = (
        "virtio_net 61440 0 - Live 0x0000000000000000\n"
        "net_failover 24576 1 virtio_net, Live 0xffffffffc0412000\n"
        "zfs 4595712 6 - Live 0xffffffffc0a00000 (POE)\n"
        "nf_conntrack 180224 1 - Unloading 0x0000000000000000\n"
    )
    assert names(parse_observed_text(text, "m")) == [
        "virtio_net", "net_failover", "zfs", "nf_conntrack"
    ]


def test_lsmod_output_is_accepted_without_its_header() -> None:
    observed = parse_observed_text((DATA / "lsmod-bookworm-qemu.txt").read_text(), "lsmod.txt")
    assert len(observed) == 21
    assert observed[0] == ObservedName("binfmt_misc", "lsmod.txt", 2)
    assert "Module" not in names(observed)
    assert "virtio_pci_modern_dev" in names(observed)


def test_recorded_observation_file_reads_with_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "observed.txt",
                 "# Modules loaded after boot in a Debian 12 VM.\n# One name per line.\n"
                 "aesni_intel\nata_generic\nvirtio_blk\n")
    observed = read_observed_file(path)
    assert observed[0] == ObservedName("aesni_intel", str(path), 3)
    assert names(observed) == ["aesni_intel", "ata_generic", "virtio_blk"]


@pytest.mark.parametrize(
    ("text", "line", "token"),
    [
        ("virtio_net\nvirtio_blk.ko\n", 2, "virtio_blk.ko"),
        ("# header\n\n/lib/modules/6.1.0/kernel/ext4.ko\n", 3,
         "/lib/modules/6.1.0/kernel/ext4.ko"),
        ("ext4\nnet/virtio\n", 2, "net/virtio"),
        ("x" * 65 + "\n", 1, "x" * 65),
    ],
)
def test_token_that_is_not_a_module_name_is_an_error_with_file_and_line(
    text: str, line: int, token: str
) -> None:
    with pytest.raises(ObservationError) as err:
        parse_observed_text(text, "seen.txt")
    assert str(err.value) == f"seen.txt:{line}: {token!r} is not a module name"
    assert err.value.hint


def test_module_file_name_error_suggests_the_module_name() -> None:
    with pytest.raises(ObservationError) as err:
        parse_observed_text("virtio-blk.ko.xz\n", "seen.txt")
    assert err.value.hint is not None and "'virtio_blk'" in err.value.hint


def test_several_names_on_one_line_are_an_error_not_silently_dropped() -> None:
    with pytest.raises(ObservationError, match=r"^seen\.txt:2: expected one module name"):
        parse_observed_text("ext4\nvirtio_net virtio_blk\n", "seen.txt")


@settings(database=None, derandomize=True)
@given(st.text(alphabet=st.sampled_from("ab_-9 #\t\n\r\ufeff.:/é"), max_size=80))
def test_any_text_gives_names_or_an_observation_error(text: str) -> None:
    try:
        observed = parse_observed_text(text, "f")
    except ObservationError as exc:
        assert str(exc).startswith("f:")
        return
    assert len({o.name for o in observed}) == len(observed)
    assert all("-" not in o.name and o.line is not None and o.line >= 1 for o in observed)


def test_unreadable_observed_file_is_an_observation_error(tmp_path: Path) -> None:
    with pytest.raises(ObservationError, match="cannot read"):
        read_observed_file(tmp_path / "missing.txt")
    with pytest.raises(ObservationError, match="cannot read"):
        read_observed_file(tmp_path)  # a directory


def test_observed_file_that_is_not_utf8_is_an_observation_error(tmp_path: Path) -> None:
    path = tmp_path / "binary"
    path.write_bytes(b"virtio_net\n\xff\xfe\x00garbage\n")
    with pytest.raises(ObservationError, match="not UTF-8"):
        read_observed_file(path)


def test_proc_modules_of_a_root_are_read_with_source_and_line(tmp_path: Path) -> None:
    sample = (DATA / "proc-modules-bookworm-qemu.txt").read_text()
    write(tmp_path / "proc/modules", sample)
    loaded = read_proc_modules(tmp_path)
    assert len(loaded) == 43
    assert loaded[0] == ObservedName("binfmt_misc", "/proc/modules", 1)
    assert ObservedName("virtio_blk", "/proc/modules", 31) in loaded
    assert {"ext4", "jbd2", "virtio_pci", "dm_mod"} <= set(names(loaded))


def test_sys_module_lists_loaded_modules_but_not_builtins(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    write(tmp_path / "sys/module/snd-dummy/initstate", "live\n")
    assert read_sys_modules(tmp_path) == [
        "snd_dummy", "virtio_blk", "virtio_net", "virtio_pci"
    ]


def test_missing_proc_and_sys_give_empty_results(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()  # an image root: no /proc, no /sys, no fstab
    assert read_proc_modules(tmp_path) == []
    assert read_sys_modules(tmp_path) == []
    assert read_modaliases(tmp_path) == []
    assert read_filesystems(tmp_path) == []
    assert root_device_drivers(tmp_path) == []
    assert read_proc_modules(tmp_path / "does-not-exist") == []


# ---------------------------------------------------------------------------------------
# Devices


def test_modaliases_of_every_device_sorted_by_devpath(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    assert read_modaliases(tmp_path) == [
        DeviceModalias(NET_PCI, NET_MODALIAS),
        DeviceModalias(f"{NET_PCI}/virtio0", "virtio:d00000001v00001AF4"),
        DeviceModalias(BLK_PCI, BLK_MODALIAS),
        DeviceModalias(f"{BLK_PCI}/virtio1", "virtio:d00000002v00001AF4"),
    ]


def test_modalias_walk_does_not_follow_symlink_cycles(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    dev = tmp_path / "sys/devices/pci0000:00/0000:00:03.0"
    link(dev / "virtio0/self", "..")  # a link to an ancestor: endless if followed
    link(dev / "firmware_node", "../../pci0000:00")
    link(tmp_path / "sys/devices/pci0000:00/loop-back", "../../devices")
    # In a daemon thread, so that a walk that follows links fails here instead of hanging.
    result: list[list[DeviceModalias]] = []
    walker = threading.Thread(target=lambda: result.append(read_modaliases(tmp_path)),
                              daemon=True)
    walker.start()
    walker.join(timeout=10)
    assert not walker.is_alive(), "the modalias walk followed a symlink cycle"
    found = result[0]
    assert len(found) == 4
    assert all("self" not in d.devpath and "loop-back" not in d.devpath for d in found)


def test_unreadable_or_empty_modalias_is_skipped(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    write(tmp_path / "sys/devices/platform/serial8250/modalias", "platform:serial8250\n")
    write(tmp_path / "sys/devices/platform/empty/modalias", "\n")
    (tmp_path / "sys/devices/platform/gone/modalias").mkdir(parents=True)  # not a file
    found = read_modaliases(tmp_path)
    assert DeviceModalias("/devices/platform/serial8250", "platform:serial8250") in found
    assert [d.devpath for d in found if d.devpath.startswith("/devices/platform")] == [
        "/devices/platform/serial8250"
    ]


# ---------------------------------------------------------------------------------------
# Filesystems


def test_mounts_are_read_with_escaped_mountpoints(tmp_path: Path) -> None:
    write(tmp_path / "proc/self/mounts", (DATA / "mounts-bookworm-qemu.txt").read_text())
    found = read_filesystems(tmp_path)
    assert len(found) == 22
    assert MountedFilesystem("ext4", "/", "/proc/self/mounts", "/dev/vda1") in found
    assert MountedFilesystem("xfs", "/srv/backup volume", "/proc/self/mounts", "/dev/vdb1") in found


def test_proc_mounts_is_the_fallback_for_proc_self_mounts(tmp_path: Path) -> None:
    write(tmp_path / "proc/mounts", "/dev/vda1 / ext4 rw,relatime 0 0\n")
    assert read_filesystems(tmp_path) == [
        MountedFilesystem("ext4", "/", "/proc/self/mounts", "/dev/vda1")
    ]


def test_fstab_comments_swap_and_bind_skipped_type_lists_expanded(tmp_path: Path) -> None:
    write(tmp_path / "etc/fstab", (DATA / "fstab-bookworm.txt").read_text())
    found = [(f.fstype, f.mountpoint) for f in read_filesystems(tmp_path)]
    assert found == [
        ("ext4", "/"),
        ("vfat", "/boot/efi"),
        ("udf", "/media/cdrom0"),
        ("iso9660", "/media/cdrom0"),
        ("xfs", "/srv/backup volume"),
        ("nfs4", "/mnt/nfs"),
        ("fuse.sshfs", "/mnt/remote"),
        ("tmpfs", "/tmp"),
    ]
    assert all(f.source == "/etc/fstab" for f in read_filesystems(tmp_path))


def test_mounts_come_before_fstab_and_each_source_is_kept(tmp_path: Path) -> None:
    mounts(tmp_path, "/dev/vda1 / ext4 rw 0 0", "/dev/vda1 / ext4 rw 0 0")
    write(tmp_path / "etc/fstab", "/dev/vda1 / ext4 defaults 0 1\n")
    assert read_filesystems(tmp_path) == [
        MountedFilesystem("ext4", "/", "/proc/self/mounts", "/dev/vda1"),
        MountedFilesystem("ext4", "/", "/etc/fstab", "/dev/vda1"),
    ]


def test_fstab_escapes_decode_space_tab_and_backslash(tmp_path: Path) -> None:
    write(tmp_path / "etc/fstab",
          "LABEL=data /mnt/my\\040disk\\011x\\134y ext4 defaults 0 2\n")
    assert read_filesystems(tmp_path)[0].mountpoint == "/mnt/my disk\tx\\y"


def test_pseudo_filesystems_are_skipped_modular_ones_kept(tmp_path: Path) -> None:
    write(tmp_path / "proc/self/mounts", (DATA / "mounts-bookworm-qemu.txt").read_text())
    write(tmp_path / "etc/fstab", (DATA / "fstab-bookworm.txt").read_text())
    aliases = filesystem_module_aliases(read_filesystems(tmp_path))
    assert sorted(aliases) == [
        "fs-autofs", "fs-binfmt_misc", "fs-configfs", "fs-ext4", "fs-fuse", "fs-fusectl",
        "fs-iso9660", "fs-nfs4", "fs-pstore", "fs-udf", "fs-vfat", "fs-xfs",
    ]
    assert [f.source for f in aliases["fs-ext4"]] == ["/proc/self/mounts", "/etc/fstab"]
    assert aliases["fs-fuse"] == [
        MountedFilesystem("fuse.sshfs", "/mnt/remote", "/etc/fstab", "user@host:/data")
    ]


@pytest.mark.parametrize(
    "fstype",
    ["fuse", "overlay", "nfs", "cifs", "9p", "vfat", "iso9660", "btrfs", "xfs", "squashfs",
     "efivarfs", "autofs", "binfmt_misc", "configfs"],
)
def test_filesystems_that_can_be_modules_get_an_alias(fstype: str) -> None:
    fs = MountedFilesystem(fstype, "/mnt", "/proc/self/mounts")
    assert filesystem_module_aliases([fs]) == {f"fs-{fstype}": [fs]}


@pytest.mark.parametrize(
    "fstype",
    ["proc", "sysfs", "devtmpfs", "tmpfs", "cgroup", "cgroup2", "devpts", "mqueue",
     "debugfs", "tracefs", "securityfs", "hugetlbfs", "bpf", "auto", "none", "swap"],
)
def test_filesystems_never_built_as_modules_get_no_alias(fstype: str) -> None:
    assert filesystem_module_aliases([MountedFilesystem(fstype, "/x", "/etc/fstab")]) == {}


# ---------------------------------------------------------------------------------------
# Root device driver chain


def test_root_chain_from_mountinfo_finds_virtio_blk_and_virtio_pci(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    write(tmp_path / "proc/self/mountinfo", (DATA / "mountinfo-bookworm-qemu.txt").read_text())
    assert root_device_drivers(tmp_path) == ROOT_CHAIN


def test_root_chain_from_mounts_resolves_the_device_name_in_sysfs(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    mounts(tmp_path, "sysfs /sys sysfs rw 0 0", "/dev/vda1 / ext4 rw,relatime 0 0")
    assert root_device_drivers(tmp_path) == ROOT_CHAIN


def test_root_chain_follows_dev_disk_by_uuid_links_inside_the_root(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    uuid = "2f0e6a4c-3b8e-4d0a-9a47-5d0c2b7e9f11"
    link(tmp_path / "dev/disk/by-uuid" / uuid, "../../vda1")
    write(tmp_path / "etc/fstab", f"UUID={uuid} / ext4 errors=remount-ro 0 1\n")
    assert root_device_drivers(tmp_path) == ROOT_CHAIN


def test_root_chain_of_dev_root_uses_the_kernel_command_line(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    mounts(tmp_path, "/dev/root / ext4 rw 0 0")
    write(tmp_path / "proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/vda1 ro quiet\n")
    assert root_device_drivers(tmp_path) == ROOT_CHAIN


def test_root_on_device_mapper_includes_dm_mod_and_the_disk_below(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    add_mapper_device(tmp_path, "vg0-root", "LVM-Zx8Q1")
    link(tmp_path / "dev/mapper/vg0-root", "../dm-0")  # dangling: no /dev/dm-0 node
    mounts(tmp_path, "/dev/mapper/vg0-root / ext4 rw 0 0")
    assert [d.module for d in root_device_drivers(tmp_path)] == [
        "dm_mod", "virtio_blk", "virtio_pci"
    ]


def test_root_on_dm_crypt_found_by_mapper_name_without_dev(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    add_mapper_device(tmp_path, "root_crypt", "CRYPT-LUKS2-5f7e0f8a-root_crypt")
    mounts(tmp_path, "/dev/mapper/root_crypt / ext4 rw 0 0")
    found = root_device_drivers(tmp_path)
    assert [d.module for d in found] == ["dm_mod", "dm_crypt", "virtio_blk", "virtio_pci"]
    assert found[0].devpath == "/devices/virtual/block/dm-0"


def test_root_on_md_raid1_includes_md_mod_and_its_personality(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    md = tmp_path / "sys/devices/virtual/block/md0"
    write(md / "dev", "9:0\n")
    write(md / "md/level", "raid1\n")
    link(md / "slaves/vda1", "../../../../pci0000:00/0000:00:04.0/virtio1/block/vda/vda1")
    link(md / "slaves/md0", "../../md0")  # a cycle must not loop
    link(tmp_path / "sys/dev/block/9:0", "../../devices/virtual/block/md0")
    write(tmp_path / "proc/self/mountinfo", "27 1 9:0 / / rw - ext4 /dev/md0 rw\n")
    assert [d.module for d in root_device_drivers(tmp_path)] == [
        "md_mod", "raid1", "virtio_blk", "virtio_pci"
    ]


def test_separate_usr_gets_its_own_chain_and_topmost_root_mount_wins(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    write(tmp_path / "proc/self/mountinfo",
          "1 1 0:2 / / rw - rootfs rootfs rw\n"
          "27 1 254:1 / / rw - ext4 /dev/vda1 rw\n"
          "30 27 254:0 / /usr ro - squashfs /dev/vda ro\n")
    found = root_device_drivers(tmp_path)
    assert found == [*ROOT_CHAIN, RootDriver("virtio_blk", "/usr", f"{BLK_PCI}/virtio1"),
                     RootDriver("virtio_pci", "/usr", BLK_PCI)]


def test_builtin_driver_without_module_link_gives_its_driver_name(tmp_path: Path) -> None:
    make_sysfs(tmp_path)
    (tmp_path / "sys/bus/pci/drivers/virtio-pci/module").unlink()
    mounts(tmp_path, "/dev/vda1 / ext4 rw 0 0")
    assert [d.module for d in root_device_drivers(tmp_path)] == ["virtio_blk", "virtio_pci"]


@pytest.mark.parametrize(
    "line",
    ["overlay / overlay rw,lowerdir=/a,upperdir=/b,workdir=/c 0 0",
     "server:/export / nfs4 rw 0 0",
     "/dev/vdz9 / ext4 rw 0 0"],
)
def test_root_without_a_findable_block_device_gives_nothing(tmp_path: Path, line: str) -> None:
    make_sysfs(tmp_path)
    mounts(tmp_path, line)
    assert root_device_drivers(tmp_path) == []


def test_root_chain_without_sysfs_is_empty(tmp_path: Path) -> None:
    write(tmp_path / "proc/self/mountinfo", (DATA / "mountinfo-bookworm-qemu.txt").read_text())
    assert root_device_drivers(tmp_path) == []


# ---------------------------------------------------------------------------------------
# The machine running the tests


def test_readers_tolerate_the_real_running_system() -> None:
    root = Path("/")
    loaded = read_proc_modules(root)
    assert all(isinstance(o, ObservedName) and o.source == "/proc/modules" for o in loaded)
    assert all(isinstance(n, str) and "-" not in n for n in read_sys_modules(root))
    devices = read_modaliases(root)
    assert all(isinstance(d, DeviceModalias) and d.devpath.startswith("/devices/")
               for d in devices)
    assert devices == sorted(devices, key=lambda d: (d.devpath, d.modalias))
    filesystems = read_filesystems(root)
    if Path("/proc/self/mounts").exists():
        assert any(f.mountpoint == "/" for f in filesystems)
    aliases = filesystem_module_aliases(filesystems)
    assert all(a.startswith("fs-") for a in aliases)
    drivers = root_device_drivers(root)
    assert all(isinstance(d, RootDriver) and d.mountpoint in ("/", "/usr") for d in drivers)


def test_observe_counts_a_file_supplied_again_once(tmp_path: Path) -> None:
    from kmodtrim.operations import Target, gather_evidence
    from kmodtrim.store import record_observation, record_supplied

    seen = tmp_path / "seen.txt"
    seen.write_text("virtio_net\next4\n")
    root = tmp_path / "root"
    root.mkdir()
    record_supplied(root, {"virtio_net": str(seen), "ext4": str(seen)})
    record_observation(root, "boot-1", ["virtio_net", "loop"])
    evidence = gather_evidence(Target(root=root, observed_files=(seen,)))
    assert [(o.name, o.source, o.line) for o in evidence.observed] == [
        ("virtio_net", str(seen), 1), ("ext4", str(seen), 2),
        ("loop", "recorded on 1 boot(s)", None),
    ]
