"""osquery ``kernel_modules`` result logs parsed into HostObservation values, so a fleet
that runs osquery needs no other agent.

osqueryd's filesystem logger writes one JSON object a line for each scheduled query's
results: differential lines (``"action": "added"`` or ``"removed"`` with ``"columns"``),
batched differential lines (``"diffResults": {"added": […], "removed": […]}``) and
snapshot lines (``"action": "snapshot"`` with ``"snapshot": […]``); each names the
``hostIdentifier`` and ``unixTime``. A row of ``kernel_modules`` has the columns name,
size, used_by, status and address. Rows of other queries in the same log are skipped.
A module in a "removed" row was loaded before it went, so it counts as seen too.
Optional decorations ``kernel_version``, ``image_id`` and ``image_version`` (from
``kernel_info`` and ``os_version``, if the fleet configures them) fill in the host's
kernel family and image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

from .export import iso_time, kernel_family
from .sources import FleetInputError, HostObservation, Sighting, module_name

HOW = "osquery"
KERNEL_MODULES_COLUMNS = frozenset({"name", "size", "used_by", "status", "address"})


def _rows(line: dict[str, Any]) -> Iterator[Any]:
    if isinstance(line.get("columns"), dict):
        yield line["columns"]
    for key in ("snapshot",):
        yield from line.get(key) or ()
    diff = line.get("diffResults")
    if isinstance(diff, dict):
        for key in ("added", "removed"):
            yield from diff.get(key) or ()


def _is_kernel_module_row(row: Any) -> bool:
    return isinstance(row, dict) and set(row) >= KERNEL_MODULES_COLUMNS


def parse_osquery_log(text: str, origin: str) -> list[HostObservation]:
    """The hosts whose ``kernel_modules`` rows the result log ``text`` holds, by host.

    Raises FleetInputError naming ``origin:LINE`` for a line that is not a JSON object of
    osquery's result log, a row's name that is not a module name, or a log without any
    ``kernel_modules`` row.
    """
    hosts: dict[str, dict[str, Any]] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{origin}:{lineno}"
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise FleetInputError(f"{where}: not a JSON line of an osquery result log "
                                  f"({exc.msg})", hint="give an observation export or "
                                  "osquery's results log (JSON lines)") from None
        if not isinstance(line, dict) or not isinstance(line.get("hostIdentifier"), str):
            raise FleetInputError(f"{where}: not an osquery result line (no hostIdentifier)")
        rows = [row for row in _rows(line) if _is_kernel_module_row(row)]
        if not rows:
            continue  # another query's results
        when = line.get("unixTime")
        seen = iso_time(float(when)) if isinstance(when, int | float | str) \
            and str(when).replace(".", "", 1).isdigit() else None
        decorations = line.get("decorations")
        decorations = decorations if isinstance(decorations, dict) else {}
        host = hosts.setdefault(line["hostIdentifier"], {"modules": {}, "decorations": {}})
        host["decorations"].update({k: v for k, v in decorations.items()
                                    if isinstance(v, str)})
        for row in rows:
            name = module_name(row.get("name"), where)
            first, last = host["modules"].get(name, (seen, seen))
            times = [t for t in (first, last, seen) if t is not None]
            host["modules"][name] = (min(times, default=None), max(times, default=None))
    if not hosts:
        raise FleetInputError(f"{origin}: no kernel_modules rows: neither an observation "
                              "export nor an osquery result log of a kernel_modules query")
    found = []
    for identifier, host in sorted(hosts.items()):
        decorations = host["decorations"]
        image = " ".join(v for v in (decorations.get("image_id"),
                                     decorations.get("image_version")) if v) or "unknown"
        found.append(HostObservation(
            host="osquery-" + hashlib.sha256(identifier.encode()).hexdigest(),
            kind="osquery", image=image,
            kernel_family=kernel_family(decorations.get("kernel_version")),
            modules={name: Sighting(first, last, 0, frozenset({HOW}))
                     for name, (first, last) in sorted(host["modules"].items())},
            origin=origin))
    return found
