"""End to end in a real VM (tests/vm.py): an image root is trimmed offline the way an image
build would, then boots the trimmed Debian cloud kernel under systemd. kmodtrimd runs from
its own unit (sandbox, Type=dbus, watchdog) and, when a device whose driver was trimmed is
hot-plugged, restores the driver, loads it with modprobe and logs it to the journal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kernels import KernelTree
from kmodtrim.daemon import MESSAGE_IDS
from vm import boot, build_image, need_vm_tools, pack_initramfs

REPO = Path(__file__).resolve().parent.parent
OBSERVED = REPO / "examples" / "observed-bookworm-qemu-virtio.txt"
# The hot-plugged device: a virtio keyboard, driven by virtio_input, which the recorded
# VM never loaded (so the trim removes it) and no preset keeps.
HOTPLUG_DRIVER = "virtio_input"
HOTPLUG_DEVICE = "virtio-keyboard-pci"
# Modules the default policy trims that the guest then asks modprobe for (mount, nft, ip
# link, modprobe): each comes back on demand through kmodtrim's modprobe.d install lines.
ON_DEMAND = ("xfs", "nf_tables", "nft_chain_nat", "vxlan", "dm_crypt")

MANAGER = ("org.kmodtrim.KmodTrim1 /org/kmodtrim/KmodTrim1 "
           "org.kmodtrim.KmodTrim1.Manager")
CHECK_SCRIPT = f"""#!/bin/sh
# Runs in the guest after kmodtrimd.service; every finding is a "VMCHECK key value" line.
say() {{ echo "VMCHECK $*"; }}
prop() {{ busctl get-property {MANAGER} "$1" 2>&1; }}
i=0
while [ "$(prop State)" != 's "idle"' ] && [ $i -lt 300 ]; do sleep 1; i=$((i+1)); done
say state $(prop State)
say generation $(prop CurrentGeneration)
say unit $(systemctl show kmodtrimd -p ActiveState -p SubState -p WatchdogUSec -p NRestarts \
    | tr '\\n' ' ')
say unknown-symbols $(dmesg | grep -ci 'unknown symbol')
say loaded $(cut -d' ' -f1 /proc/modules | sort | tr '\\n' ' ')
say READY
i=0
while [ ! -d /sys/module/{HOTPLUG_DRIVER} ] && [ $i -lt 300 ]; do sleep 1; i=$((i+1)); done
say hotplug-driver $([ -d /sys/module/{HOTPLUG_DRIVER} ] && echo loaded || echo missing)
say generation-after $(prop CurrentGeneration)
say self-heal-journal $(journalctl -o cat MESSAGE_ID={MESSAGE_IDS["self-heal"]} --no-pager \
    | tail -n 1)
say unit-after $(systemctl show kmodtrimd -p ActiveState -p NRestarts | tr '\\n' ' ')
# Restore on demand: each of these asks modprobe for a trimmed module by name or alias.
say ONDEMAND-READY
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 1; i=$((i+1)); done
mkdir -p /mnt/x
say xfs $(mount -t xfs /dev/vda /mnt/x 2>&1 && cat /mnt/x/hello && echo mounted)
say nft $(nft add table inet t 2>&1 && \
    nft add chain inet t c '{{ type nat hook postrouting priority 100 ; }}' 2>&1 && echo ok)
say vxlan $(ip link add v0 type vxlan id 5 dstport 4789 2>&1 && echo ok)
say dm-crypt $(modprobe dm_crypt 2>&1 && echo ok)
say ondemand-loaded $(for m in {" ".join(ON_DEMAND)}; do \
    [ -d /sys/module/$m ] && echo $m; done | tr '\\n' ' ')
say ondemand-journal $(journalctl -o cat MESSAGE_ID={MESSAGE_IDS["on-demand"]} --no-pager \
    | wc -l)
journalctl -o cat MESSAGE_ID={MESSAGE_IDS["on-demand"]} --no-pager | sed 's/^/VMLOG od: /'
say requested $(grep -o 'requested by modprobe' /var/lib/kmodtrim/observations.json | wc -l)
journalctl -u kmodtrimd -o cat --no-pager | tail -n 40 | sed 's/^/VMLOG /'
for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done \\
    | grep kmodtrim | sed 's/^/VMLOG running: /'
