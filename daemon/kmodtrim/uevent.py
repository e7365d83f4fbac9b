"""Parse kernel uevents as they arrive on a NETLINK_KOBJECT_UEVENT socket.

The kernel sends ``ACTION@DEVPATH\\0KEY=VALUE\\0…``; module loads are ``add`` events with
``SUBSYSTEM=module`` and ``DEVPATH=/module/NAME``, device arrivals carry ``MODALIAS=``.
udev re-broadcasts events to its own multicast group with a ``libudev\\0`` header; we
listen to the kernel group only, so those are not ours to parse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .names import is_valid_module_name, normalize

UDEV_MAGIC = b"libudev\0"
_ACTION = re.compile(r"^[a-z]+$")
_MODULE_PREFIX = "/module/"


@dataclass(frozen=True)
class Uevent:
    """One kernel uevent: its action and devpath (from the header), the SUBSYSTEM and
    MODALIAS values if present, and every ``KEY=VALUE`` pair (read-only)."""

    action: str
    devpath: str
    subsystem: str | None
    modalias: str | None
    env: Mapping[str, str] = field(hash=False)

    @property
    def module_loaded(self) -> str | None:
        """The normalised name of the module this event reports loaded, else None."""
        if self.action != "add" or self.subsystem != "module":
            return None
        if not self.devpath.startswith(_MODULE_PREFIX):
            return None
        name = self.devpath[len(_MODULE_PREFIX):]
        return normalize(name) if is_valid_module_name(name) else None


def parse_uevent(data: bytes) -> Uevent | None:
    """The uevent in one datagram, or None for udev's re-broadcasts and for anything that
    is not a well-formed kernel uevent. Never raises."""
    if not data or data.startswith(UDEV_MAGIC):
        return None
    header, *parts = data.split(b"\0")
    action_b, at, devpath_b = header.partition(b"@")
    if not at:
        return None
    try:
        action = action_b.decode("ascii")
        devpath = devpath_b.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not _ACTION.match(action) or not devpath.startswith("/"):
        return None
    env: dict[str, str] = {}
    for part in parts:
        key_b, eq, value_b = part.partition(b"=")
        if not eq or not key_b:
            continue  # the trailing empty string, or junk between pairs
        try:
            key = key_b.decode("ascii")
        except UnicodeDecodeError:
            return None
        # Values may hold device-supplied strings (input device NAME=…) in any encoding.
        env[key] = value_b.decode("utf-8", "replace")
    # The header and the ACTION/DEVPATH pairs say the same in a kernel event; if they
    # disagree this is not one.
    if env.get("ACTION", action) != action or env.get("DEVPATH", devpath) != devpath:
        return None
    return Uevent(
        action=action,
        devpath=devpath,
        subsystem=env.get("SUBSYSTEM"),
        modalias=env.get("MODALIAS"),
        env=MappingProxyType(env),
    )
