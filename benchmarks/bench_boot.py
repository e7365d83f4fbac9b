"""Debian's generic kernel (``linux-image-amd64``) from its own disk, before and after a
trim: module tree, stash, initramfs and boot seconds on Debian 13 and 12 — the figures
the from-disk e2e (tests/e2e/test_from_disk.py) gives for the cloud kernel.

The image is the e2e's (tests/e2e/diskimage.py: debootstrap, systemd-networkd,
initramfs-tools, a bootloader-less ext4 disk qemu boots with the kernel and initramfs of
its own /boot) with the generic kernel instead of the cloud one. Boot 1 boots it as
installed and records what loaded. kmodtrim then trims the image root offline, as an image
build would (``kmodtrim --root ROOT apply --observed BOOT1 --force``, default policy; the
initramfs regenerated in a chroot with /proc, /sys and /dev mounted), and boot 2 boots the
trimmed disk with its regenerated initramfs. Each boot must reach multi-user with no failed
unit, an address on the NIC and no "Unknown symbol" or "module not found" in its journal;
the table says so per boot.

qemu runs TCG (emulated CPUs, KVM may be absent): boot seconds compare before with after,
not with real hardware. A first run builds the release's generic base root (about 10
minutes); the image root of each run is a scratch copy. Each boot's serial log is kept
(``--logs``, default ``.cache/bench-boot/RELEASE-bootN.serial.log``).

    .venv/bin/python benchmarks/bench_boot.py [--release trixie|bookworm|both] [--json]
        [--logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import REPO

sys.path.insert(0, str(REPO / "tests" / "e2e"))
from diskimage import (
    base_root,
    boot_disk,
    boot_seconds,
    kernel_release,
    make_disk,
    read_tree,
    serial_service,
)

from kernels import BOOKWORM, TRIXIE, Release

GUEST_SCRIPT = """#!/bin/bash
# kmodtrim's boot benchmark: what this boot shows, then power off.
set -u
out=/var/lib/bench
mkdir -p "$out"
n=$(( $(cat "$out/boots" 2>/dev/null || echo 0) + 1 ))
echo "$n" >"$out/boots"
d=$out/boot$n
mkdir -p "$d"
systemctl is-system-running --wait >"$d/state" 2>&1
systemd-analyze time >"$d/analyze" 2>&1
systemctl --failed --plain --no-legend >"$d/failed" 2>&1
cat /proc/modules >"$d/modules"
for i in $(seq 60); do
    ip -o -4 addr show scope global >"$d/addresses" 2>&1
    [ -s "$d/addresses" ] && break
    sleep 1
done
journalctl -b -o cat --no-pager | grep -E "Unknown symbol|module not found" \\
    >"$d/journal-errors" || true
sync
echo "BENCH-DONE boot $n"
systemctl poweroff
"""
BOOT_TIMEOUT = 1800.0
MB = 1e6


def prepare(root: Path) -> None:
    """The guest's measuring service, enabled; multi-user as the default target."""
    serial_service(root, "bench-boot", "kmodtrim boot benchmark", GUEST_SCRIPT)


def du(path: Path) -> int:
    """Apparent bytes under ``path`` (``du -sb``), as the e2e's guest measures its tree,
    stash and /boot, so the two from-disk tables compare."""
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def sizes(root: Path, kver: str) -> dict[str, int]:
    return {"tree": du(root / "usr/lib/modules" / kver),
            "stash": du(root / "var/lib/kmodtrim/stash"),
            "initramfs": (root / f"boot/initrd.img-{kver}").stat().st_size,
            "boot": du(root / "boot")}


def boot(n: int, root: Path, kver: str, work: Path, log: Path) -> dict[str, Any]:
    """Boot a disk made from ``root`` until its measuring service powers it off; what it
    found. The guest's serial console is kept in ``log``, whatever happens."""
    where = work / f"boot{n}"
    where.mkdir()
    # Each disk is made afresh from the root, so the guest's boot count is set here.
    counter = root / "var/lib/bench/boots"
    counter.parent.mkdir(parents=True, exist_ok=True)
    counter.write_text(f"{n - 1}\n")
    image = make_disk(root, work / "disk.img")
    with boot_disk(image, kver, where) as guest:
        try:
            guest.wait_for(f"BENCH-DONE boot {n}", BOOT_TIMEOUT)
            guest.proc.wait(timeout=300)
        finally:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(guest.console())
    found = read_tree(image, f"/var/lib/bench/boot{n}", where / "guest")
    image.unlink()
    analyze = (found / "analyze").read_text()
    return {
        "state": (found / "state").read_text().strip(),
        "seconds": boot_seconds(found),
        "analyze": analyze.strip().splitlines()[0] if analyze.strip() else "",
        "failed_units": (found / "failed").read_text().split("\n")[:-1],
        "address": bool((found / "addresses").read_text().strip()),
        "journal_errors": (found / "journal-errors").read_text().splitlines(),
        "modules": [line.split()[0] for line in (found / "modules").read_text().splitlines()],
    }


