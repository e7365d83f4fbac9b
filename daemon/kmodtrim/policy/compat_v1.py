"""The policy model's pydantic vocabulary on pydantic 1.10 (Debian 12, Ubuntu 24.04): the
same names as compat_v2.py with the same behaviour — strict types built from 1.10's
constrained types, and its errors translated into pydantic 2's words, so the messages
a bad policy gets are the same on every release.

Type-checked against ``pydantic.v1`` (the 1.10 code that pydantic 2 carries); at run time
it is imported only where ``pydantic`` itself is 1.10. Tests may also run it on
``pydantic.v1`` (see _pydantic below)."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

from .vcontext import validation_context, with_context

if TYPE_CHECKING:
    import pydantic.v1 as _pydantic
    from pydantic.v1.errors import FloatError, NumberNotFiniteError

    from .compat_v2 import ErrorDetail
else:
    try:  # pydantic 2, or a late 1.10 that also answers to this name
        import pydantic.v1 as _pydantic
        from pydantic.v1.errors import FloatError, NumberNotFiniteError
    except ImportError:  # pydantic 1.10 before 1.10.17 (Debian 12 has 1.10.4)
        import pydantic as _pydantic
        from pydantic.errors import FloatError, NumberNotFiniteError

Field = _pydantic.Field
ValidationError = _pydantic.ValidationError

__all__ = [
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


class StrictModel(_pydantic.BaseModel):
    """A table of settings: unknown keys refused, frozen, no type coercion (by the field
    types below: 1.10 has no model-wide strict mode)."""

    class Config:
        extra = _pydantic.Extra.forbid
        frozen = True


M = TypeVar("M", bound=StrictModel)
StrictBool = _pydantic.StrictBool
StrictStr = _pydantic.StrictStr


class NonNegativeInt(_pydantic.ConstrainedInt):
    strict = True
    ge = 0


class NonNegativeFloat(_pydantic.ConstrainedFloat):
    """A finite number >= 0; an int is accepted (as pydantic 2's strict float does), a
    bool or a string is not (1.10's float would convert them), and NaN is "not finite"
    (1.10 would call it "not >= 0" first)."""

    ge = 0
    allow_inf_nan = False

    @classmethod
    def __get_validators__(cls) -> Generator[Callable[..., Any], None, None]:
        yield _only_numbers
        yield from super().__get_validators__()


def _only_numbers(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FloatError()
    if not math.isfinite(value):
        raise NumberNotFiniteError()
    return value


def checked_str(check: Callable[[str], str]) -> Any:
    """A strict string type whose value ``check`` returns or refuses with ValueError."""

    class Checked(_pydantic.ConstrainedStr):
        strict = True

        @classmethod
        def __get_validators__(cls) -> Generator[Callable[..., Any], None, None]:
            yield from super().__get_validators__()
            yield check

    return Checked


def validate(model: type[M], data: Mapping[str, Any],
             context: Mapping[str, object] | None = None) -> M:
    """``data`` validated as ``model``; raises ValidationError."""
    with with_context(context or {}):
        return model.parse_obj(data)


def dump(value: StrictModel) -> dict[str, Any]:
    """The model as plain data (nested tables as dicts)."""
    return value.dict()


def field_names(model: type[StrictModel]) -> list[str]:
    """The model's keys in declaration order."""
    return list(model.__fields__)


# pydantic 1.10's error type -> pydantic 2's, for every error the policy model can raise.
_TYPES = {
    "value_error.extra": "extra_forbidden",
    "value_error.const": "literal_error",
    "type_error.integer": "int_type",
    "type_error.float": "float_type",
    "type_error.str": "string_type",
    "type_error.list": "list_type",
    "type_error.dict": "model_type",
    "value_error.strictbool": "bool_type",
    "value_error.number.not_ge": "greater_than_equal",
    "value_error.number.not_finite_number": "finite_number",
    "value_error": "value_error",
}


def _expected(permitted: object) -> str:
    """pydantic 2's wording of a Literal's values: 'a', 'b' or 'c'."""
    values = [repr(v) for v in permitted] if isinstance(permitted, list | tuple) else []
    if len(values) < 2:
        return "".join(values)
    return f"{', '.join(values[:-1])} or {values[-1]}"


def _input_at(data: object, loc: tuple[int | str, ...]) -> object:
    """The value at ``loc`` in ``data`` (1.10's errors do not carry it)."""
    for part in loc:
        if isinstance(data, list) and isinstance(part, int):
            if part >= len(data):
                return None
            data = data[part]
        elif isinstance(data, Mapping) and part in data:
            data = data[part]
        else:
            return None
    return data


def _literal_values(model: object, loc: tuple[int | str, ...]) -> tuple[object, ...] | None:
    """The allowed values when the field at ``loc`` of ``model`` is a Literal, else None."""
    kind: object = model
    for part in loc:
        if isinstance(part, int) and get_origin(kind) is list:
            kind = get_args(kind)[0]
        elif (isinstance(part, str) and isinstance(kind, type)
              and issubclass(kind, _pydantic.BaseModel) and part in kind.__fields__):
            kind = kind.__fields__[part].outer_type_
        else:
            return None
    return get_args(kind) if get_origin(kind) is Literal else None


def error_list(error: ValidationError, data: Mapping[str, Any]) -> list[ErrorDetail]:
    """``error``'s errors in pydantic 2's words (``data`` is what was validated)."""
    out: list[ErrorDetail] = []
    for e in error.errors():
        loc = tuple(e["loc"])
        kind = _TYPES.get(e["type"], e["type"])
        given: dict[str, object] = dict(e.get("ctx") or {})
        ctx: dict[str, object] = {}
        permitted = _literal_values(error.model, loc) if kind != "extra_forbidden" else None
        if permitted is not None:
            # Any error on a Literal field: 1.10.4 (Debian 12) reports a list given for
            # one as "unhashable type" where later 1.10s say "unexpected value".
            kind = "literal_error"
            ctx["expected"] = _expected(permitted)
        elif kind == "greater_than_equal":
            ctx["ge"] = given.get("limit_value")
        elif kind == "value_error":
            ctx["error"] = e["msg"]
        out.append({"type": kind, "loc": loc, "msg": e["msg"],
                    "input": _input_at(data, loc), "ctx": ctx})
    return out
