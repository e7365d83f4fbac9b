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
from ..platforms import PlatformChoice
from ..presets import PRESETS

# Hot-plug storage and NIC drivers beyond a platform's own (platforms.py): SCSI disks,
# CD-ROMs and their transports, LSI MegaRAID, USB storage, and the SR-IOV virtual functions
# passed through to guests on any hypervisor.
_HOTPLUG = (
    "sd_mod", "sr_mod", "sg", "scsi_transport_*", "megaraid_sas", "usb_storage", "uas",
    "igbvf", "iavf",
)


def likely_families(platforms: tuple[str, ...] | None) -> tuple[str, ...]:
    """The rules of what is likely needed offline: the boot-disk and NIC drivers of
    ``platforms`` (None: every platform's), the hot-plug drivers and the filesystems."""
    boot = PRESETS["cloud-boot"] if platforms is None else tuple(
        PlatformChoice(platforms, "").drivers())
    return (*boot, *_HOTPLUG, *PRESETS["filesystems"])


@functools.cache
def _matcher(platforms: tuple[str, ...] | None) -> LoadedPolicy:
    rules = tuple(parse_rule(text, source="likely offline")
                  for text in likely_families(platforms))
    # Only its rules are asked: no settings (and no pydantic) needed.
    return LoadedPolicy(settings=cast("Policy", SettingsView({})), rules=rules,
                        sources=("likely offline",))


def likely_offline(name: str, relpath: str, aliases: Iterable[str] = (),
                   platforms: tuple[str, ...] | None = None) -> bool:
    """Whether a module (name, path relative to its module directory, aliases) belongs
    to the families a VM on ``platforms`` (None: any) is likely to need offline: a KVM
    guest's local copies are not spent on Hyper-V's or Xen's drivers."""
    return _matcher(platforms).decide(name, relpath, aliases) is not None
