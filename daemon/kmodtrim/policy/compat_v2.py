"""The policy model's pydantic vocabulary on pydantic 2 (Debian 13, Fedora): strict
models, the field types kmodtrim declares its settings with, and validation, dumping and
error lists in one shape. compat.py picks this module or compat_v1.py; both export the
same names with the same behaviour."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypedDict, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .vcontext import validation_context, with_context

__all__ = [
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


class ErrorDetail(TypedDict):
    """One validation error, in pydantic 2's words (compat_v1 translates to them)."""

    type: str  # e.g. "extra_forbidden", "literal_error", "int_type", "value_error"
    loc: tuple[int | str, ...]
    msg: str
    input: object
    ctx: dict[str, object]


class StrictModel(BaseModel):
    """A table of settings: unknown keys refused, frozen, no type coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


M = TypeVar("M", bound=StrictModel)

# Types for fields (the model is strict: an int is not a bool, a string not a number).
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]  # an int is accepted
StrictBool = bool
StrictStr = str


def checked_str(check: Callable[[str], str]) -> Any:
    """A string type whose value ``check`` returns or refuses with ValueError (use in an
    annotation via a TYPE_CHECKING alias to str)."""
    return Annotated[str, AfterValidator(check)]


def validate(model: type[M], data: Mapping[str, Any],
             context: Mapping[str, object] | None = None) -> M:
    """``data`` validated as ``model``; raises ValidationError."""
    with with_context(context or {}):
        return model.model_validate(data)


def dump(value: StrictModel) -> dict[str, Any]:
    """The model as plain data (nested tables as dicts)."""
    return value.model_dump()


def field_names(model: type[StrictModel]) -> list[str]:
    """The model's keys in declaration order."""
    return list(model.model_fields)


def error_list(error: ValidationError, data: Mapping[str, Any]) -> list[ErrorDetail]:
    """``error``'s errors (``data`` is what was validated; pydantic 2 carries the input)."""
    return [
        ErrorDetail(type=e["type"], loc=tuple(e["loc"]), msg=e["msg"], input=e.get("input"),
                    ctx={k: (str(v) if isinstance(v, Exception) else v)
                         for k, v in (e.get("ctx") or {}).items()})
        for e in error.errors()
    ]
