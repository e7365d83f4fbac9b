"""depmod and initramfs regeneration for real: depmod, dracut, cpio and compressors on
scratch roots holding Debian's cloud kernel; lsinitramfs/lsinitrd as oracles."""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kernels import KernelTree, copy_kernel_tree
from kmodtrim.errors import InputError, KernelNotFoundError
from kmodtrim.paths import kept_previous_images
from kmodtrim.regen import (
    InitramfsError,
    InitramfsResult,
    detect_initramfs_method,
    drop_booted_previous,
    forget_previous_initramfs,
    initramfs_path,
    list_initramfs,
    regenerate_initramfs,
    restore_previous_initramfs,
    run_depmod,
    verify_initramfs,
)
from need import need

KVER = "6.1.0-99-test-amd64"
# Loadable (not built in) in Debian's cloud kernel: the boot disk and NIC of a qemu VM.
BOOT_CRITICAL = ("virtio_blk", "virtio_net", "virtio_pci")
# Just enough dracut for a fast, small image: the generator still resolves module
# dependencies, installs modules.* and compresses, as on a real system.
DRACUT_CONF = """\
dracutmodules+=" base "
add_drivers+=" virtio_blk virtio_net virtio_pci "
compress="zstd -1 -q"
"""

@pytest.fixture
def dracut_installed() -> None:
    need("dracut")


needs_dracut = pytest.mark.usefixtures("dracut_installed")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _touch(root: Path, *relpaths: str, text: str = "") -> None:
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# ---------------------------------------------------------------------------------------
# depmod


@pytest.fixture
def kernel_copy(cloud_kernel: KernelTree, tmp_path: Path) -> KernelTree:
    """A writable copy of the real cloud kernel (with its depmod output)."""
    return copy_kernel_tree(cloud_kernel, tmp_path / "root")


@pytest.mark.kernel
def test_full_depmod_forgets_removed_module_and_finds_restored_one(
    each_cloud_kernel: KernelTree, tmp_path: Path,
) -> None:
    # Debian 12's plain tree under lib/, Debian 13's .ko.xz under usr/lib (lib -> usr/lib).
    kernel_copy = copy_kernel_tree(each_cloud_kernel, tmp_path / "root")
    moddir = kernel_copy.moddir
    ko = kernel_copy.module_suffix
    module = moddir / f"kernel/drivers/net/virtio_net{ko}"
    rel = str(module.relative_to(moddir))
    kept = module.read_bytes(), module.stat()
    assert rel in (moddir / "modules.dep").read_text()

    module.unlink()
    run_depmod(kernel_copy.root, kernel_copy.kver)
    dep = (moddir / "modules.dep").read_text()
    assert rel not in dep
    assert "virtio_net" not in (moddir / "modules.alias").read_text()
    assert f"kernel/drivers/block/virtio_blk{ko}:" in dep  # the rest is still indexed

    # A restored file keeps its old mtime, older than modules.dep: only a full run sees it.
    module.write_bytes(kept[0])
    os.utime(module, ns=(kept[1].st_atime_ns, kept[1].st_mtime_ns))
    run_depmod(kernel_copy.root, kernel_copy.kver)
    assert f"{rel}: kernel/drivers/net/net_failover{ko}" in (moddir / "modules.dep").read_text()


def test_depmod_on_missing_kernel_names_it(tmp_path: Path) -> None:
    with pytest.raises(KernelNotFoundError, match=f"no module directory for kernel {KVER}"):
        run_depmod(tmp_path, KVER)


# ---------------------------------------------------------------------------------------
# Detection and paths (roots laid out as each distribution lays them out)


def test_debian_with_initramfs_tools_uses_update_initramfs(tmp_path: Path) -> None:
    _touch(tmp_path, "usr/sbin/update-initramfs", "usr/sbin/mkinitramfs",
           "etc/initramfs-tools/initramfs.conf", f"boot/initrd.img-{KVER}")
    assert detect_initramfs_method(tmp_path, KVER) == "update-initramfs"
    assert initramfs_path(tmp_path, KVER, "update-initramfs") == (
        tmp_path / f"boot/initrd.img-{KVER}")


