"""Devices: every device in ROOT/sys/devices with its modalias."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ObservationError
from ..inputs import MAX_OBSERVATION_BYTES, read_optional_input
from .inroot import _host, _printable


@dataclass(frozen=True)
class DeviceModalias:
    """A device present in sysfs and its modalias, e.g. ``/devices/pci0000:00/0000:00:03.0``
    and ``pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00``."""

    devpath: str
    modalias: str


def read_modaliases(root: Path) -> list[DeviceModalias]:
    """Every device under ROOT/sys/devices with a ``modalias`` file, sorted by devpath.

    Symlinks are not followed (sysfs links form cycles); unreadable or empty modalias files
    are skipped (a device may vanish while we walk). [] if there is no sysfs. Raises
    ObservationError for a modalias that is not a regular file or is oversized.
    """
    base = _host(root, "/sys/devices")
    found: set[DeviceModalias] = set()
    for dirpath, _dirnames, filenames in os.walk(base, followlinks=False):
        if "modalias" not in filenames:
            continue
        inroot = "/sys/devices/" + os.path.relpath(dirpath, base) + "/modalias"
        raw = read_optional_input(Path(dirpath, "modalias"), limit=MAX_OBSERVATION_BYTES,
                                  what="device modalias", error=ObservationError,
                                  shown=_printable(inroot), skip_unreadable=True)
        try:
            value = (raw or b"").decode("utf-8").strip()
        except UnicodeDecodeError:
            continue
        if value:
            rel = os.path.relpath(dirpath, base)
            found.add(DeviceModalias("/devices/" + rel.replace(os.sep, "/"), value))
    return sorted(found, key=lambda d: (d.devpath, d.modalias))
