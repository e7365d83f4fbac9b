"""The proof from disk, on Debian 13 and on Debian 12: the release with kmodtrim installed by
apt trims itself in auto mode, boots from its own trimmed disk and regenerated initramfs,
heals hot-plugged storage, brings back what programs ask modprobe for, keeps it across a
reboot, trims a kernel installed later by apt (Debian 13) and rolls everything back.

A cached root of the release (tests/e2e/diskimage.py: systemd, udev, systemd-networkd, the
cloud kernel, initramfs-tools) gets the built .deb with apt and a policy drop-in (``mode =
"auto"``, one boot and no days of observation); its only apt source becomes a local
repository (/srv/e2e-repo) holding the installed kernel's package and, on Debian 13, a
second cloud kernel of another version (downloaded on the host through tests/kernels.py),
so the guest needs no network to Debian. The root is written to an ext4 disk image, and
qemu (TCG, i440fx) boots it with the kernel and initramfs read out of the image's /boot:

- boot 1: kmodtrimd records the boot, finds the minimum observation met and trims the
  running kernel with the default policy, regenerating the initramfs with
  update-initramfs; the guest waits for the job and powers off;
- boot 2, with the initramfs boot 1 wrote: multi-user reached with no failed unit, root
  mounted from the virtio disk, the NIC has a DHCP address, the journal has no
  "Unknown symbol" or "module not found", and ``dpkg --verify`` lists only trimmed files.
  Then, in the same boot:
  - hot-plug (QMP ``device_add`` on the ACPI-hotplug PCI bus): a virtio-scsi controller
    (virtio_scsi is a KVM platform driver the policy keeps) and a VMware PVSCSI controller
    (vmw_pvscsi, which the trim took out), each with a disk: kmodtrimd restores and loads
    vmw_pvscsi (its self-heal journal message), and both disks appear;
  - two trimmed modules asked for as programs do: ``modprobe dm_crypt``, and ``ip link
    add … type vxlan`` (the kernel asks modprobe for ``rtnl-link-vxlan``): each comes
    back on demand through kmodtrim's modprobe.d install line and kmodtrimd (the
    on-demand journal message) and loads;
  - Debian 13: ``apt-get install`` of the second kernel package from the local
    repository: the package's postinst runs kmodtrim's /etc/kernel/postinst.d hook,
    kmodtrimd trims the new kernel once apt has finished (a ``kernel-install`` job) and
    regenerates its initramfs after the trim;
  - the drop-in is removed (manual mode: in auto mode the daemon would trim the running
    kernel again once rolled back);
- boot 3, after the reboot: what boot 2 brought back (dm_crypt, vxlan, vmw_pvscsi) is
  still in the tree, loads again with no restore, ``explain`` says why it is kept and a
  new plan keeps it; then ``kmodtrim rollback 0 --yes`` puts every file back;
- boot 4, rolled back: multi-user reached with no failed unit, ``dpkg --verify`` clean,
  every kernel's module files as their packages install them, kmodtrim's modprobe.d file
  gone.

Figures (module tree, stash, initramfs in MB; boot to multi-user in seconds; the second
kernel's tree and initramfs; each phase's seconds) are printed and written to the test's
tmp dir as figures-RELEASE.json, with each boot's serial log and findings.

Part of the suite (system tier), once per release; the first run builds each release's
cached image (root and network needed). Run alone: ``pytest tests/e2e/test_from_disk.py``
(``-k bookworm`` or ``-k trixie`` for one release).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from diskimage import (
    KernelGone,
    base_root,
    boot_disk,
    boot_seconds,
    install_deb,
    kernel_packages,
    kernel_release,
    local_repository,
    make_disk,
    need_e2e_tools,
    read_tree,
    serial_service,
)

from debbuild import build_kmodtrim_deb
from kernels import BOOKWORM, TRIXIE, Release
from kmodtrim.daemon import MESSAGE_IDS
from pkgbuild import sh
from vm import Guest

pytestmark = [pytest.mark.slow, pytest.mark.system]

HERE = Path(__file__).resolve().parent
DROPIN = 'mode = "auto"\n\n[min_observation]\nboots = 1\ndays = 0\n'
BOOT_TIMEOUT = 1800.0
BOOT2_TIMEOUT = 5400.0  # hot-plug, a kernel install or a rollback under TCG
MB = 1e6
# Hot-plugged SCSI controllers (qemu device, the guest driver) and their disks' sizes.
VIRTIO_SCSI = ("virtio-scsi-pci", "virtio_scsi", 32 * 1024**2)
PVSCSI = ("pvscsi", "vmw_pvscsi", 48 * 1024**2)
ON_DEMAND = ("dm_crypt", "vxlan")  # asked for by name and by the kernel (rtnl-link-vxlan)


def prepare(root: Path, deb: Path) -> str:
    """Install the .deb with apt, the policy drop-in and the check service."""
    apt_output = install_deb(root, deb)
    dropin = root / "etc/kmodtrim/policy.d/50-e2e.toml"
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(DROPIN)
    serial_service(root, "guest-check", "kmodtrim e2e checks", HERE / "guest-check",
                   after="kmodtrimd.service")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert (wants / "kmodtrimd.service").is_symlink(), "the package did not enable kmodtrimd"
    return apt_output


def run_boot(n: int, image: Path, kver: str, work: Path, *, timeout: float = BOOT_TIMEOUT,
             extra: tuple[str, ...] = (), during: Callable[[Guest], None] | None = None
             ) -> Path:
    """Boot the image until the guest's check powers it off (``during`` talks to the
    running guest first); its findings directory."""
    boot_dir = work / f"boot{n}"
    boot_dir.mkdir()
    with boot_disk(image, kver, boot_dir, extra=extra) as guest:
        try:
            if during is not None:
                during(guest)
            guest.wait_for(f"E2E-DONE boot {n}", timeout)
            guest.proc.wait(timeout=300)
        finally:
            (boot_dir / "serial.log").write_text(guest.console())
    return read_tree(image, f"/var/lib/e2e/boot{n}", boot_dir / "guest")


def hotplug_drives(work: Path) -> tuple[str, ...]:
    """qemu arguments for the (not yet attached) drives of the hot-plugged disks."""
    args: list[str] = []
    for _, driver, size in (VIRTIO_SCSI, PVSCSI):
        disk = work / f"{driver}.img"
        with open(disk, "wb") as f:
            f.truncate(size)
        args += ["-drive", f"if=none,id={driver},file={disk},format=raw"]
    return tuple(args)


def hotplug(guest: Guest) -> None:
    """Once the guest asks for it: a virtio-scsi and a PVSCSI controller on the PCI bus,
    then a disk on each (qemu attaches it to the controller's bus at once)."""
    guest.wait_for("E2E-HOTPLUG-READY", BOOT_TIMEOUT)
    for device, driver, _ in (VIRTIO_SCSI, PVSCSI):
        reply = guest.qmp("device_add", driver=device, id=f"{driver}-hba")
        assert "return" in reply, (device, reply)
        reply = guest.qmp("device_add", driver="scsi-hd", bus=f"{driver}-hba.0",
                          drive=driver, id=f"{driver}-disk")
        assert "return" in reply, (device, reply)


def sizes(found: Path, when: str) -> dict[str, int]:
    pairs = (line.split() for line in (found / f"sizes-{when}").read_text().splitlines())
    return {p[0]: int(p[1]) if len(p) > 1 else 0 for p in pairs}


def timings(found: Path) -> dict[str, int]:
    """Seconds per phase of a boot, as the guest measured them."""
    return {name: int(value) for name, value in
            (line.split() for line in (found / "timings").read_text().splitlines())}


def trimmed_paths(found: Path, release: Release) -> set[str]:
    """The files generation 1 took out (``kmodtrim show 1 --json``), as absolute paths
    spelt as the release's packages spell them."""
    doc: dict[str, Any] = json.loads((found / "gen1.json").read_text())
    return {package_path(str(entry["path"]), release) for entry in doc["taken_out"]}


def trimmed_modules(found: Path) -> set[str]:
    doc: dict[str, Any] = json.loads((found / "gen1.json").read_text())
    return {str(entry["module"]) for entry in doc["taken_out"] if entry.get("module")}


def package_path(path: str, release: Release) -> str:
    """``path`` as the release's packages spell it: both roots are usrmerged (/lib is a
    link to usr/lib) and kmodtrim records the /lib spelling; Debian 13's packages ship
    their files under /usr, Debian 12's under /lib."""
    path = "/" + path.lstrip("/")
    if release.usrmerged and path.startswith(("/lib/", "/bin/", "/sbin/")):
        return "/usr" + path
    return path


def journal_messages(found: Path, name: str, kind: str) -> list[str]:
    """kmodtrimd's journal messages of one kind (its fixed MESSAGE_ID) from ``name``
    (``journalctl -o json`` lines)."""
    messages = []
    for line in (found / name).read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("MESSAGE_ID") == MESSAGE_IDS[kind]:
            messages.append(str(entry.get("MESSAGE")))
    return messages


def generations(found: Path) -> dict[int, dict[str, Any]]:
    """Every generation's ``kmodtrim show N --json`` the guest saved at the end of a
    boot, by number."""
    docs: dict[int, dict[str, Any]] = {}
    for path in found.glob("show-*.json"):
        doc: dict[str, Any] = json.loads(path.read_text())
        docs[int(doc["generation"])] = doc
    return docs


def check_booted(found: Path, name: str) -> None:
    """Multi-user reached with no failed unit, root on the virtio disk, the NIC up."""
    state = (found / "state").read_text().strip()
    assert state == "running", (name, state, (found / "failed").read_text())
    assert (found / "failed").read_text().strip() == "", name
    assert (found / "root").read_text().split()[:2] == ["/dev/vda", "ext4"], name
    assert "inet 10.0.2." in (found / "addr").read_text(), (name, (found / "addr").read_text())


def check_kept(found: Path, names: list[str]) -> None:
    """After the reboot: each of ``names`` is in the tree (modprobe -n loads its file, no
    install line), is kept by a new plan for having been asked for or healed, and
    ``explain`` says so; the on-demand ones load again with no restore."""
    assert (found / "kept-ondemand-journal").read_text().strip() == "", \
        (found / "kept-ondemand-journal").read_text()  # nothing had to come back
    for what in ("modprobe-dm_crypt", "ip-vxlan"):
        assert (found / f"kept-{what}.rc").read_text().strip() == "0", \
            (found / f"kept-{what}").read_text()
    loaded = (found / "kept-lsmod").read_text().split()
    plan = json.loads((found / "kept-plan.json").read_text())
    kept = {m["name"]: [r["text"] for r in m["reasons"]] for m in plan["keep"]}
    removed = {m["name"] if isinstance(m, dict) else m for m in plan["remove"]}
    for name in names:
        shown = (found / f"kept-modprobe-n-{name}").read_text()
        assert "insmod " in shown and "kmodtrim restore" not in shown, (name, shown)
        explained = (found / f"kept-explain-{name}").read_text()
        assert name in kept and name not in removed, (name, kept.get(name), explained)
        if name in ON_DEMAND:
            assert name in loaded, name
            assert any("requested by modprobe" in r for r in kept[name]), (name, kept[name])
            assert "requested by modprobe" in explained, explained
        else:
            assert any("device that appeared" in r for r in kept[name]), (name, kept[name])


def check_second_kernel(second: Path, new_kver: str) -> dict[str, Any]:
    """The second kernel (Debian 13): installed by apt, trimmed by kmodtrimd after the
    hook's event, its initramfs regenerated after the trim. Its figures."""
    daemon_log = (second / "kmodtrimd-end").read_text()
    apt_install = (second / "apt-install").read_text()
    assert (second / "apt-install.rc").read_text().strip() == "0", apt_install[-3000:]
    assert "1 newly installed" in apt_install, apt_install[-3000:]
    assert f"kernel {new_kver} installed: queued" in daemon_log, daemon_log[-3000:]
    installs = journal_messages(second, "kmodtrimd-end.jsonl", "kernel-install")
    assert any(m.startswith("kernel-install job") and " done: changed " in m
               for m in installs), (installs, daemon_log[-3000:])
    gens = generations(second)
    new_gen = [g for g in gens.values() if new_kver in g.get("description", "")
               and g.get("taken_out")]
    assert len(new_gen) == 1, [(g["generation"], g["description"]) for g in gens.values()]
    regen = new_gen[0]["regen"][new_kver]["initramfs"]
    assert regen["image"] == f"/boot/initrd.img-{new_kver}", regen
    assert regen["previous"] == f"/boot/initrd.img-{new_kver}.kmodtrim-prev", regen
    package_ko = int((second / "package-ko").read_text())
    installed = sizes(second, "end")
    trimmed_ko = installed[f"ko:{new_kver}"]
    assert 0 < trimmed_ko < package_ko / 3, (trimmed_ko, package_ko)
    initrds = {Path(p[0]).name: (int(p[1]), int(p[2])) for p in
               (line.split() for line in (second / "initrd-new").read_text().splitlines())}
    new_initrd = initrds[f"initrd.img-{new_kver}"]
    package_initrd = initrds[f"initrd.img-{new_kver}.kmodtrim-prev"]
    assert new_initrd[1] > package_initrd[1], initrds  # written after the package's
    assert new_initrd[0] < package_initrd[0], initrds  # without the trimmed modules
    return {"second_kernel": new_kver,
            "second_tree_mb": [installed[f"tree:{new_kver}"] / MB],
            "second_modules": [package_ko, trimmed_ko],
            "second_initramfs_mb": [package_initrd[0] / MB, new_initrd[0] / MB]}


@pytest.mark.parametrize("release", [TRIXIE, BOOKWORM], ids=lambda r: r.name)
def test_auto_trim_then_boot_from_the_trimmed_disk(tmp_path: Path, release: Release) -> None:
    need_e2e_tools()
    # Debian 13's test also installs a second kernel through apt and the hooks.
    with_second = release is TRIXIE
    base = base_root(release)
    try:
        debs = kernel_packages(release, kernel_release(base), second=with_second)
    except KernelGone:
        # The cached root is older than the archive: the archive no longer has its kernel.
        base = base_root(release, rebuild=True)
        debs = kernel_packages(release, kernel_release(base), second=with_second)
    (tmp_path / "deb").mkdir()
    deb = build_kmodtrim_deb(tmp_path / "deb")
    root = tmp_path / "root"
    sh("cp", "-a", "--reflink=auto", f"{base}/.", root)
    kver = kernel_release(root)
    apt_output = prepare(root, deb)
    # Every dependency came with the cached root: apt installs kmodtrim alone.
    assert "0 upgraded, 1 newly installed" in apt_output, apt_output
    local_repository(root, debs)
    new_kver = ""
    if with_second:
        second_package = sh("dpkg-deb", "-f", debs[1], "Package").stdout.strip()
        new_kver = second_package.removeprefix("linux-image-")
        assert new_kver != kver, (new_kver, kver)
        (root / "srv/e2e-repo/second-kernel").write_text(second_package + "\n")
    image = make_disk(root, tmp_path / "disk.img")
    shutil.rmtree(root)

    # Boot 1: the automatic trim.
    first = run_boot(1, image, kver, tmp_path)
    kmodtrimd_log = (first / "kmodtrimd").read_text()
    assert "auto mode: minimum observation met" in kmodtrimd_log, kmodtrimd_log
    assert "trim job" in kmodtrimd_log and " done:" in kmodtrimd_log, kmodtrimd_log
    assert (first / "state").read_text().strip() == "running", (first / "failed").read_text()

    # Boot 2: from the trimmed disk, then hot-plug, on-demand requests, a kernel install.
    second = run_boot(2, image, kver, tmp_path, timeout=BOOT2_TIMEOUT,
                      extra=hotplug_drives(tmp_path), during=hotplug)
    check_booted(second, "boot 2")
    journal = (second / "journal").read_text()
    for bad in ("Unknown symbol", "module not found", "Module not found"):
        assert bad not in journal, [ln for ln in journal.splitlines() if bad in ln]

    trimmed = trimmed_paths(second, release)
    assert trimmed
    verify = {line.split()[-1] for line in (second / "dpkg-verify").read_text().splitlines()
              if line.strip()}
    assert verify, "dpkg --verify lists no trimmed file"
    assert verify == trimmed, (sorted(verify - trimmed)[:20], sorted(trimmed - verify)[:20])
    assert all(line.startswith("missing ")
               for line in (second / "dpkg-verify").read_text().splitlines() if line.strip())
    on_demand = "kmodtrim-on-demand.conf"
    assert on_demand in (second / "modprobe.d").read_text().split()

    # Hot-plug: PVSCSI's driver was trimmed and comes back by self-healing; virtio_scsi
    # is kept by the KVM platform's drivers (restored too, should a policy trim it).
    taken_out = trimmed_modules(second)
    assert PVSCSI[1] in taken_out, f"the trim kept {PVSCSI[1]}: the hot-plug proves nothing"
    heal = journal_messages(second, "kmodtrimd-end.jsonl", "self-heal")
    daemon_log = (second / "kmodtrimd-end").read_text()
    disks = {fields[2]: int(fields[1]) * 512 for fields in
             (line.split() for line in (second / "hotplug-disks").read_text().splitlines())}
    for _, driver, size in (VIRTIO_SCSI, PVSCSI):
        assert disks.get(driver) == size, (driver, disks, heal, daemon_log[-3000:])
        assert driver in (second / "hotplug-lsmod").read_text().split(), (driver, heal)
        if driver in taken_out:
            assert any(f"restored {driver} and loaded" in m for m in heal), (driver, heal)
    assert VIRTIO_SCSI[1] in taken_out or not any(VIRTIO_SCSI[1] in m for m in heal), heal

    # On demand: each was trimmed (modprobe -n resolved it to kmodtrim's install line),
    # came back through kmodtrimd and loaded.
    on_demand_log = (second / "ondemand-journal").read_text()
    loaded = (second / "ondemand-lsmod").read_text().split()
    for name in ON_DEMAND:
        assert name in taken_out, f"the trim kept {name}: asking for it proves nothing"
        shown = (second / f"ondemand-modprobe-n-{name}").read_text()
        assert "install /usr/bin/kmodtrim restore --on-demand" in shown, (name, shown)
        assert f"restored {name} for modprobe" in on_demand_log, (name, on_demand_log)
        assert name in loaded, (name, on_demand_log)
    for what in ("modprobe-dm_crypt", "ip-vxlan"):
        assert (second / f"ondemand-{what}.rc").read_text().strip() == "0", \
            ((second / f"ondemand-{what}").read_text(), on_demand_log)

    second_figures = check_second_kernel(second, new_kver) if new_kver else {}

    # Boot 3: the reboot keeps what came back; then the rollback.
    third = run_boot(3, image, kver, tmp_path, timeout=BOOT2_TIMEOUT)
    check_booted(third, "boot 3")
    check_kept(third, [*ON_DEMAND, PVSCSI[1]])
    assert "trim job" not in (third / "kmodtrimd").read_text()  # manual mode now
    rollback = (third / "rollback").read_text()
    assert (third / "rollback.rc").read_text().strip() == "0", rollback
    history = json.loads((third / "history-rolled-back.json").read_text())["generations"]
    assert history[-1]["action"] == "rollback" and history[-1]["removed_files"] == 0, history
    journal_end = (third / "journal-rolled-back").read_text()
    assert "Unknown symbol" not in journal_end, \
        [ln for ln in journal_end.splitlines() if "Unknown symbol" in ln]

    # Boot 4: rolled back.
    fourth = run_boot(4, image, kver, tmp_path)
    check_booted(fourth, "boot 4")
    verify_end = (fourth / "dpkg-verify").read_text()
    assert verify_end.strip() == "", verify_end[-3000:]
    assert on_demand not in (fourth / "modprobe.d").read_text().split()
    before, after, rolled = sizes(first, "start"), sizes(second, "start"), sizes(fourth, "start")
    for key in (f"ko:{kver}", f"kobytes:{kver}"):
        assert rolled[key] == before[key], (key, before[key], rolled[key])
    if new_kver:
        package_ko = second_figures["second_modules"][0]
        assert rolled[f"ko:{new_kver}"] == package_ko, (rolled[f"ko:{new_kver}"], package_ko)
        second_figures["second_tree_mb"].insert(0, rolled[f"tree:{new_kver}"] / MB)
        second_figures["second_initramfs_mb"].append(rolled[f"initramfs:{new_kver}"] / MB)
    fourth_log = (fourth / "kmodtrimd").read_text()
    assert "trim job" not in fourth_log, fourth_log

    figures = {
        "release": release.name,
        "kernel": kver,
        "tree_mb": [before["tree"] / MB, after["tree"] / MB, rolled["tree"] / MB],
        "stash_mb": [before["stash"] / MB, after["stash"] / MB, rolled["stash"] / MB],
        "kmodtrim_state_mb": [before["state"] / MB, after["state"] / MB,
                              rolled["state"] / MB],
        "initramfs_mb": [before["initramfs"] / MB, after["initramfs"] / MB,
                         rolled["initramfs"] / MB],
        "boot_dir_mb": [before["boot"] / MB, after["boot"] / MB, rolled["boot"] / MB],
        "boot_seconds": [boot_seconds(first), boot_seconds(second), boot_seconds(fourth)],
        "files_trimmed": len(trimmed),
        **second_figures,
        "phase_seconds": {f"boot{n}": timings(found)
                          for n, found in ((1, first), (2, second), (3, third),
                                           (4, fourth))},
    }
    (tmp_path / f"figures-{release.name}.json").write_text(json.dumps(figures, indent=1)
                                                            + "\n")
    print(json.dumps(figures))