def test_debian_with_dracut_beside_initramfs_tools_core_uses_dracut(tmp_path: Path) -> None:
    # dracut replaces initramfs-tools (update-initramfs goes), the -core packages coexist.
    _touch(tmp_path, "usr/bin/dracut", "usr/sbin/mkinitramfs", "etc/initramfs-tools/x",
           "etc/debian_version", f"boot/initrd.img-{KVER}")
    assert detect_initramfs_method(tmp_path, KVER) == "dracut"
    assert initramfs_path(tmp_path, KVER, "dracut") == tmp_path / f"boot/initrd.img-{KVER}"


def test_fedora_uses_dracut_and_initramfs_img(tmp_path: Path) -> None:
    _touch(tmp_path, "usr/bin/dracut", "etc/dracut.conf", f"boot/initramfs-{KVER}.img",
           "boot/loader/entries/abc-6.1.conf")
    assert detect_initramfs_method(tmp_path, KVER) == "dracut"
    assert initramfs_path(tmp_path, KVER, "dracut") == tmp_path / f"boot/initramfs-{KVER}.img"


def test_initrd_in_boot_entry_directory_uses_kernel_install(tmp_path: Path) -> None:
    _touch(tmp_path, "usr/bin/dracut", f"efi/0123abcd/{KVER}/initrd", f"efi/0123abcd/{KVER}/linux")
    _touch(tmp_path, "etc/machine-id", text="0123abcd\n")
    assert detect_initramfs_method(tmp_path, KVER) == "kernel-install"
    assert initramfs_path(tmp_path, KVER, "kernel-install") == (
        tmp_path / f"efi/0123abcd/{KVER}/initrd")


def test_nothing_to_regenerate_is_skipped_with_reason(tmp_path: Path) -> None:
    assert detect_initramfs_method(tmp_path, KVER) == "skip"
    result = regenerate_initramfs(tmp_path, KVER, ["virtio_blk"])
    assert (result.method, result.image, result.previous) == ("skip", None, None)
    assert result.skipped_reason and "no initramfs generator" in result.skipped_reason

    _touch(tmp_path, "usr/bin/dracut")  # a generator, but this kernel boots without initramfs
    result = regenerate_initramfs(tmp_path, KVER, ["virtio_blk"], "auto")
    assert result.skipped_reason and f"initramfs-{KVER}.img" in result.skipped_reason

    result = regenerate_initramfs(tmp_path, KVER, [], "skip")
    assert result.skipped_reason == "initramfs regeneration is disabled (method skip)"


def test_unknown_method_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown initramfs method 'mkinitcpio'"):
        regenerate_initramfs(tmp_path, KVER, [], "mkinitcpio")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Reading images: built with cpio and the real compressors, checked against lsinitramfs


def _cpio(src: Path) -> bytes:
    names = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
    return subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=src, check=True,
                          input="\n".join(names).encode(), capture_output=True).stdout


def _tree(base: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return base


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda data: data,
    "gzip": lambda data: subprocess.run(["gzip", "-c"], input=data, capture_output=True,
                                        check=True).stdout,
    "xz": lambda data: lzma.compress(data, check=lzma.CHECK_CRC32),
    "zstd": lambda data: subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True,
                                        check=True).stdout,
    "bzip2": lambda data: subprocess.run(["bzip2", "-c"], input=data, capture_output=True,
                                         check=True).stdout,
}


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_image_with_early_microcode_and_compressed_main_lists_its_modules(
    tmp_path: Path, compression: str
) -> None:
    early = _cpio(_tree(tmp_path / "early", {
        "kernel/x86/microcode/GenuineIntel.bin": b"\x01" * 3000,
        # A .ko outside the module tree is not a loadable module.
        "kernel/stray.ko": b"x",
    }))
    mods = f"usr/lib/modules/{KVER}/kernel/drivers"
    main = _cpio(_tree(tmp_path / "main", {
        f"{mods}/block/virtio_blk.ko": os.urandom(5000),
        f"{mods}/net/virtio-net.ko.xz": b"xz",
        f"{mods}/virtio/virtio_pci.ko.zst": b"zstd",
        f"{mods}/scsi/sd_mod.ko.gz": b"gz",
        f"usr/lib/modules/{KVER}/modules.dep": b"",
        "init": b"#!/bin/sh\n",
    }))
    image = tmp_path / "initrd.img"
    # The kernel (and dracut) pad the early archive to a 512-byte boundary.
    image.write_bytes(early + b"\0" * (-len(early) % 512) + COMPRESSORS[compression](main))

    names = list_initramfs(image)
    assert names == {"virtio_blk", "virtio_net", "virtio_pci", "sd_mod"}
    assert verify_initramfs(image, ["virtio-blk", "nvme", "ext4"]) == ["ext4", "nvme"]
    if shutil.which("lsinitramfs") and compression != "bzip2":
        listed = subprocess.run(["lsinitramfs", str(image)], capture_output=True, text=True,
                                check=False).stdout.split()
        assert f"{mods}/net/virtio-net.ko.xz" in listed
        assert sum(p.endswith((".ko", ".ko.xz", ".ko.zst", ".ko.gz")) and "modules" in p
                   for p in listed) == len(names)


