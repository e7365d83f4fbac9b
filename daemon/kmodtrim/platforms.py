"""The platform set: the boot-disk and NIC drivers of the instance families of the platform
a machine runs on, and how that platform is recognised.

Clouds move an instance between buses when its type changes (Xen → Nitro's NVMe and ENA on
one cloud; Hyper-V's storvsc/netvsc → MANA or Mellanox VFs on another; virtio ↔ NVMe on
KVM clouds), and a host-only initramfs then cannot find its root disk. So the planner keeps,
whatever was observed, every boot-disk and NIC driver of *this* platform's families — not
those of every cloud: on a KVM guest the Hyper-V, Xen and VMware drivers can go.

Which platform: ``--cloud NAME`` (repeatable) or the policy's ``clouds`` name it; ``auto``
(the default) detects it on the running system the way ``systemd-detect-virt`` and
cloud-init's ``ds-identify`` do — DMI strings (``sys_vendor``, ``product_name``,
``chassis_asset_tag``, ``bios_vendor``), ``/sys/hypervisor`` and the bus devices present
(PCI vendor IDs, VMBus). Offline on an image root, or on a machine no rule recognises, no
platform is known and every platform's set is kept.

Pure: data and decisions over plain strings; observe/platform.py reads the facts. No
third-party imports (the CLI lists platforms cheaply).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from .request import Cloud

AUTO = Cloud.AUTO.value  # detect on the running system; every platform offline
ALL = Cloud.ALL.value  # every platform's set


@dataclass(frozen=True)
class Platform:
    name: str
    description: str
    drivers: tuple[str, ...]  # module names (globs allowed), as preset rules


_VIRTIO = (
    "virtio", "virtio_ring", "virtio_pci", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
    "virtio_mmio", "virtio_blk", "virtio_scsi", "virtio_net", "net_failover", "failover",
    "virtio_console", "virtio_balloon", "virtio_rng",
)
_NVME = ("nvme", "nvme_core", "nvme_common")
# IDE/SATA/AHCI: QEMU's i440fx and q35 disks and CD-ROMs, Hyper-V generation 1's boot
# disk, VMware's SATA controllers.
_ATA = ("ahci", "libahci", "ata_piix", "ata_generic", "pata_acpi", "libata")
_HYPERV = (
    "hv_vmbus", "hv_storvsc", "hv_netvsc", "hv_utils", "hv_balloon", "hv_sock",
    "hyperv_keyboard", "hid_hyperv", "hyperv_fb", "hyperv_drm", "pci_hyperv",
    "pci_hyperv_intf",
)
_XEN = ("xen_blkfront", "xen_netfront", "xen_scsifront", "xen_kbdfront", "xen_fbfront")

# What every platform's guests use: SCSI disks and the CD-ROM cloud-init's NoCloud,
# ConfigDrive and Azure's provisioning media arrive on, device-mapper roots, and the ACPI
# power button with evdev (without them a cloud "stop" cannot shut the VM down cleanly).
COMMON: tuple[str, ...] = (
    "scsi_mod", "scsi_common", "sd_mod", "sr_mod", "dm_mod", "button", "evdev",
)

PLATFORMS: Mapping[str, Platform] = MappingProxyType({p.name: p for p in (
    Platform("kvm", "KVM/QEMU guests (OpenStack, Hetzner, DigitalOcean, Scaleway, "
             "Firecracker, libvirt): virtio, emulated NVMe, e1000/e1000e, AHCI/IDE",
             (*_VIRTIO, *_NVME, "e1000", "e1000e", *_ATA)),
    Platform("aws", "Amazon EC2: Nitro (NVMe, ENA), Xen instance types (blkfront, "
             "netfront, ixgbevf)", (*_NVME, "ena", "ixgbevf", *_XEN)),
    Platform("gcp", "Google Compute Engine: virtio-scsi/virtio-net, gVNIC, NVMe",
             (*_VIRTIO, *_NVME, "gve")),
    Platform("azure", "Microsoft Azure: VMBus storvsc/netvsc, MANA and Mellanox VFs of "
             "accelerated networking, NVMe (v6+), IDE (generation 1)",
             (*_HYPERV, "mana", "mlx4_core", "mlx4_en", "mlx5_core", *_NVME, *_ATA)),
    Platform("hyperv", "Hyper-V guests: VMBus storvsc/netvsc, IDE (generation 1)",
             (*_HYPERV, *_ATA)),
    Platform("oci", "Oracle Cloud: paravirtual virtio, NVMe, Mellanox VFs",
             (*_VIRTIO, *_NVME, "mlx5_core")),
    Platform("alibaba", "Alibaba Cloud ECS: virtio, NVMe", (*_VIRTIO, *_NVME)),
    Platform("vmware", "VMware guests: PVSCSI, vmxnet3, LSI Logic, e1000/e1000e, "
             "SATA, NVMe, VMCI", (
                 "vmw_pvscsi", "vmxnet3", "vmw_balloon", "vmw_vmci", "vsock",
                 "vmw_vsock_vmci_transport", "mptspi", "mptsas", "e1000", "e1000e",
                 *_ATA, *_NVME)),
    Platform("xen", "Xen guests (XCP-ng, Citrix): front-ends only, never dom0's back-ends",
             (*_XEN, *_ATA)),
)})

CHOICES: tuple[str, ...] = tuple(c.value for c in Cloud)  # tests: the same as PLATFORMS


def every_platform_drivers() -> tuple[str, ...]:
    """Every platform's drivers and the common ones, once each, in declaration order (the
    ``cloud-boot`` preset)."""
    names = [d for p in PLATFORMS.values() for d in p.drivers]
    return tuple(dict.fromkeys((*names, *COMMON)))


# ---------------------------------------------------------------------------------------
# Detection


@dataclass(frozen=True)
class PlatformFacts:
    """What a running system shows about its platform (all empty on an image root)."""

    sys_vendor: str = ""
    product_name: str = ""
    chassis_asset_tag: str = ""
    bios_vendor: str = ""
    hypervisor_type: str = ""  # /sys/hypervisor/type: "xen" in Xen guests
    hypervisor_uuid: str = ""  # /sys/hypervisor/uuid: starts "ec2" on EC2's Xen types
    modaliases: tuple[str, ...] = ()  # of the devices present

    def known(self) -> bool:
        return any((self.sys_vendor, self.product_name, self.chassis_asset_tag,
                    self.bios_vendor, self.hypervisor_type, self.modaliases))


@dataclass(frozen=True)
class Detected:
    platform: str
    evidence: str  # e.g. "DMI sys_vendor 'QEMU'"


# Azure's fixed chassis asset tag (cloud-init's DataSourceAzure).
_AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
# PCI vendor IDs in modaliases ("pci:v00001AF4d…").
_PCI_VENDORS = {"00001D0F": "aws", "00001AF4": "kvm", "000015AD": "vmware",
                "00001414": "hyperv", "00005853": "xen"}
# DMI sys_vendor / product_name / bios_vendor prefixes of KVM-based clouds and QEMU.
_KVM_VENDORS = ("QEMU", "OpenStack", "DigitalOcean", "Hetzner", "Scaleway", "Red Hat",
                "Bochs", "Nutanix", "Linode", "Akamai", "Vultr", "Exoscale", "UpCloud",
                "Firecracker")


def _dmi_rule(f: PlatformFacts) -> Detected | None:
    if f.chassis_asset_tag == _AZURE_ASSET_TAG:
        return Detected("azure", f"DMI chassis_asset_tag {f.chassis_asset_tag!r} (Azure)")
    if f.chassis_asset_tag == "OracleCloud.com":
        return Detected("oci", f"DMI chassis_asset_tag {f.chassis_asset_tag!r}")
    for field, value in (("sys_vendor", f.sys_vendor), ("bios_vendor", f.bios_vendor)):
        if value.startswith("Amazon EC2"):
            return Detected("aws", f"DMI {field} {value!r}")
    if f.hypervisor_uuid.lower().startswith("ec2"):
        return Detected("aws", "/sys/hypervisor/uuid starts with 'ec2'")
    if f.product_name.startswith("Google Compute Engine") or f.sys_vendor == "Google":
        return Detected("gcp", f"DMI product_name {f.product_name!r}")
    if "Alibaba Cloud" in f.product_name or f.sys_vendor.startswith("Alibaba"):
        return Detected("alibaba", f"DMI product_name {f.product_name!r}")
    if f.sys_vendor.startswith("VMware"):
        return Detected("vmware", f"DMI sys_vendor {f.sys_vendor!r}")
    if f.sys_vendor.startswith("Microsoft Corporation") and \
            f.product_name.startswith("Virtual Machine"):
        return Detected("hyperv", f"DMI sys_vendor {f.sys_vendor!r}, product_name "
                                  f"{f.product_name!r}")
    if f.hypervisor_type == "xen":
        return Detected("xen", "/sys/hypervisor/type 'xen'")
    for field, value in (("sys_vendor", f.sys_vendor), ("product_name", f.product_name),
                         ("bios_vendor", f.bios_vendor)):
        if value.startswith(_KVM_VENDORS) or value == "KVM":
            return Detected("kvm", f"DMI {field} {value!r}")
    return None


def _bus_rule(modaliases: Iterable[str]) -> Detected | None:
    """From the devices present: a VMBus, or a hypervisor's PCI vendor ID (the first found
    in the order of _PCI_VENDORS)."""
    aliases = tuple(modaliases)
    if any(a.startswith("vmbus:") for a in aliases):
        return Detected("hyperv", "VMBus devices present")
    vendors = {a[5:13].upper() for a in aliases if a.startswith("pci:v")}
    for vendor, platform in _PCI_VENDORS.items():
        if vendor in vendors:
            return Detected(platform, f"PCI vendor {vendor[4:].lower()} present")
    return None


def detect(facts: PlatformFacts) -> Detected | None:
    """The platform the facts show, or None when no rule recognises them (bare metal, an
    unknown hypervisor, an image root)."""
    return _dmi_rule(facts) or _bus_rule(facts.modaliases)


# ---------------------------------------------------------------------------------------
# Choice


@dataclass(frozen=True)
class PlatformChoice:
    """The platforms whose drivers a plan keeps, and why those."""

    names: tuple[str, ...]
    source: str  # e.g. "detected: DMI sys_vendor 'QEMU'", "--cloud kvm"

    @property
    def every(self) -> bool:
        return set(self.names) == set(PLATFORMS)

    def describe(self) -> str:
        which = "every platform" if self.every else ", ".join(self.names)
        return f"{which} ({self.source})"

    def drivers(self) -> dict[str, str]:
        """Driver (glob) → the platform(s) it is kept for, in declaration order; with
        any platform, the common drivers too."""
        found: dict[str, list[str]] = {}
        for name in self.names:
            for driver in PLATFORMS[name].drivers:
                found.setdefault(driver, []).append(name)
        if self.names:
            for driver in COMMON:
                found.setdefault(driver, []).append("every platform")
        return {d: ", ".join(p) for d, p in found.items()}


def choose(requested: Sequence[str], facts: PlatformFacts) -> PlatformChoice:
    """Which platforms' drivers to keep. ``requested``: the ``--cloud`` names if given,
    else the policy's ``clouds`` (``auto``, ``all`` or platform names, validated before;
    none: no platform set). ``auto`` detects from ``facts`` — a running system's; an image
    root shows none — and keeps every platform's set when nothing is recognised."""
    if not requested:
        return PlatformChoice((), "none asked for")
    names = [n for n in dict.fromkeys(requested) if n != AUTO]
    if ALL in names:
        return PlatformChoice(tuple(PLATFORMS), "asked for: all")
    detected = detect(facts) if AUTO in requested else None
    if detected is not None:
        also = f"; also asked for: {', '.join(names)}" if names else ""
        if detected.platform not in names:
            names.insert(0, detected.platform)
        return PlatformChoice(tuple(names), f"detected: {detected.evidence}{also}")
    if AUTO not in requested:
        return PlatformChoice(tuple(names), f"asked for: {', '.join(names)}")
    why = "no platform recognised" if facts.known() else \
        "offline: the image's platform is unknown"
    return PlatformChoice(tuple(PLATFORMS), f"{why}; name it with --cloud")


def unknown_names(names: Iterable[str]) -> list[str]:
    return [n for n in names if n not in CHOICES]
