"""The context of the policy validation running (is this file a drop-in?), which both
pydantic seams (compat_v1.py, compat_v2.py) give their validators the same way: a context
variable set around one ``validate`` call. No pydantic here."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

_NO_CONTEXT: Mapping[str, object] = MappingProxyType({})
_context: ContextVar[Mapping[str, object]] = ContextVar("policy_validation",
                                                       default=_NO_CONTEXT)


def validation_context() -> Mapping[str, object]:
    """The ``context`` of the ``validate`` call running (empty outside one)."""
    return _context.get()


@contextmanager
def with_context(context: Mapping[str, object]) -> Iterator[None]:
    """Make ``context`` the validation context for the block."""
    token = _context.set(context)
    try:
        yield
    finally:
        _context.reset(token)