def test_image_that_is_not_an_initramfs_is_an_error(tmp_path: Path) -> None:
    image = tmp_path / "initrd.img"
    image.write_bytes(b"\x7fELF" + b"\0" * 200)
    with pytest.raises(InitramfsError, match="not a readable initramfs: unknown format"):
        list_initramfs(image)
    good = _cpio(_tree(tmp_path / "t", {f"lib/modules/{KVER}/a.ko": b"a" * 100}))
    image.write_bytes(COMPRESSORS["gzip"](good)[:-40])
    with pytest.raises(InitramfsError, match=r"truncated gzip segment|corrupt gzip"):
        list_initramfs(image)
    image.write_bytes(good[:150])
    with pytest.raises(InitramfsError, match=r"runs past the end|truncated cpio"):
        list_initramfs(image)
    with pytest.raises(InitramfsError, match="cannot read initramfs image"):
        list_initramfs(tmp_path / "absent.img")


# ---------------------------------------------------------------------------------------
# Generating for real with dracut on a root holding Debian's cloud kernel


def _with_dracut_conf(tree: KernelTree) -> KernelTree:
    conf = tree.root / "etc/dracut.conf.d/10-minimal.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(DRACUT_CONF)
    return tree


@pytest.fixture
def dracut_root(kernel_copy: KernelTree) -> KernelTree:
    """The cloud kernel copy with a minimal dracut configuration of its own."""
    builtin = (kernel_copy.moddir / "modules.builtin").read_text()
    for name in BOOT_CRITICAL:  # the test means something only if they are loadable
        assert f"/{name}.ko" not in builtin
    return _with_dracut_conf(kernel_copy)


@pytest.fixture
def each_dracut_root(each_cloud_kernel: KernelTree, tmp_path: Path) -> KernelTree:
    """A copy of each release's cloud kernel (Debian 13's: .ko.xz, usrmerged) with a
    minimal dracut configuration of its own."""
    return _with_dracut_conf(copy_kernel_tree(each_cloud_kernel, tmp_path / "root"))


def _loadable(tree: KernelTree, names: tuple[str, ...]) -> tuple[str, ...]:
    """names without the modules the kernel has built in (Debian 13 builds in virtio_pci)."""
    builtin = {Path(line).name.removesuffix(".ko").replace("-", "_")
               for line in (tree.moddir / "modules.builtin").read_text().split()}
    return tuple(n for n in names if n not in builtin)


@needs_dracut
@pytest.mark.kernel
@pytest.mark.slow
def test_dracut_image_is_verified_swapped_and_restorable(each_dracut_root: KernelTree) -> None:
    tree = each_dracut_root
    root, kver, ko = tree.root, tree.kver, tree.module_suffix
    critical = _loadable(tree, BOOT_CRITICAL)
    first = regenerate_initramfs(root, kver, critical, "dracut")
    image = root / f"boot/initramfs-{kver}.img"
    assert (first.method, first.image, first.previous) == ("dracut", image, None)
    assert set(critical) <= first.modules and {"virtio_blk", "virtio_net"} <= set(critical)
    # Their dependencies, where loadable (Debian 13 builds virtio and virtio_ring in).
    assert set(_loadable(tree, ("virtio", "virtio_ring", "net_failover"))) <= first.modules
    assert first.skipped_reason is None
    # lsinitrd (dracut's own lister) sees the same modules.
    listed = subprocess.run(["lsinitrd", str(image)], capture_output=True, text=True,
                            check=True).stdout
    assert {line.rsplit("/", 1)[-1].removesuffix(ko) for line in listed.splitlines()
            if line.endswith(ko)} == first.modules
    first_sha = _sha(image)
    assert detect_initramfs_method(root, kver) == "skip"  # dracut itself is not in this root

    # Trim a module the image does not need; the next image is swapped in, the old kept.
    (tree.moddir / f"kernel/drivers/virtio/virtio_balloon{ko}").unlink()
    run_depmod(root, kver)
    second = regenerate_initramfs(root, kver, critical, "dracut")
    assert second.image == image
    assert second.previous == root / f"boot/initramfs-{kver}.img.kmodtrim-prev"
    assert _sha(second.previous) == first_sha
    assert _sha(image) != first_sha  # dracut stamps its build time
    assert not list(image.parent.glob("*.kmodtrim-new"))

    restore_previous_initramfs(root, kver, second)
    assert _sha(image) == first_sha
    restore_previous_initramfs(root, kver, second)  # rollback recovery may run twice
    assert _sha(image) == first_sha


