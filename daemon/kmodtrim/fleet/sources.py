"""What a fleet merge takes in, as plain values (HostObservation), and the observation
export parsed into one. Pure: documents in, values out; each error names the input.
osquery.py parses osquery's result logs into the same values."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from ..documents import EXPORT_KIND, FLEET_SCHEMA, MERGE_KIND
from ..errors import InputError
from ..inputs import quote_input
from ..names import is_valid_module_name, normalize

_ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@dataclass(frozen=True)
class Sighting:
    """One module on one host: first and last seen (ISO 8601 UTC, or None), boots, how."""

    first: str | None
    last: str | None
    boots: int
    how: frozenset[str]


@dataclass(frozen=True)
class HostObservation:
    """What one host saw, from one input."""

    host: str  # a hashed identity: hosts with the same one are one host
    kind: str  # "export" or "osquery"
    image: str  # "IMAGE_ID IMAGE_VERSION", else "ID VERSION_ID", else "unknown"
    kernel_family: str | None
    modules: dict[str, Sighting]
    origin: str  # the input, for messages


class FleetInputError(InputError):
    """A merge input that is not a document this kmodtrim merges."""


def image_label(image: dict[str, Any]) -> str:
    """How a merge names an image: IMAGE_ID and IMAGE_VERSION when the image sets them
    (os-release(5)), else the distribution's ID and VERSION_ID."""
    def text(key: str) -> str:
        value = image.get(key)
        return value if isinstance(value, str) else ""

    for name, version in (("image_id", "image_version"), ("id", "version_id")):
        if text(name):
            return f"{text(name)} {text(version)}".strip()
    return "unknown"


def _time(value: Any, origin: str, what: str) -> str | None:
    if value is None or (isinstance(value, str) and _ISO.match(value)):
        return value
    raise FleetInputError(f"{origin}: {what}: {quote_input(str(value))} is not an ISO "
                          "8601 UTC time (YYYY-MM-DDTHH:MM:SSZ)")


def module_name(value: Any, origin: str) -> str:
    """``value`` as a normalised module name; raises FleetInputError naming ``origin``."""
    if not isinstance(value, str) or not is_valid_module_name(value):
        raise FleetInputError(f"{origin}: {quote_input(str(value))} is not a module name")
    return normalize(value)


def host_of_export(doc: dict[str, Any], origin: str) -> HostObservation:
    """The HostObservation of an export document. Raises FleetInputError for another
    kind or schema, or a malformed entry."""
    kind = doc.get("kind")
    if kind != EXPORT_KIND:
        also = " (merge the exports it was made from)" if kind == MERGE_KIND else ""
        raise FleetInputError(f"{origin}: a document of kind {quote_input(str(kind))}, "
                              f"not an observation export{also}")
    if doc.get("schema") != FLEET_SCHEMA:
        raise FleetInputError(f"{origin}: an observation export of schema "
                              f"{doc.get('schema')!r}; this kmodtrim merges schema "
                              f"{FLEET_SCHEMA}", hint="export it again with this kmodtrim")
    entries = doc.get("modules")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise FleetInputError(f"{origin}: 'modules' is not a list of module entries")
    modules: dict[str, Sighting] = {}
    for entry in entries:
        name = module_name(entry.get("name"), origin)
        boots, how = entry.get("boots", 0), entry.get("how", [])
        if not isinstance(boots, int) or isinstance(boots, bool) or not isinstance(how, list) \
                or not all(isinstance(h, str) for h in how):
            raise FleetInputError(f"{origin}: module {name}: 'boots' or 'how' malformed")
        modules[name] = Sighting(_time(entry.get("first_seen"), origin, name),
                                 _time(entry.get("last_seen"), origin, name),
                                 boots, frozenset(how))
    host = doc.get("host")
    hashed = host.get("machine_id_sha256") if isinstance(host, dict) else None
    if not isinstance(hashed, str) or not hashed:
        # No machine id (an image root): the document itself identifies the host.
        canonical = json.dumps([image_label(doc.get("image") or {}), sorted(modules)])
        hashed = "anonymous-" + hashlib.sha256(canonical.encode()).hexdigest()
    family = doc.get("kernel_family")
    image = doc.get("image")
    return HostObservation(
        host=hashed, kind="export",
        image=image_label(image if isinstance(image, dict) else {}),
        kernel_family=family if isinstance(family, str) else None,
        modules=modules, origin=origin)
