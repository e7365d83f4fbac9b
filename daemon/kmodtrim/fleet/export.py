"""The observation export (``kmodtrim observe --export``): one host's identity and, per
module, when it was first and last seen, on how many boots and how — a pure function of
the host's facts and its recorded observations."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from ..documents import EXPORT_KIND, FLEET_SCHEMA
from .host import HostFacts

RECORDED = "recorded"  # seen on a boot recorded before the "how" was kept
RESTORED = "restored"  # restored by hand or on demand (kept until forgotten)
_FAMILY = re.compile(r"^(\d+)\.(\d+)")


def kernel_family(kernel: str | None) -> str | None:
    """MAJOR.MINOR of a kernel release ("6.1" for 6.1.0-28-cloud-amd64): module names
    hold within it, so merges take one family at a time. None when it has none."""
    match = _FAMILY.match(kernel or "")
    return f"{match[1]}.{match[2]}" if match else None


def iso_time(epoch: float) -> str:
    """``epoch`` as ISO 8601 UTC to the second (sorts as text)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def module_sightings(boots: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per module, from the boot records (store.read_observations): first and last seen
    (epochs), boots seen and how. A boot recorded before the per-module ``seen`` was kept
    gives its own first and last time and ``recorded``."""
    found: dict[str, dict[str, Any]] = {}
    for boot in boots.values():
        seen = boot.get("seen", {})
        for name in boot.get("modules", ()):
            sighting = seen.get(name) or {"first": boot.get("first_seen", 0),
                                          "last": boot.get("last_seen", 0),
                                          "how": [RECORDED]}
            entry = found.setdefault(name, {"first": sighting["first"],
                                            "last": sighting["last"], "boots": 0,
                                            "how": set()})
            entry["first"] = min(entry["first"], sighting["first"])
            entry["last"] = max(entry["last"], sighting["last"])
            entry["boots"] += 1
            entry["how"].update(sighting["how"] or [RECORDED])
    return found


def export_document(facts: HostFacts, boots: Mapping[str, Mapping[str, Any]],
                    restored: Mapping[str, str], now: float) -> dict[str, Any]:
    """The export document (documents.FLEET_DOCUMENTS[EXPORT_KIND]) of a host with
    ``facts``, recorded ``boots`` and ``restored`` modules (name → how and when)."""
    sightings = module_sightings(boots)
    modules = []
    for name in sorted(set(sightings) | set(restored)):
        entry = sightings.get(name)
        how = set(entry["how"]) if entry else set()
        if name in restored:
            how.add(RESTORED)
        modules.append({
            "name": name,
            "first_seen": iso_time(entry["first"]) if entry else None,
            "last_seen": iso_time(entry["last"]) if entry else None,
            "boots": entry["boots"] if entry else 0,
            "how": sorted(how),
        })
    return {
        "schema": FLEET_SCHEMA,
        "kind": EXPORT_KIND,
        "host": {"machine_id_sha256": facts.machine_id_sha256, "salted": facts.salted},
        "image": dict(facts.image),
        "platform": dict(facts.platform),
        "kernels": list(facts.kernels),
        "kernel": facts.kernel,
        "kernel_family": kernel_family(facts.kernel),
        "boots": len(boots),
        "modules": modules,
        "exported": iso_time(now),
    }