@needs_dracut
@pytest.mark.kernel
@pytest.mark.slow
def test_image_missing_a_boot_critical_module_is_never_swapped_in(
    dracut_root: KernelTree,
) -> None:
    root, kver = dracut_root.root, dracut_root.kver
    image = root / f"boot/initramfs-{kver}.img"
    image.parent.mkdir(exist_ok=True)
    image.write_bytes(b"the image that boots today")
    image.chmod(0o644)

    # The trim took virtio_net; dracut does not fail for a missing driver, verification must.
    (dracut_root.moddir / "kernel/drivers/net/virtio_net.ko").unlink()
    run_depmod(root, kver)
    with pytest.raises(InitramfsError) as caught:
        regenerate_initramfs(root, kver, [*BOOT_CRITICAL, "nvme"], "dracut")
    assert "lacks boot-critical module(s) nvme, virtio_net" in caught.value.message
    assert image.read_bytes() == b"the image that boots today"
    assert sorted(p.name for p in image.parent.iterdir() if "initramfs" in p.name) == [
        image.name]

    # Without those requirements the same build passes and keeps the old image's mode.
    result = regenerate_initramfs(root, kver, ["virtio_blk"], "dracut")
    assert "virtio_net" not in result.modules
    assert result.previous is not None
    assert result.previous.read_bytes() == b"the image that boots today"
    assert image.stat().st_mode & 0o777 == 0o644


@needs_dracut
@pytest.mark.kernel
def test_generator_failure_leaves_image_alone(dracut_root: KernelTree) -> None:
    root, kver = dracut_root.root, dracut_root.kver
    (root / "etc/dracut.conf.d/20-broken.conf").write_text('dracutmodules+=" no-such-module "\n')
    image = root / f"boot/initramfs-{kver}.img"
    image.parent.mkdir(exist_ok=True)
    image.write_bytes(b"old")
    with pytest.raises(InitramfsError, match=r"(?s)dracut could not build.*no-such-module"):
        regenerate_initramfs(root, kver, BOOT_CRITICAL, "dracut")
    assert image.read_bytes() == b"old"
    assert sorted(p.name for p in image.parent.glob("initramfs*")) == [image.name]


@needs_dracut
@pytest.mark.kernel
def test_kernel_install_layout_regenerates_the_entry_initrd(dracut_root: KernelTree) -> None:
    root, kver = dracut_root.root, dracut_root.kver
    (root / "etc/dracut.conf").write_text("")  # dracut is this root's generator
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    entry = root / f"boot/0123456789abcdef0123456789abcdef/{kver}"
    entry.mkdir(parents=True)
    (entry / "initrd").write_bytes(b"entry initrd")
    assert detect_initramfs_method(root, kver) == "kernel-install"

    result = regenerate_initramfs(root, kver, BOOT_CRITICAL, "auto")
    assert (result.method, result.image) == ("kernel-install", entry / "initrd")
    assert set(BOOT_CRITICAL) <= list_initramfs(entry / "initrd")
    assert (entry / "initrd.kmodtrim-prev").read_bytes() == b"entry initrd"
    assert forget_previous_initramfs(root, kver) == [entry / "initrd.kmodtrim-prev"]
    assert not (entry / "initrd.kmodtrim-prev").exists()


@pytest.mark.kernel
def test_initramfs_tools_on_a_root_not_ready_for_chroot_is_a_clear_error(
    kernel_copy: KernelTree,
) -> None:
    root, kver = kernel_copy.root, kernel_copy.kver
    _touch(root, "usr/sbin/update-initramfs", "usr/sbin/mkinitramfs", "etc/initramfs-tools/x")
    image = root / f"boot/initrd.img-{kver}"
    image.write_bytes(b"old")
    assert detect_initramfs_method(root, kver) == "update-initramfs"
    with pytest.raises(InitramfsError, match="chrooted into a complete system") as caught:
        regenerate_initramfs(root, kver, BOOT_CRITICAL)
    assert caught.value.hint and "--initramfs dracut" in caught.value.hint
    assert image.read_bytes() == b"old"
    assert sorted(p.name for p in image.parent.glob("initrd*")) == [image.name]


