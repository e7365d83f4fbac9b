"""Trims for real: Debian 12's and 13's generic kernels, their real cloud kernel packages
installed with dpkg, dpkg and rpm scratch roots, a full disk, a failing initramfs generator.
Each proves the tree, the stash and the package manager stay truthful."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import KernelTree, copy_kernel_tree
from kmodtrim.backends.dpkg import DpkgBackend, dpkg_command
from kmodtrim.backends.rpm import RpmBackend, rpm_command
from kmodtrim.store import current_generation, generation_numbers
from modbuild import ModSpec, module_bytes
from pkgbuild import build_deb, build_rpm, init_dpkg_root, init_rpm_root, small_tmpfs

REPO = Path(__file__).resolve().parent.parent
OBSERVED = REPO / "examples/observed-bookworm-qemu-virtio.txt"
KVER = "9.9.9-test"
MODDIR = f"/lib/modules/{KVER}/kernel/drivers/test"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("nic", imports=("core_fn",), depends=("core",)),
    ModSpec("unused", exports=("unused_fn",)),
    ModSpec("unused_user", imports=("unused_fn",), depends=("unused",)),
)
TRIMMED = {f"{MODDIR}/unused.ko", f"{MODDIR}/unused_user.ko"}


def kmodtrim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kmodtrim.cli", *args], capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL)


def _hashes(moddir: Path) -> dict[str, tuple[str, int]]:
    found = {}
    for path in moddir.rglob("*.ko*"):
        found[str(path.relative_to(moddir))] = (
            hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
    return found


def _unknown_symbols(root: Path, kver: str, symvers: Path) -> list[str]:
    proc = subprocess.run(["depmod", "-b", str(root), "-e", "-E", str(symvers), kver],
                          capture_output=True, text=True, check=True)
    return [line for line in proc.stderr.splitlines() if "needs unknown symbol" in line]


@pytest.mark.kernel
def test_generic_kernel_trim_loads_and_rolls_back_byte_identical(
    each_generic_kernel: KernelTree, tmp_path: Path
) -> None:
    generic_kernel = each_generic_kernel
    tree = copy_kernel_tree(generic_kernel, tmp_path / "root")
    before = _hashes(tree.moddir)
    common = ["--root", str(tree.root), "--kernel", tree.kver, "--symvers", str(tree.symvers)]
    proc = kmodtrim("apply", "--yes", "--initramfs", "skip", "--observed", str(OBSERVED),
                    *common)
    assert proc.returncode == 0, proc.stderr
    after = _hashes(tree.moddir)
    assert 60 < len(after) < 0.1 * len(before)
    kept_bytes = sum((tree.moddir / p).stat().st_size for p in after)
    total_bytes = sum(os.path.getsize(generic_kernel.moddir / p) for p in before)
    assert kept_bytes < 0.1 * total_bytes
    assert _unknown_symbols(tree.root, tree.kver, tree.symvers) == []
    # Debian 13 builds virtio_pci into the kernel: kept or built in, the VM's drivers stay.
    builtin = (tree.moddir / "modules.builtin").read_text().split()
    names = {Path(p).name.split(".")[0].replace("-", "_") for p in [*after, *builtin]}
    assert {"virtio_net", "virtio_blk", "virtio_pci", "failover"} <= names

    proc = kmodtrim("rollback", "0", "--yes", "--initramfs", "skip", *common)
    assert proc.returncode == 0, proc.stderr
    # Byte-identical module files: depmod -e sees the package's own tree again.
    assert _hashes(tree.moddir) == before


def _scriptless_copy(deb: Path, tmp_path: Path) -> Path:
    """deb rebuilt without its maintainer scripts: the same files, modes and md5sums.

    Not the whole package: a kernel's scripts need a complete system (linux-base's perl
    hooks, initramfs-tools), which a scratch root is not; depmod, the one thing they do to
    the module tree, the test runs itself. Nothing else about the package is changed."""
    tree = tmp_path / "deb-tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    for script in ("preinst", "postinst", "prerm", "postrm"):
        (tree / "DEBIAN" / script).unlink(missing_ok=True)
    out = tmp_path / deb.name
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Znone", "--build", str(tree), str(out)],
                   check=True, capture_output=True)
    return out


def _as_dpkg_spells(path: str) -> str:
    """A module path without the usrmerge prefix, to compare kmodtrim's and dpkg's spelling."""
    return path.removeprefix("/usr")


@pytest.mark.kernel
def test_a_real_kernel_package_stays_truthful_through_trim_reinstall_and_rollback(
    each_cloud_kernel: KernelTree, tmp_path: Path
) -> None:
    pristine = each_cloud_kernel
    root = init_dpkg_root(tmp_path / "root")
    if pristine.release.usrmerged:
        (root / "usr/lib").mkdir(parents=True)
        (root / "lib").symlink_to("usr/lib")
    deb = _scriptless_copy(pristine.deb, tmp_path)
    subprocess.run([*dpkg_command(root), "--force-depends", "-i", str(deb)], check=True,
                   capture_output=True)
    subprocess.run(["depmod", "-b", str(root), pristine.kver], check=True)
    backend = DpkgBackend()
    assert backend.verify(root, [pristine.package]) == []
    moddir = root / "lib/modules" / pristine.kver
    before = _hashes(moddir)
    common = ["--root", str(root), "--kernel", pristine.kver, "--symvers", str(pristine.symvers),
              "--initramfs", "skip"]

    proc = kmodtrim("apply", "--yes", "--observed", str(OBSERVED), *common)
    assert proc.returncode == 0, proc.stderr
    removed = current_generation(root).removed
    assert len(removed) > 500 and {f.package for f in removed} == {pristine.package}
    trimmed = {_as_dpkg_spells(f.path) for f in removed}
    problems = backend.verify(root, [pristine.package])
    assert all(p.what == "missing" for p in problems)
    assert {_as_dpkg_spells(p.path) for p in problems} == trimmed
    assert _unknown_symbols(root, pristine.kver, pristine.symvers) == []

    # Reinstalling the package (dpkg told the root's path filters, as kmodtrim's hooks
    # tell it) does not bring the trimmed files back.
    subprocess.run([*dpkg_command(root), "--force-depends", "-i", str(deb)], check=True,
                   capture_output=True)
    assert not any((root / p.lstrip("/")).exists() for p in trimmed)
    assert {_as_dpkg_spells(p.path) for p in backend.verify(root, [pristine.package])} == trimmed

    proc = kmodtrim("rollback", "0", "--yes", *common)
    assert proc.returncode == 0, proc.stderr
    assert backend.verify(root, [pristine.package]) == []
    assert backend.read_exclusions(root) == set()
    assert _hashes(moddir) == before


@pytest.mark.kernel
def test_compressed_firmware_on_a_usrmerged_root_is_planned_once(
    trixie_cloud_kernel: KernelTree, tmp_path: Path
) -> None:
    # Debian 13 ships firmware as .xz under /usr/lib/firmware, also reached as /lib/firmware.
    tree = copy_kernel_tree(trixie_cloud_kernel, tmp_path / "root")
    firmware = tree.root / "usr/lib/firmware/me4000_firmware.bin.xz"  # me4000's, not kept
    firmware.parent.mkdir(parents=True)
    firmware.write_bytes(lzma.compress(b"firmware"))
    proc = kmodtrim("plan", "--json", "--root", str(tree.root), "--kernel", tree.kver,
                    "--symvers", str(tree.symvers), "--observed", str(OBSERVED),
                    "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert [(f["path"], f["wanted_by"]) for f in plan["firmware_remove"]] == [
        ("/usr/lib/firmware/me4000_firmware.bin.xz", ["me4000"])]
    assert plan["totals"]["firmware_remove_bytes"] == firmware.stat().st_size


def _payload(tmp_path: Path, version: str) -> dict[str, bytes]:
    files = {f"{MODDIR}/{spec.name}.ko": module_bytes(spec, tmp_path) for spec in SPECS}
    files[f"/boot/vmlinuz-{KVER}"] = f"kernel {version}\n".encode()
    return files


def _observed(tmp_path: Path) -> Path:
    path = tmp_path / "observed"
    path.write_text("nic\n")
    return path


def _policy(root: Path) -> None:
    (root / "etc/kmodtrim").mkdir(parents=True, exist_ok=True)
    (root / "etc/kmodtrim/policy.toml").write_text(
        'presets = []\nclouds = []\ninitramfs = "skip"\n')


def test_dpkg_verify_reports_exactly_the_trimmed_files_and_reinstall_keeps_them_out(
    tmp_path: Path,
) -> None:
    root = init_dpkg_root(tmp_path / "root")
    _policy(root)
    deb = build_deb(tmp_path, "linux-image-9.9.9-test", "1", _payload(tmp_path, "1"))
    subprocess.run([*dpkg_command(root), "-i", str(deb)], check=True, capture_output=True)
    backend = DpkgBackend()
    assert backend.verify(root, ["linux-image-9.9.9-test"]) == []

    proc = kmodtrim("apply", "--yes", "--root", str(root), "--kernel", KVER,
                    "--observed", str(_observed(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    problems = backend.verify(root, ["linux-image-9.9.9-test"])
    assert {p.path for p in problems} == TRIMMED
    assert all(p.what == "missing" for p in problems)
    assert backend.read_exclusions(root) >= TRIMMED
    assert {f.package for f in current_generation(root).removed} == {"linux-image-9.9.9-test"}

    # Reinstalling the package does not bring the trimmed files back.
    subprocess.run([*dpkg_command(root), "-i", str(deb)], check=True, capture_output=True)
    assert not any((root / p.lstrip("/")).exists() for p in TRIMMED)
    assert (root / MODDIR.lstrip("/") / "nic.ko").exists()

    proc = kmodtrim("rollback", "0", "--yes", "--root", str(root), "--kernel", KVER)
    assert proc.returncode == 0, proc.stderr
    assert backend.verify(root, ["linux-image-9.9.9-test"]) == []
    assert backend.read_exclusions(root) == set()


def test_rpm_verify_stays_clean_with_netsharedpath(tmp_path: Path) -> None:
    root = init_rpm_root(tmp_path / "root")
    _policy(root)
    rpm = build_rpm(tmp_path, "kernel-modules-test", "9.9.9", "1", _payload(tmp_path, "1"))
    rpm_cmd = rpm_command(root)
    subprocess.run([*rpm_cmd, "-i", "--nodeps", str(rpm)], check=True, capture_output=True)
    backend = RpmBackend()
    assert backend.verify(root, ["kernel-modules-test"]) == []

    proc = kmodtrim("apply", "--yes", "--root", str(root), "--kernel", KVER,
                    "--observed", str(_observed(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert backend.read_exclusions(root) >= TRIMMED
    # rpm records net-shared state at install time: reinstalling under our macro makes the
    # trimmed files "net shared", after which rpm -V is clean and they stay out.
    subprocess.run([*rpm_command(root), "-i", "--replacepkgs", "--nodeps", str(rpm)],
                   check=True, capture_output=True)
    assert not any((root / p.lstrip("/")).exists() for p in TRIMMED)
    assert backend.verify(root, ["kernel-modules-test"]) == []

    proc = kmodtrim("rollback", "0", "--yes", "--root", str(root), "--kernel", KVER)
    assert proc.returncode == 0, proc.stderr
    assert all((root / p.lstrip("/")).exists() for p in TRIMMED)
    assert backend.verify(root, ["kernel-modules-test"]) == []
    assert backend.read_exclusions(root) == set()


def _small_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    for path, data in _payload(tmp_path, "1").items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    _policy(root)
    subprocess.run(["depmod", "-b", str(root), KVER], check=True)
    return root


@pytest.mark.parametrize("filler", [0, 8192], ids=["stash-fills-up", "journal-cannot-start"])
def test_full_disk_is_a_clean_error_and_loses_nothing(tmp_path: Path, filler: int) -> None:
    root = _small_root(tmp_path)
    # Room for hardly anything: the journal or the stash copies cannot be written.
    with small_tmpfs(root / "var/lib/kmodtrim", "12k") as state:
        (state / "filler").write_bytes(b"\0" * filler)
        before = _hashes(root / f"lib/modules/{KVER}")
        proc = kmodtrim("apply", "--yes", "--root", str(root), "--kernel", KVER,
                        "--observed", str(_observed(tmp_path)))
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "No space left on device" in proc.stderr, proc.stderr
        assert re.search(r"cannot (stash|write)", proc.stderr), proc.stderr
        assert "Traceback" not in proc.stderr
        assert _hashes(root / f"lib/modules/{KVER}") == before
        assert generation_numbers(root) == [0]
        assert not (state / "journal.json").exists()


def test_failing_initramfs_generation_undoes_the_trim(tmp_path: Path) -> None:
    root = _small_root(tmp_path)
    (root / "boot").mkdir(exist_ok=True)
    (root / f"boot/initrd.img-{KVER}").write_bytes(b"old image")
    before = _hashes(root / f"lib/modules/{KVER}")
    # initramfs-tools cannot build for this root (no /dev, no /proc, no mkinitramfs in it).
    proc = kmodtrim("apply", "--yes", "--root", str(root), "--kernel", KVER,
                    "--observed", str(_observed(tmp_path)), "--initramfs", "update-initramfs")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "initramfs" in proc.stderr.lower()
    assert _hashes(root / f"lib/modules/{KVER}") == before
    assert (root / f"boot/initrd.img-{KVER}").read_bytes() == b"old image"
    assert generation_numbers(root) == [0]
    assert "unused.ko" in (root / f"lib/modules/{KVER}/modules.dep").read_text()


@pytest.mark.kernel
def test_crash_after_the_initramfs_swap_puts_the_old_image_back(
    cloud_kernel: KernelTree, tmp_path: Path
) -> None:
    from kmodtrim.executor import recover

    tree = copy_kernel_tree(cloud_kernel, tmp_path / "root")
    image = tree.root / f"boot/initramfs-{tree.kver}.img"
    image.parent.mkdir(exist_ok=True)
    image.write_bytes(b"the image that booted")
    before = _hashes(tree.moddir)
    proc = subprocess.run(
        [sys.executable, "-m", "kmodtrim.cli", "apply", "--yes", "--root", str(tree.root),
         "--kernel", tree.kver, "--symvers", str(tree.symvers), "--observed", str(OBSERVED),
         "--initramfs", "dracut"],
        capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
        env={**os.environ, "KMODTRIM_FAULT": "after-initramfs"})
    assert proc.returncode == -9, proc.stderr
    assert image.read_bytes() != b"the image that booted"  # dracut's new image was in place
    assert recover(tree.root) is not None
    assert image.read_bytes() == b"the image that booted"
    assert _hashes(tree.moddir) == before
    assert generation_numbers(tree.root) == [0]
