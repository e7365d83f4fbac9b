"""The platform facts a running system shows (platforms.py decides what they mean): DMI
strings from ROOT/sys/class/dmi/id, ROOT/sys/hypervisor, and the devices' modaliases
(read by devices.py). An image root has none of them: all empty."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..platforms import PlatformFacts
from .inroot import _read_text

_DMI = "/sys/class/dmi/id/"


def _value(root: Path, inroot: str) -> str:
    text = _read_text(root, inroot)
    return "" if text is None else text.strip().replace("\x00", "")


def read_platform_facts(root: Path, modaliases: Iterable[str] = ()) -> PlatformFacts:
    """DMI vendor, product, chassis asset tag and BIOS vendor, the Xen hypervisor's type
    and uuid, and the given device modaliases. Unreadable files read as empty (the
    product_uuid and serials need root and are not used)."""
    return PlatformFacts(
        sys_vendor=_value(root, _DMI + "sys_vendor"),
        product_name=_value(root, _DMI + "product_name"),
        chassis_asset_tag=_value(root, _DMI + "chassis_asset_tag"),
        bios_vendor=_value(root, _DMI + "bios_vendor"),
        hypervisor_type=_value(root, "/sys/hypervisor/type"),
        hypervisor_uuid=_value(root, "/sys/hypervisor/uuid"),
        modaliases=tuple(modaliases),
    )