@contextlib.contextmanager
def api_filesystems(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev mounted under the image root while kmodtrim runs, as image
    builders (mkosi, debootstrap-based scripts) mount them: initramfs-tools' mkinitramfs
    runs chrooted and needs them."""
    mounted: list[Path] = []
    try:
        for source, target, how in (("proc", "proc", ["-t", "proc"]),
                                    ("/sys", "sys", ["--bind"]),
                                    ("/dev", "dev", ["--bind"])):
            where = root / target
            where.mkdir(exist_ok=True)
            subprocess.run(["mount", *how, source, str(where)], check=True)
            mounted.append(where)
        yield
    finally:
        for where in reversed(mounted):
            if subprocess.run(["umount", str(where)], check=False).returncode != 0:
                subprocess.run(["umount", "--lazy", str(where)], check=False)


def trim(root: Path, kver: str, observed: Path) -> dict[str, Any]:
    """``kmodtrim apply`` on the image root, offline, as an image build runs it."""
    with api_filesystems(root):
        proc = subprocess.run(
            [sys.executable, "-m", "kmodtrim.cli", "apply", "--yes", "--force", "--json",
             "--root", str(root), "--kernel", kver, "--observed", str(observed)],
            capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"kmodtrim apply failed:\n{proc.stderr}")
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def run(release: Release, scratch: Path, logs: Path) -> dict[str, Any]:
    base = base_root(release, flavour="generic")
    root = scratch / "root"
    subprocess.run(["cp", "-a", str(base), str(root)], check=True)
    kver = kernel_release(root)
    prepare(root)
    before = sizes(root, kver)
    first = boot(1, root, kver, scratch, logs / f"{release.name}-boot1.serial.log")
    observed = scratch / "observed.txt"
    observed.write_text("".join(f"{name}\n" for name in first["modules"]))
    outcome = trim(root, kver, observed)
    after = sizes(root, kver)
    second = boot(2, root, kver, scratch, logs / f"{release.name}-boot2.serial.log")
    return {"release": release.name, "kernel": kver, "before": before, "after": after,
            "boots": [first, second], "trim": {
                k: outcome.get(k) for k in ("generation", "removed_files", "removed_bytes",
                                            "stash_bytes_on_disk", "boot_growth_bytes",
                                            "net_freed_bytes")}}


def healthy(b: dict[str, Any]) -> bool:
    return (b["state"] == "running" and not b["failed_units"] and b["address"]
            and not b["journal_errors"])


def net_freed(before: dict[str, int], after: dict[str, int]) -> int:
    """What the disk gained: module tree, stash and /boot together, before less after."""
    return sum(before[k] - after[k] for k in ("tree", "stash", "boot"))


def report(results: list[dict[str, Any]]) -> None:
    print("Debian generic kernel from its own disk, as installed → trimmed offline "
          "(qemu TCG)")
    print(f"  {'release':<10} {'kernel':<18} {'module tree MB':>16} {'stash MB':>9} "
          f"{'initramfs MB':>14} {'net freed MB':>13} {'boot s':>13} {'loaded':>7}  "
          "boots healthy")
    for r in results:
        b, a = r["before"], r["after"]
        one, two = r["boots"]
        print(f"  {r['release']:<10} {r['kernel']:<18} "
              f"{b['tree'] / MB:6.1f} → {a['tree'] / MB:5.1f} {a['stash'] / MB:9.1f} "
              f"{b['initramfs'] / MB:5.1f} → {a['initramfs'] / MB:5.1f} "
              f"{net_freed(b, a) / MB:13.1f} "
              f"{one['seconds']:5.1f} → {two['seconds']:5.1f} "
              f"{len(one['modules']):3d}/{len(two['modules']):<3d}  "
              f"{healthy(one)}/{healthy(two)}")
    for r in results:
        for n, b in enumerate(r["boots"], 1):
            if not healthy(b):
                print(f"  {r['release']} boot {n}: state {b['state']}, failed "
                      f"{b['failed_units']}, address {b['address']}, journal "
                      f"{b['journal_errors'][:3]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", choices=("trixie", "bookworm", "both"), default="both")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--logs", type=Path, default=REPO / ".cache" / "bench-boot",
                        help="where each boot's serial log is kept (default: %(default)s)")
    args = parser.parse_args()
    releases = {"trixie": [TRIXIE], "bookworm": [BOOKWORM],
                "both": [TRIXIE, BOOKWORM]}[args.release]
    results = []
    for release in releases:
        with tempfile.TemporaryDirectory(prefix="kmodtrim-bench-boot-") as scratch:
            results.append(run(release, Path(scratch), args.logs))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)
    return 0 if all(healthy(b) for r in results for b in r["boots"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
