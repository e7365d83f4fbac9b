"""The ``a{sv}`` options of the Manager methods: which keys each method takes, their types,
and the validated Request they make.

Options naming files (``observed``, ``policy``) make the daemon read those files as root;
the dispatcher (service.py) authorises them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dbus_next.signature import Variant

from ..daemon import BACKENDS, INITRAMFS_METHODS, Request
from ..errors import InputError
from ..names import is_valid_kernel_version

OPTION_TYPES = {
    "kernel": "s", "observed": "as", "policy": "s", "force": "b", "dry_run": "b",
    "initramfs": "s", "backend": "s", "latest": "b",
}
_TYPE_NAMES = {"s": "a string (s)", "as": "an array of strings (as)", "b": "a boolean (b)"}
ALLOWED_OPTIONS = {
    "Plan": ("kernel", "observed", "policy"),
    "Explain": ("kernel", "observed", "policy"),
    "Trim": ("kernel", "observed", "policy", "force", "dry_run", "initramfs", "backend"),
    "Rollback": ("latest", "dry_run", "initramfs", "backend"),
    "Restore": ("kernel", "dry_run", "initramfs", "backend"),
    "KernelEvent": ("initramfs", "backend"),
}


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
    allowed = ALLOWED_OPTIONS[member]
    values: dict[str, Any] = {}
    for key, variant in options.items():
        if key not in allowed:
            raise InputError(f"{member}: unknown option {key!r} "
                             f"(allowed: {', '.join(allowed)})")
        want = OPTION_TYPES[key]
        if variant.signature != want:
            raise InputError(f"{member}: option {key!r} must be {_TYPE_NAMES[want]}, "
                             f"not of type {variant.signature}")
        values[key] = variant.value
    kernel = values.get("kernel")
    if kernel is not None and not is_valid_kernel_version(kernel):
        raise InputError(f"{member}: option 'kernel': {kernel!r} is not a kernel version")
    for key, choices in (("initramfs", INITRAMFS_METHODS), ("backend", BACKENDS)):
        if key in values and values[key] not in choices:
            raise InputError(f"{member}: option {key!r}: {values[key]!r} is not one of "
                             f"{', '.join(choices)}")
    request = Request(
        kernel=kernel or None,
        observed=tuple(_absolute(member, "observed", v) for v in values.get("observed", ())),
        policy=_absolute(member, "policy", values["policy"]) if "policy" in values else None,
        force=bool(values.get("force", False)),
        dry_run=bool(values.get("dry_run", False)),
        initramfs=values.get("initramfs", "auto"),
        backend=values.get("backend"),
    )
    return request, bool(values.get("latest", False))
