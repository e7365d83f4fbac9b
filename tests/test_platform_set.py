"""The platform set through the CLI: detected from a root's DMI files (as on a running
system), named with ``--cloud`` or the policy's ``clouds``, every platform's offline; and
the size targets of the default policy on Debian 12's and 13's generic kernels with the
recorded VM observation on a KVM guest (``--cloud kvm``): at most 20 MB kept on Debian 12,
6 MB of compressed modules on Debian 13."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kernels import KernelTree
from modbuild import ModSpec, scratch_root

REPO = Path(__file__).resolve().parent.parent
OBSERVED = REPO / "examples/observed-bookworm-qemu-virtio.txt"
KVER = "9.9.9-test"
SPECS = (
    ModSpec("virtio_blk"), ModSpec("virtio_net"), ModSpec("hv_storvsc"), ModSpec("ena"),
    ModSpec("xen_blkfront"), ModSpec("sd_mod"), ModSpec("xfs", aliases=("fs-xfs",)),
)
EVERY_PLATFORM = {"virtio_blk", "virtio_net", "hv_storvsc", "ena", "xen_blkfront", "sd_mod"}


def kmodtrim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kmodtrim.cli", *args], capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL)


def plan(root: Path, *args: str) -> dict[str, Any]:
    proc = kmodtrim("plan", "--json", "--root", str(root), "--kernel", KVER, *args)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def kept(doc: dict[str, Any]) -> set[str]:
    return {m["name"] for m in doc["keep"]}


def dmi(root: Path, **values: str) -> None:
    directory = root / "sys/class/dmi/id"
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in values.items():
        (directory / name).write_text(value + "\n")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return scratch_root(tmp_path / "root", KVER, SPECS, policy="")


def test_offline_every_platforms_drivers_are_kept_and_the_plan_says_why(root: Path) -> None:
    doc = plan(root)
    assert kept(doc) == EVERY_PLATFORM
    assert doc["platform"]["source"] == (
        "offline: the image's platform is unknown; name it with --cloud")
    proc = kmodtrim("plan", "--root", str(root), "--kernel", KVER)
    assert "platform drivers kept for: kvm, aws, gcp, azure" in proc.stdout, proc.stdout


def test_a_kvm_guest_keeps_its_own_drivers_only(root: Path) -> None:
    dmi(root, sys_vendor="QEMU", product_name="Standard PC (Q35 + ICH9, 2009)")
    doc = plan(root)
    assert kept(doc) == {"virtio_blk", "virtio_net", "sd_mod"}
    assert doc["platform"] == {"names": ["kvm"], "source": "detected: DMI sys_vendor 'QEMU'"}
    proc = kmodtrim("explain", "virtio_blk", "--root", str(root), "--kernel", KVER)
    assert proc.returncode == 0, proc.stderr
    assert "platform (boot disk or NIC of kvm)" in proc.stdout, proc.stdout
    proc = kmodtrim("explain", "hv_storvsc", "--root", str(root), "--kernel", KVER)
    assert "hv_storvsc: REMOVED" in proc.stdout, proc.stdout
    assert "no boot-disk or NIC driver of\n  the platforms kept for (kvm)." in proc.stdout


def test_an_ec2_instance_keeps_nitro_and_xen_drivers(root: Path) -> None:
    dmi(root, sys_vendor="Amazon EC2", product_name="m6i.large", bios_vendor="Amazon EC2")
    assert kept(plan(root)) == {"ena", "xen_blkfront", "sd_mod"}


def test_cloud_option_and_policy_name_the_platforms(root: Path) -> None:
    assert kept(plan(root, "--cloud", "kvm")) == {"virtio_blk", "virtio_net", "sd_mod"}
    assert kept(plan(root, "--cloud", "azure", "--cloud", "xen")) == {
        "hv_storvsc", "xen_blkfront", "sd_mod"}
    (root / "etc/kmodtrim/policy.toml").write_text('clouds = ["aws"]\n')
    doc = plan(root)
    assert kept(doc) == {"ena", "xen_blkfront", "sd_mod"}
    assert doc["platform"]["source"] == "asked for: aws"
    assert kept(plan(root, "--cloud", "gcp")) == {"virtio_blk", "virtio_net", "sd_mod"}
    (root / "etc/kmodtrim/policy.toml").write_text("clouds = []\n")
    assert kept(plan(root)) == set()


def test_a_bad_cloud_name_is_a_one_line_usage_error(root: Path) -> None:
    proc = kmodtrim("plan", "--root", str(root), "--kernel", KVER, "--cloud", "ec2")
    assert proc.returncode == 2
    assert "argument --cloud: invalid choice: 'ec2'" in proc.stderr, proc.stderr


def test_the_cloud_boot_preset_keeps_every_platform_wherever_it_runs(root: Path) -> None:
    dmi(root, sys_vendor="QEMU")
    (root / "etc/kmodtrim/policy.toml").write_text('presets = ["cloud-boot"]\n')
    assert kept(plan(root)) == EVERY_PLATFORM


# -- the size targets on real kernels ----------------------------------------------------


@pytest.mark.kernel
def test_default_policy_on_a_kvm_guest_keeps_little(each_generic_kernel: KernelTree,
                                                    tmp_path: Path) -> None:
    tree = each_generic_kernel
    common = ("--root", str(tree.root), "--kernel", tree.kver, "--symvers", str(tree.symvers),
              "--observed", str(OBSERVED), "--cache-dir", str(tmp_path / "cache"))
    proc = kmodtrim("plan", "--json", "--cloud", "kvm", *common)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    target = 6e6 if tree.release.compressed else 20e6
    assert doc["keep_bytes"] <= target, (doc["keep_bytes"], sorted(kept(doc)))
    assert doc["unresolved_symbols"] == []
    names = kept(doc)
    assert {"virtio_blk", "virtio_net"} <= names and "hv_storvsc" not in names
    # Filesystems and netfilter not in use are left to restore on demand.
    assert not {"xfs", "btrfs", "nf_tables"} & names
    # Offline without --cloud every platform's drivers stay.
    proc = kmodtrim("plan", "--json", *common)
    assert proc.returncode == 0, proc.stderr
    offline = json.loads(proc.stdout)
    assert {"hv_storvsc", "ena", "vmw_pvscsi", "xen_blkfront"} <= kept(offline)
    assert doc["keep_bytes"] < offline["keep_bytes"]
    print(f"{tree.kver}: --cloud kvm keeps {doc['keep_bytes'] / 1e6:.1f} MB "
          f"({len(names)} modules); every platform {offline['keep_bytes'] / 1e6:.1f} MB")