say DONE
systemctl poweroff
"""


def _xfs_disk(path: Path) -> Path:
    """A sparse disk holding an xfs file system with one file (mkfs.xfs's minimum size)."""
    with open(path, "wb") as f:
        f.truncate(320 << 20)
    hello = path.with_suffix(".hello")
    hello.write_text("hello from xfs\n")
    # mkfs.xfs -p: a protofile naming the file system's contents.
    proto = path.with_suffix(".proto")
    proto.write_text(f"boot\n0 0\nd--755 0 0\nhello ---644 0 0 {hello}\n$\n")
    # The features the guest's kernel (Debian 12: 6.1) mounts, whatever xfsprogs makes by
    # default; an xfsprogs that cannot read its own 6.1 file (6.1 itself) makes them anyway.
    mkfs = ["mkfs.xfs", "-q", "-f", "-p", str(proto), str(path)]
    lts = Path("/usr/share/xfsprogs/mkfs/lts_6.1.conf")
    if not lts.is_file() or subprocess.run([*mkfs, "-c", f"options={lts}"],
                                           capture_output=True, check=False).returncode:
        subprocess.run(mkfs, check=True)
    return path


def _findings(console: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in console.splitlines():
        _, marker, rest = line.partition("VMCHECK ")
        if marker:
            key, _, value = rest.partition(" ")
            found[key] = value.strip()
    return found


@pytest.mark.kernel
@pytest.mark.slow
def test_trimmed_cloud_kernel_boots_and_kmodtrimd_self_heals_under_systemd(
    cloud_kernel: KernelTree, tmp_path: Path
) -> None:
    need_vm_tools()
    kver = cloud_kernel.kver
    image = build_image(tmp_path / "image", cloud_kernel,
                        policy='initramfs = "skip"\n', check_script=CHECK_SCRIPT)
    moddir = image / "lib/modules" / kver
    before = sum(1 for _ in moddir.rglob("*.ko"))
    proc = subprocess.run(
        [sys.executable, "-m", "kmodtrim.cli", "apply", "--root", str(image), "--kernel",
         kver, "--observed", str(OBSERVED), "--yes", "--offline"],
        capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    after = sum(1 for _ in moddir.rglob("*.ko"))
    assert after < before / 5
    assert not any(moddir.rglob(f"{HOTPLUG_DRIVER}.ko"))
    for name in ON_DEMAND:  # trimmed by the default policy, so asked for on demand
        assert not any(moddir.rglob(f"{name}.ko")), name
    xfs_disk = _xfs_disk(tmp_path / "xfs.img")
    archive = pack_initramfs(image, tmp_path / "root.cpio")

    with boot(image / f"boot/vmlinuz-{kver}", archive, tmp_path) as guest:
        guest.wait_for("VMCHECK READY", timeout=900)
        reply = guest.qmp("device_add", driver=HOTPLUG_DEVICE, id="hotplugged0")
        assert "return" in reply, reply
        guest.wait_for("VMCHECK ONDEMAND-READY", timeout=600)
        reply = guest.qmp("blockdev-add", driver="raw", **{"node-name": "xfsdisk"},
                          file={"driver": "file", "filename": str(xfs_disk)})
        assert "return" in reply, reply
        reply = guest.qmp("device_add", driver="virtio-blk-pci", drive="xfsdisk",
                          id="xfsdisk0")
        assert "return" in reply, reply
        guest.wait_for("VMCHECK DONE", timeout=900)
        found = _findings(guest.console())
        daemon_log = "\n".join(line.partition("VMLOG ")[2]
                               for line in guest.console().splitlines() if "VMLOG " in line)

    # The trimmed kernel booted: udev loaded the VM's drivers from the trimmed tree.
    assert found["unknown-symbols"] == "0", found
    assert "virtio_net" in found["loaded"].split(), found
    # kmodtrimd under systemd: its sandbox let it start, it claimed its name (Type=dbus),
    # it serves the generation the image build made, and the watchdog is armed.
    assert found["state"] == 's "idle"', found
    assert found["generation"] == "u 1", found
    assert "ActiveState=active" in found["unit"] and "SubState=running" in found["unit"]
    assert "WatchdogUSec=2min" in found["unit"] and "NRestarts=0" in found["unit"], found
    # Self-healing: the hot-plugged device's trimmed driver came back and was loaded.
    assert found["hotplug-driver"] == "loaded", (found, daemon_log)
    assert found["generation-after"] == "u 2", found
    assert f"restored {HOTPLUG_DRIVER} and loaded" in found["self-heal-journal"], found
    assert "ActiveState=active" in found["unit-after"] and "NRestarts=0" in found["unit-after"]
    # Restore on demand: the xfs disk mounts, the nat chain, the vxlan link and dm_crypt
    # work, each trimmed module came back through modprobe, logged and recorded.
    assert found["xfs"].endswith("hello from xfs mounted"), (found, daemon_log)
    assert found["nft"] == "ok", (found, daemon_log)
    assert found["vxlan"] == "ok", (found, daemon_log)
    # modprobe run by hand shows kmodtrim's line: "restored dm_crypt for modprobe (…)".
    assert found["dm-crypt"].startswith("restored dm_crypt for modprobe"), (found, daemon_log)
    assert found["dm-crypt"].endswith(" ok"), (found, daemon_log)
    print({k: found[k] for k in ("xfs", "nft", "vxlan", "dm-crypt", "ondemand-loaded",
                                 "ondemand-journal", "requested")})
    assert set(found["ondemand-loaded"].split()) == set(ON_DEMAND), (found, daemon_log)
    assert int(found["ondemand-journal"]) >= 4, (found, daemon_log)
    assert int(found["requested"]) >= 4, (found, daemon_log)
