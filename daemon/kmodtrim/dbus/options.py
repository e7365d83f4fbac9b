"""The ``a{sv}`` options of the Manager methods, parsed into the validated Request they
make. Which keys each method takes, their types and choices are kmodtrim.request's
(declared once for the CLI and D-Bus).

Options naming files (``observed``, ``policy``) make the daemon read those files as root;
the dispatcher (service.py) authorises them (api.OPTION_ACTIONS).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dbus_next.signature import Variant

from ..errors import InputError
from ..names import is_valid_kernel_version
from ..request import OPTIONS, options_of
from ..resident.jobs import Request
from . import api

# Derived from kmodtrim.request: the keys each method with an a{sv} argument takes, and
# every key's D-Bus type.
ALLOWED_OPTIONS = {m.name: tuple(o.key for o in m.options) for m in api.MANAGER.methods
                   if any(a.name == "options" for a in m.in_args)}
OPTION_TYPES = {o.key: o.signature for o in OPTIONS if o.members}

_TYPE_NAMES = {"s": "a string (s)", "as": "an array of strings (as)", "b": "a boolean (b)"}


def _absolute(member: str, key: str, value: str) -> Path:
    path = Path(value)
    if not value or not path.is_absolute():
        raise InputError(f"{member}: option {key!r}: {value!r} is not an absolute path")
    return path


def parse_options(member: str, options: Mapping[str, Variant]) -> tuple[Request, bool]:
    """The Request (and the ``latest`` flag) for ``member``'s ``a{sv}`` options.

    Raises InputError (InvalidArgs) naming the key for an unknown key, a wrong type or
    a bad value.
    """
    allowed = {o.key: o for o in options_of(member)}
    values: dict[str, Any] = {}
    for key, variant in options.items():
        option = allowed.get(key)
        if option is None:
            raise InputError(f"{member}: unknown option {key!r} "
                             f"(allowed: {', '.join(allowed)})")
        if variant.signature != option.signature:
            raise InputError(f"{member}: option {key!r} must be "
                             f"{_TYPE_NAMES[option.signature]}, not of type "
                             f"{variant.signature}")
        given = variant.value if option.signature == "as" else [variant.value]
        for value in given:
            if option.choices and value not in option.choices:
                raise InputError(f"{member}: option {key!r}: {value!r} is not one of "
                                 f"{', '.join(option.choices)}")
        values[key] = variant.value
    kernel = values.get("kernel")
    if kernel is not None and not is_valid_kernel_version(kernel):
        raise InputError(f"{member}: option 'kernel': {kernel!r} is not a kernel version")
    request = Request(
        kernel=kernel or None,
        observed=tuple(_absolute(member, "observed", v) for v in values.get("observed", ())),
        policy=_absolute(member, "policy", values["policy"]) if "policy" in values else None,
        force=bool(values.get("force", False)),
        dry_run=bool(values.get("dry_run", False)),
        initramfs=str(values.get("initramfs", "auto")),
        backend=values.get("backend"),
        cloud=tuple(dict.fromkeys(values.get("cloud", ()))),
        on_demand=bool(values.get("on_demand", False)),
    )
    return request, bool(values.get("latest", False))
