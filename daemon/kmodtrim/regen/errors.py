"""The one error of regeneration: an initramfs that could not be generated, read,
verified, swapped in or restored."""

from __future__ import annotations

from ..errors import CommandError


class InitramfsError(CommandError):
    """The initramfs could not be generated, read, verified, swapped in or restored.

    Nothing was swapped in when this is raised by :func:`regenerate_initramfs`; the
    caller rolls the module change back.
    """

    dbus_name = "org.kmodtrim.KmodTrim1.Error.Initramfs"

