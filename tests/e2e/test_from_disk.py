"""The proof from disk: Debian 13 with kmodtrim installed by apt trims itself in auto mode
and boots from its own trimmed disk and regenerated initramfs.

A cached trixie root (tests/e2e/diskimage.py: systemd, udev, systemd-networkd, the cloud
kernel, initramfs-tools) gets the built .deb with apt and a policy drop-in (``mode =
"auto"``, one boot and no days of observation), and is written to an ext4 disk image. qemu
(TCG) boots it with the kernel and initramfs read out of the image's /boot:

- boot 1: kmodtrimd records the boot, finds the minimum observation met and trims the
  running kernel with the default policy, regenerating the initramfs with
  update-initramfs; the guest waits for the job and powers off;
- boot 2, with the initramfs boot 1 wrote: multi-user reached with no failed unit, root
  mounted from the virtio disk, the NIC has a DHCP address, the journal has no
  "Unknown symbol" or "module not found", and ``dpkg --verify`` lists only trimmed files.

Figures (module tree, stash, initramfs in MB; boot to multi-user in seconds, before and
after) are printed and written to the test's tmp dir with each boot's serial log.

Part of the suite (system tier): about 9–18 minutes under TCG; the first run builds the
cached image (root and network needed). Run alone: ``pytest tests/e2e/test_from_disk.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from diskimage import (
    base_root,
    boot_disk,
    install_deb,
    kernel_release,
    make_disk,
    need_e2e_tools,
    read_tree,
)

from debbuild import build_kmodtrim_deb
from pkgbuild import sh

pytestmark = [pytest.mark.slow, pytest.mark.system]

HERE = Path(__file__).resolve().parent
DROPIN = 'mode = "auto"\n\n[min_observation]\nboots = 1\ndays = 0\n'
CHECK_UNIT = """[Unit]
Description=kmodtrim e2e checks
After=kmodtrimd.service

[Service]
Type=simple
ExecStart=/usr/local/sbin/guest-check
StandardOutput=tty
StandardError=tty
TTYPath=/dev/ttyS0

[Install]
WantedBy=multi-user.target
"""
BOOT_TIMEOUT = 1800.0
MB = 1e6


def prepare(root: Path, deb: Path) -> str:
    """Install the .deb with apt, the policy drop-in and the check service."""
    apt_output = install_deb(root, deb)
    dropin = root / "etc/kmodtrim/policy.d/50-e2e.toml"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(DROPIN)
    shutil.copy2(HERE / "guest-check", root / "usr/local/sbin/guest-check")
    (root / "etc/systemd/system/e2e-check.service").write_text(CHECK_UNIT)
    # Boot to multi-user (Debian's default.target is graphical.target).
    (root / "etc/systemd/system/default.target").unlink(missing_ok=True)
    (root / "etc/systemd/system/default.target").symlink_to(
        "/usr/lib/systemd/system/multi-user.target")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "e2e-check.service").symlink_to("/etc/systemd/system/e2e-check.service")
    assert (wants / "kmodtrimd.service").is_symlink(), "the package did not enable kmodtrimd"
    return apt_output


def run_boot(n: int, image: Path, kver: str, work: Path) -> Path:
    """Boot the image until the guest's check powers it off; its findings directory."""
    boot_dir = work / f"boot{n}"
    boot_dir.mkdir()
    with boot_disk(image, kver, boot_dir) as guest:
        try:
            guest.wait_for(f"E2E-DONE boot {n}", BOOT_TIMEOUT)
            guest.proc.wait(timeout=300)
        finally:
            (boot_dir / "serial.log").write_text(guest.console())
    return read_tree(image, f"/var/lib/e2e/boot{n}", boot_dir / "guest")


def sizes(found: Path, when: str) -> dict[str, int]:
    pairs = (line.split() for line in (found / f"sizes-{when}").read_text().splitlines())
    return {p[0]: int(p[1]) if len(p) > 1 else 0 for p in pairs}


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


def trimmed_paths(found: Path) -> set[str]:
    """The files generation 1 took out (``kmodtrim show 1 --json``), as absolute paths."""
    doc: dict[str, Any] = json.loads((found / "gen1.json").read_text())
    return {usr_path(str(entry["path"])) for entry in doc["taken_out"]}


def usr_path(path: str) -> str:
    """``path`` as Debian 13's packages spell it: the root is usrmerged (/lib is a link to
    usr/lib), and kmodtrim records the /lib spelling."""
    path = "/" + path.lstrip("/")
    return "/usr" + path if path.startswith(("/lib/", "/bin/", "/sbin/")) else path


def test_auto_trim_then_boot_from_the_trimmed_disk(tmp_path: Path) -> None:
    need_e2e_tools()
    base = base_root()
    (tmp_path / "deb").mkdir()
    deb = build_kmodtrim_deb(tmp_path / "deb")
    root = tmp_path / "root"
    sh("cp", "-a", "--reflink=auto", f"{base}/.", root)
    kver = kernel_release(root)
    apt_output = prepare(root, deb)
    # Every dependency came with the cached root: apt installs kmodtrim alone.
    assert "0 upgraded, 1 newly installed" in apt_output, apt_output
    image = make_disk(root, tmp_path / "disk.img")
    shutil.rmtree(root)

    first = run_boot(1, image, kver, tmp_path)
    kmodtrimd_log = (first / "kmodtrimd").read_text()
    assert "auto mode: minimum observation met" in kmodtrimd_log, kmodtrimd_log
    assert "trim job" in kmodtrimd_log and " done:" in kmodtrimd_log, kmodtrimd_log
    assert (first / "state").read_text().strip() == "running", (first / "failed").read_text()

    second = run_boot(2, image, kver, tmp_path)
    state = (second / "state").read_text().strip()
    assert state == "running", (second / "failed").read_text()
    assert (second / "failed").read_text().strip() == ""
    assert (second / "root").read_text().split()[:2] == ["/dev/vda", "ext4"]
    assert "inet 10.0.2." in (second / "addr").read_text(), (second / "addr").read_text()
    journal = (second / "journal").read_text()
    for bad in ("Unknown symbol", "module not found", "Module not found"):
        assert bad not in journal, [ln for ln in journal.splitlines() if bad in ln]

    trimmed = trimmed_paths(second)
    assert trimmed
    verify = {line.split()[-1] for line in (second / "dpkg-verify").read_text().splitlines()
              if line.strip()}
    assert verify, "dpkg --verify lists no trimmed file"
    assert verify == trimmed, (sorted(verify - trimmed)[:20], sorted(trimmed - verify)[:20])
    assert all(line.startswith("missing ")
               for line in (second / "dpkg-verify").read_text().splitlines() if line.strip())

    before, after = sizes(first, "start"), sizes(second, "start")
    figures = {
        "kernel": kver,
        "tree_mb": [before["tree"] / MB, after["tree"] / MB],
        "stash_mb": [before["stash"] / MB, after["stash"] / MB],
        "kmodtrim_state_mb": [before["state"] / MB, after["state"] / MB],
        "initramfs_mb": [before["initramfs"] / MB, after["initramfs"] / MB],
        "boot_dir_mb": [before["boot"] / MB, after["boot"] / MB],
        "boot_seconds": [boot_seconds(first), boot_seconds(second)],
        "files_trimmed": len(trimmed),
    }
    (tmp_path / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures))
