"""One hierarchy of errors; each carries its D-Bus error name and CLI exit code."""

from __future__ import annotations

DBUS_PREFIX = "org.kmodtrim.KmodTrim1.Error."


class KmodtrimError(Exception):
    """Base of every error kmodtrim reports to a user.

    ``dbus_name`` is the error name the D-Bus layer sends; ``exit_code`` is what the CLI
    exits with (1: the operation failed, 2: bad usage or input).  ``hint`` says what to do.
    """

    dbus_name = DBUS_PREFIX + "Failed"
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InputError(KmodtrimError):
    """The user gave us something we cannot use (bad file, name, argument)."""

    dbus_name = "org.freedesktop.DBus.Error.InvalidArgs"
    exit_code = 2


class ModuleParseError(InputError):
    """A module file is not a readable kernel module (malformed, truncated, not ELF)."""

    dbus_name = DBUS_PREFIX + "ModuleParse"

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: not a readable kernel module: {reason}")
        self.path = path
        self.reason = reason


class KernelNotFoundError(InputError):
    """No module tree for the requested kernel under the root."""

    dbus_name = DBUS_PREFIX + "NoSuchKernel"


class PolicyError(InputError):
    """The policy is invalid; the message names the file, the key and what is allowed."""

    dbus_name = DBUS_PREFIX + "PolicyInvalid"


class ObservationError(InputError):
    """An observation source (e.g. an --observed file) could not be read."""

    dbus_name = DBUS_PREFIX + "ObservationInvalid"


class UnknownModuleError(InputError):
    """A module name that the kernel tree does not know."""

    dbus_name = DBUS_PREFIX + "NoSuchModule"


class CommandError(KmodtrimError):
    """An external command failed; the message carries its output tail."""

    dbus_name = DBUS_PREFIX + "CommandFailed"


class BusyError(KmodtrimError):
    """Another operation holds the lock; the message names it."""

    dbus_name = DBUS_PREFIX + "Busy"


class NoSuchGenerationError(InputError):
    dbus_name = DBUS_PREFIX + "NoSuchGeneration"


class Canceled(KmodtrimError):
    """A job was canceled; nothing changed (the engine undid any partial work)."""

    dbus_name = DBUS_PREFIX + "Canceled"


class PolicyViolation(KmodtrimError):
    """The operation would break a safety rule (loaded, boot-critical, policy-kept, or the
    minimum observation is not met)."""

    dbus_name = DBUS_PREFIX + "PolicyViolation"


class StoreError(KmodtrimError):
    """kmodtrim's own state under /var/lib/kmodtrim is unreadable or inconsistent."""

    dbus_name = DBUS_PREFIX + "Store"


class UntrustedStateError(StoreError):
    """State someone other than root could have written (owner, mode, symbolic link)."""


class StashError(KmodtrimError):
    """A file could not be stashed or restored (hash mismatch, disk full, …)."""

    dbus_name = DBUS_PREFIX + "Stash"


class DamagedCopyError(StashError):
    """One file's stash copy is missing or damaged (the others are unaffected)."""


class ArchiveError(StashError):
    """A file cannot come back from the package archive (unreachable, version gone, its
    digest differs from the package database's record); nothing was written."""


class PermissionDeniedError(KmodtrimError):
    """The caller may not do this (not root, and no polkit grant)."""

    dbus_name = "org.freedesktop.DBus.Error.AccessDenied"
    exit_code = 1
