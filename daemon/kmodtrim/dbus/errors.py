"""Translate kmodtrim errors to D-Bus errors, and back, in one place."""

from __future__ import annotations

from dbus_next.errors import DBusError

from ..errors import DBUS_PREFIX, BusyError, Canceled, InputError, KmodtrimError

ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
LIMITS_EXCEEDED = "org.freedesktop.DBus.Error.LimitsExceeded"
FAILED = DBUS_PREFIX + "Failed"


class AccessDeniedError(KmodtrimError):
    """The caller may not do this (not uid 0 and polkit did not authorise it)."""

    dbus_name = ACCESS_DENIED
    exit_code = 1


class LimitsExceededError(KmodtrimError):
    """Too many read calls in flight from one unprivileged caller (or from all of them):
    refused at once, nothing done; the same call may be made again once earlier ones are
    answered."""

    dbus_name = LIMITS_EXCEEDED
    exit_code = 1


def to_dbus_error(exc: BaseException) -> DBusError:
    """The D-Bus error a client sees for ``exc``: a KmodtrimError's own ``dbus_name`` with
    its message (and hint), a DBusError as is, anything else as ``…Error.Failed``."""
    if isinstance(exc, DBusError):
        return exc
    if isinstance(exc, KmodtrimError):
        text = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
        return DBusError(exc.dbus_name, text)  # type: ignore[no-untyped-call]
    text = f"internal error: {type(exc).__name__}: {exc}"
    return DBusError(FAILED, text)  # type: ignore[no-untyped-call]


def from_dbus_error(name: str, text: str) -> KmodtrimError:
    """The KmodtrimError a client raises for a D-Bus error reply (for the CLI's exit code:
    InvalidArgs and the input errors are exit 2, everything else 1)."""
    if name == BusyError.dbus_name:
        return BusyError(text)
    if name == ACCESS_DENIED:
        return AccessDeniedError(text)
    if name == Canceled.dbus_name:
        return Canceled(text)
    for cls in _subclasses(InputError):
        if cls.dbus_name == name:
            return _plain(cls, text)
    if name == INVALID_ARGS:
        return InputError(text)
    for cls in _subclasses(KmodtrimError):
        if cls.dbus_name == name:
            return _plain(cls, text)
    return KmodtrimError(f"{name}: {text}")


def _subclasses(cls: type[KmodtrimError]) -> list[type[KmodtrimError]]:
    found: list[type[KmodtrimError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def _plain(cls: type[KmodtrimError], text: str) -> KmodtrimError:
    # Some subclasses take other constructor arguments (ModuleParseError(path, reason)):
    # build the instance without them and set the message.
    err = cls.__new__(cls)
    KmodtrimError.__init__(err, text)
    return err
