"""Keeps a dbus-next connection alive when its socket is momentarily full.

dbus-next 0.2.3 (the latest release) writes queued messages in a loop and takes the
``EAGAIN`` of a full socket for a lost connection: it disconnects, and kmodtrimd would exit.
A flood of calls that are answered quickly (cheap reads, refusals) fills the socket to the
bus faster than the bus reads it, so any local user could stop the daemon that way
(python-dbus-next issue #153, unfixed upstream).

The fix wraps the socket the writer sends on: a send that would block sends nothing, and
the writer, seeing the message unfinished, waits until the socket is writable again, as it
already does after a partial send.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

log = logging.getLogger("kmodtrim.dbus.writer")


class _SendWithoutBlocking:
    """A socket whose ``send`` returns 0 instead of raising when it would block."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return self._sock.send(data, flags)
        except (BlockingIOError, InterruptedError):
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def tolerate_full_socket(bus: Any) -> None:
    """Make the connected dbus-next ``bus`` wait out a full socket instead of
    disconnecting. Logs (and changes nothing) if dbus-next's writer is not the one this
    was written for."""
    writer: Any = getattr(bus, "_writer", None)
    sock = getattr(writer, "sock", None)
    if not isinstance(sock, socket.socket) or getattr(writer, "negotiate_unix_fd", True):
        # Messages with file descriptors go through sendmsg, which this does not cover.
        log.warning("unknown dbus-next message writer: a full bus socket may disconnect")
        return
    writer.sock = _SendWithoutBlocking(sock)
