"""kmodtrim's JSON documents as typed D-Bus values, and back.

An object is ``a{sv}``; a string ``s``, a boolean ``b``, an integer ``x`` (``t`` beyond
int64), a float ``d``; a list of strings ``as`` (also an empty list), of booleans ``ab``, of
integers ``ax``, of floats ``ad``, of objects ``aa{sv}``, anything else ``av``.

D-Bus has no null: a key whose value is null is left out, as D-Bus APIs do. So that the
client gives back exactly the document the daemon had, each document declares where a
null may stand (a *shape*): ``NULL`` for a key that may be null, a nested shape for an
object (or each object of a list), ``"*"`` for every key of an object, and ``JSON`` for
free-form data sent as JSON text (a package's metadata, whose keys depend on the package
manager). A null the shape does not declare is left out and logged: a test keeps the
shapes complete.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Final

from dbus_next.signature import Variant

log = logging.getLogger("kmodtrim.dbus.typed")

NULL: Final = "null"  # in a shape: this key may be null (left out on D-Bus)
JSON: Final = "json"  # in a shape: this value travels as JSON text
Shape = Mapping[str, Any]  # key -> NULL, JSON or a nested Shape

_INT64 = 1 << 63
_NULLABLE_FILE: Shape = {"module": NULL, "kernel": NULL, "package": NULL, "link": NULL}
_REGEN: Shape = {"*": {"initramfs": {"image": NULL, "previous": NULL, "skipped": NULL}}}

# ShowGeneration: a generation manifest (records.Generation.to_json()).
GENERATION: Shape = {
    "rollback_to": NULL, "removed": _NULLABLE_FILE, "regen": _REGEN,
    "packages": {"files": _NULLABLE_FILE, "control": _NULLABLE_FILE, "metadata": JSON},
}
# Job.Outcome: what a job did (the use cases' outcome document, as `kmodtrim apply --json`
# prints it, plus the kernel event a kernel-install job handled).
OUTCOME: Shape = {"generation": NULL, "description": NULL, "removed_files": NULL,
                  "removed_bytes": NULL, "regen": _REGEN, "kernel_event": {"backend": NULL}}
# ListGenerations: generation summaries (no nulls).
SUMMARY: Shape = {}


def to_dbus(doc: Mapping[str, Any], shape: Shape, where: str = "") -> dict[str, Variant]:
    """``doc`` (a JSON object) as ``a{sv}``. Raises ValueError for a value JSON cannot
    hold (or an integer beyond uint64)."""
    out: dict[str, Variant] = {}
    for key, value in doc.items():
        sub = shape.get(key, shape.get("*"))
        if value is None:
            if sub != NULL:
                log.warning("%s%s: null left out of a D-Bus document", where, key)
            continue
        if sub == JSON:
            out[key] = Variant("s", json.dumps(value))
        else:
            out[key] = _variant(value, sub if isinstance(sub, Mapping) else {},
                                f"{where}{key}.")
    return out


def _variant(value: Any, shape: Shape, where: str) -> Variant:
    if isinstance(value, Mapping):
        return Variant("a{sv}", to_dbus(value, shape, where))
    if isinstance(value, list | tuple):
        signature, items = _array(list(value), shape, where)
        return Variant(signature, items)
    signature = _scalar_signature(value, where)
    return Variant(signature, value)


def _scalar_signature(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "b"
    if isinstance(value, int):
        if -_INT64 <= value < _INT64:
            return "x"
        if 0 <= value < 2 * _INT64:
            return "t"
        raise ValueError(f"{where.rstrip('.')}: {value} does not fit in 64 bits")
    if isinstance(value, float):
        return "d"
    if isinstance(value, str):
        return "s"
    raise ValueError(f"{where.rstrip('.')}: {type(value).__name__} is not a JSON value")


def _array(items: list[Any], shape: Shape, where: str) -> tuple[str, list[Any]]:
    if all(isinstance(i, Mapping) for i in items) and items:
        return "aa{sv}", [to_dbus(i, shape, where) for i in items]
    if any(isinstance(i, Mapping | list | tuple) or i is None for i in items):
        return "av", [_variant(i, shape, where) for i in items]
    kinds = {_scalar_signature(i, where) for i in items}
    if len(kinds) <= 1:
        return "a" + (kinds.pop() if kinds else "s"), items
    return "av", [_variant(i, shape, where) for i in items]


def from_dbus(value: Any, shape: Shape = SUMMARY) -> Any:
    """The JSON value of a D-Bus value (Variants unwrapped), with the nulls ``shape``
    declares put back where they were left out."""
    if isinstance(value, Variant):
        return from_dbus(value.value, shape)
    if isinstance(value, dict):
        doc: dict[str, Any] = {}
        for key, item in value.items():
            sub = shape.get(key, shape.get("*"))
            if sub == JSON:
                doc[key] = json.loads(from_dbus(item))
            else:
                doc[key] = from_dbus(item, sub if isinstance(sub, Mapping) else {})
        for key, sub in shape.items():
            if sub == NULL and key != "*":
                doc.setdefault(key, None)
        return doc
    if isinstance(value, list):
        return [from_dbus(item, shape) for item in value]
    return value
