"""The one place the policy meets pydantic, so that the same policy files are accepted and
the same one-line errors given under pydantic 2 (Debian 13, Fedora) and pydantic 1.10
(Debian 12, Ubuntu 24.04: most Debian-family cloud VMs today).

The model (model.py) is written once against this module's names: ``StrictModel``, the
field types ``NonNegativeInt``, ``NonNegativeFloat``, ``StrictBool``, ``StrictStr``,
``checked_str(check)`` and ``Field``; load.py and messages.py use ``validate``, ``dump``,
``field_names`` and ``error_list`` (errors always in pydantic 2's words). compat_v2.py
implements them on pydantic 2's own API, compat_v1.py on 1.10's; the installed
``pydantic`` decides which one is imported, once.

Why not write the model once against the 1.x API and import ``pydantic.v1`` where
pydantic 2 provides it? It would be one code path, but a deprecated one: ``pydantic.v1``
is pure Python on pydantic 2 (no compiled core), is not supported on Python 3.14
(Fedora 43 and the next Debian), and goes away with pydantic 3. Each release instead runs
its own pydantic's native API; the price is the small translation in compat_v1.py
(1.10's error types to 2's), which the tests pin by running the malformed-policy cases
under a real pydantic 1.10 and comparing the messages with pydantic 2's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import VERSION

PYDANTIC_MAJOR = int(VERSION.split(".", 1)[0])

if TYPE_CHECKING or PYDANTIC_MAJOR >= 2:
    from .compat_v2 import (
        ErrorDetail,
        Field,
        NonNegativeFloat,
        NonNegativeInt,
        StrictBool,
        StrictModel,
        StrictStr,
        ValidationError,
        checked_str,
        dump,
        error_list,
        field_names,
        validate,
        validation_context,
    )
else:
    from .compat_v1 import (
        Field,
        NonNegativeFloat,
        NonNegativeInt,
        StrictBool,
        StrictModel,
        StrictStr,
        ValidationError,
        checked_str,
        dump,
        error_list,
        field_names,
        validate,
        validation_context,
    )

__all__ = [
    "PYDANTIC_MAJOR",
    "ErrorDetail",
    "Field",
    "NonNegativeFloat",
    "NonNegativeInt",
    "StrictBool",
    "StrictModel",
    "StrictStr",
    "ValidationError",
    "checked_str",
    "dump",
    "error_list",
    "field_names",
    "validate",
    "validation_context",
]
