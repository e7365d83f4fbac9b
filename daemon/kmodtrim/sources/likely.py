"""The module families a VM is likely to need offline, which the ``likely`` stash policy
keeps local copies of even when the archive serves them (sources/choice.py): clouds move an
instance between disk and NIC buses, and disks and NICs are hot-plugged (virtio-scsi, NVMe,
an SR-IOV VF); a filesystem is mounted from a volume attached later. If the archive drops
the running kernel's version before such a device appears, the local copy is what loads.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from ..policy.cache import SettingsView
from ..policy.matcher import LoadedPolicy
from ..policy.rules import parse_rule

if TYPE_CHECKING:
    from ..policy.model import Policy
from ..presets import PRESETS

# Hot-plug storage and NIC drivers beyond the cloud-boot preset's boot set: SCSI disks and
# CD-ROMs behind virtio-scsi/PVSCSI/LSI, USB storage, hypervisors' emulated NICs and the
# SR-IOV virtual functions clouds attach.
_HOTPLUG = (
    "sd_mod", "sr_mod", "sg", "scsi_transport_*", "mptspi", "mptsas", "vmw_pvscsi",
    "megaraid_sas", "ahci", "ata_piix", "usb_storage", "uas", "xen_blkfront",
    "xen_netfront", "e1000", "e1000e", "igb", "igbvf", "ixgbevf", "iavf", "ice", "vmxnet3",
    "mlx4_en", "mlx5_core", "ena", "gve", "hv_netvsc", "hv_storvsc",
)
LIKELY_OFFLINE: tuple[str, ...] = (*PRESETS["cloud-boot"], *_HOTPLUG,
                                   *PRESETS["filesystems"])


@functools.cache
def _matcher() -> LoadedPolicy:
    rules = tuple(parse_rule(text, source="likely offline") for text in LIKELY_OFFLINE)
    # Only its rules are asked: no settings (and no pydantic) needed.
    return LoadedPolicy(settings=cast("Policy", SettingsView({})), rules=rules,
                        sources=("likely offline",))


def likely_offline(name: str, relpath: str, aliases: Iterable[str] = ()) -> bool:
    """Whether a module (name, path relative to its module directory, aliases) belongs
    to the families a VM is likely to need offline."""
    return _matcher().decide(name, relpath, aliases) is not None