# ---------------------------------------------------------------------------------------
# Restoring


def test_restore_without_previous_image_removes_the_new_one(tmp_path: Path) -> None:
    image = tmp_path / "boot/initrd.img"
    _touch(tmp_path, "boot/initrd.img", text="new")
    restore_previous_initramfs(tmp_path, KVER, InitramfsResult(
        "dracut", image, None, frozenset(), 0.0, None))
    assert not image.exists()


def test_restore_when_kept_image_is_gone_says_how_to_recover(tmp_path: Path) -> None:
    image = tmp_path / "boot/initrd.img"
    _touch(tmp_path, "boot/initrd.img", text="new")
    result = InitramfsResult("dracut", image, tmp_path / "boot/initrd.img.kmodtrim-prev",
                             frozenset(), 0.0, None)
    with pytest.raises(InitramfsError, match=r"kept image .* is gone") as caught:
        restore_previous_initramfs(tmp_path, KVER, result)
    assert caught.value.hint and f"--kver {KVER}" in caught.value.hint
    assert image.read_text() == "new"


# ---------------------------------------------------------------------------------------
# The previous image, once the new one has booted


def _swapped(root: Path, kver: str, swapped_at: float) -> tuple[Path, Path]:
    image = root / f"boot/initrd.img-{kver}"
    previous = image.with_name(image.name + ".kmodtrim-prev")
    _touch(root, f"boot/initrd.img-{kver}", text="new, smaller")
    _touch(root, f"boot/initrd.img-{kver}.kmodtrim-prev", text="the image it replaced")
    os.utime(image, (swapped_at, swapped_at))
    return image, previous


def test_previous_image_goes_once_a_boot_began_after_the_swap(tmp_path: Path) -> None:
    image, previous = _swapped(tmp_path, KVER, swapped_at=1_000.0)
    assert kept_previous_images(tmp_path) == [previous]
    # The running boot began before the swap: the new image has not booted yet.
    assert drop_booted_previous(tmp_path, KVER, booted_at=900.0) == []
    assert previous.exists()
    # Another kernel's boot says nothing about this kernel's image.
    assert drop_booted_previous(tmp_path, "6.1.0-98-other", booted_at=2_000.0) == []
    assert drop_booted_previous(tmp_path, KVER, booted_at=2_000.0) == [previous]
    assert not previous.exists() and image.read_text() == "new, smaller"
    assert kept_previous_images(tmp_path) == []


def test_kept_previous_images_finds_boot_loader_entries_too(tmp_path: Path) -> None:
    _touch(tmp_path, "boot/efi/0123abcd/6.1.0-1-amd64/initrd.kmodtrim-prev", text="x")
    _touch(tmp_path, "efi/0123abcd/6.1.0-2-amd64/initrd.kmodtrim-prev", text="y")
    _touch(tmp_path, "boot/initrd.img-6.1.0-3-amd64", text="not a kept image")
    assert [p.relative_to(tmp_path).as_posix() for p in kept_previous_images(tmp_path)] == [
        "boot/efi/0123abcd/6.1.0-1-amd64/initrd.kmodtrim-prev",
        "efi/0123abcd/6.1.0-2-amd64/initrd.kmodtrim-prev"]


def test_kmodtrimd_start_up_drops_the_running_kernels_booted_previous_image(
        tmp_path: Path) -> None:
    from kmodtrim.resident.worker import _drop_booted_previous

    _image, previous = _swapped(tmp_path, KVER, swapped_at=1_000.0)
    assert _drop_booted_previous(tmp_path) == []  # no /proc: not a running system
    _touch(tmp_path, "proc/sys/kernel/osrelease", text=KVER + "\n")
    _touch(tmp_path, "proc/stat", text="cpu  1 2 3\nbtime 900\nprocesses 5\n")
    assert _drop_booted_previous(tmp_path) == []
    (tmp_path / "proc/stat").write_text("cpu  1 2 3\nbtime 1500\nprocesses 5\n")
    assert _drop_booted_previous(tmp_path) == [previous]
