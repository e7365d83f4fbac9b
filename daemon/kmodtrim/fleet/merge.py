"""The fleet merge (``kmodtrim fleet merge``): what many hosts observed, reduced to one
keep document — per module how many hosts and which images saw it, and the modules
enough hosts saw. Pure and deterministic: the same inputs in any order give the same
document."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..documents import FLEET_SCHEMA, MERGE_KIND
from ..errors import InputError
from .sources import HostObservation, Sighting


@dataclass(frozen=True)
class Threshold:
    """How many hosts must have seen a module for the image to keep it: at least
    ``min_hosts``, or at least ``min_share`` of the hosts merged (one of the two)."""

    min_hosts: int | None = None
    min_share: Fraction | None = None

    def needed(self, hosts: int) -> int:
        """The hosts a module needs, out of ``hosts`` merged (at least 1)."""
        if self.min_share is not None:
            return max(1, math.ceil(self.min_share * hosts))
        return max(1, self.min_hosts or 1)


def parse_min_hosts(text: str) -> int:
    """``--min-hosts``: a whole number ≥ 1. Raises InputError."""
    if not text.strip().isdigit() or int(text) < 1:
        raise InputError(f"--min-hosts {text[:40]!r}: give a whole number of hosts, 1 or more")
    return int(text)


def parse_min_share(text: str) -> Fraction:
    """``--min-share``: a share of the hosts, 0 < P ≤ 1 (``0.5``) or a percentage
    (``50%``). Raises InputError."""
    value = text.strip()
    try:
        share = Fraction(value[:-1]) / 100 if value.endswith("%") else Fraction(value)
    except (ValueError, ZeroDivisionError):
        share = Fraction(-1)
    if not 0 < share <= 1:
        raise InputError(f"--min-share {text[:40]!r}: give a share of the hosts above 0 "
                         "and at most 1 (0.5) or a percentage (50%)")
    return share


def _same_host(observations: Sequence[HostObservation]) -> dict[str, list[HostObservation]]:
    hosts: dict[str, list[HostObservation]] = {}
    for observation in observations:
        hosts.setdefault(observation.host, []).append(observation)
    return dict(sorted(hosts.items()))


def _check_family(observations: Sequence[HostObservation]) -> str | None:
    """The one kernel family of the inputs (inputs that do not say fit any). Raises
    InputError naming an input of another family."""
    first: HostObservation | None = None
    for observation in sorted(observations, key=lambda o: (o.origin, o.host)):
        if observation.kernel_family is None:
            continue
        if first is None:
            first = observation
        elif observation.kernel_family != first.kernel_family:
            raise InputError(
                f"{observation.origin}: kernel family {observation.kernel_family}, but "
                f"{first.origin} is of {first.kernel_family}: module names differ between "
                "kernel families", hint="merge the hosts of one kernel family at a time")
    return first.kernel_family if first else None


def _combine(a: Sighting, b: Sighting) -> Sighting:
    firsts = [t for t in (a.first, b.first) if t is not None]
    lasts = [t for t in (a.last, b.last) if t is not None]
    return Sighting(min(firsts, default=None), max(lasts, default=None),
                    max(a.boots, b.boots), a.how | b.how)


def merge_observations(observations: Sequence[HostObservation],
                       threshold: Threshold) -> dict[str, Any]:
    """The merge document (documents.FLEET_DOCUMENTS[MERGE_KIND]) of ``observations``.

    A host given twice (two exports of one machine) counts once: its modules are joined
    (earliest first, latest last, the larger boot count). Raises InputError for no input
    or inputs of different kernel families.
    """
    if not observations:
        raise InputError("nothing to merge: give observation exports or osquery result logs")
    family = _check_family(observations)
    per_host: dict[str, dict[str, Sighting]] = {}
    images_of: dict[str, set[str]] = {}
    kinds: dict[str, set[str]] = {}
    for host, inputs in _same_host(observations).items():
        modules: dict[str, Sighting] = {}
        for observation in inputs:
            for name, sighting in observation.modules.items():
                modules[name] = _combine(modules[name], sighting) if name in modules \
                    else sighting
        per_host[host] = modules
        images_of[host] = {o.image for o in inputs}
        kinds[host] = {o.kind for o in inputs}
    needed = threshold.needed(len(per_host))
    names = sorted({name for modules in per_host.values() for name in modules})
    entries, keep = [], []
    for name in names:
        seen_on = [host for host, modules in per_host.items() if name in modules]
        sightings = [per_host[host][name] for host in seen_on]
        kept = len(seen_on) >= needed
        if kept:
            keep.append(name)
        entries.append({
            "name": name,
            "hosts": len(seen_on),
            "images": sorted({image for host in seen_on for image in images_of[host]}),
            "boots": sum(s.boots for s in sightings),
            "how": sorted(set().union(*(s.how for s in sightings))),
            "first_seen": min((s.first for s in sightings if s.first), default=None),
            "last_seen": max((s.last for s in sightings if s.last), default=None),
            "kept": kept,
        })
    image_hosts: dict[str, int] = {}
    for images in images_of.values():
        for image in images:
            image_hosts[image] = image_hosts.get(image, 0) + 1
    return {
        "schema": FLEET_SCHEMA,
        "kind": MERGE_KIND,
        "kernel_family": family,
        "hosts": len(per_host),
        "threshold": {
            "min_hosts": threshold.min_hosts,
            "min_share": float(threshold.min_share) if threshold.min_share is not None
            else None,
            "needed_hosts": needed,
        },
        "images": [{"image": image, "hosts": count}
                   for image, count in sorted(image_hosts.items())],
        "inputs": [{"host": host, "kind": "+".join(sorted(kinds[host]))} for host in per_host],
        "keep": keep,
        "modules": entries,
    }
