"""Who may call what: read-only calls for everyone; changes for uid 0 or a polkit action.

Deny by default: a caller whose uid cannot be read, or a polkit that is absent, errors or
times out, is refused.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from dbus_next.constants import MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from .errors import AccessDeniedError

log = logging.getLogger("kmodtrim.dbus.auth")

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
ALLOW_USER_INTERACTION = 1
# polkit may wait for the user to answer an authentication agent; a caller's own method
# call times out after 25 s by default, so waiting much longer helps nobody.
POLKIT_TIMEOUT = 60.0


async def _call(bus: Any, msg: Message, timeout: float) -> Message:
    reply: Message = await asyncio.wait_for(bus.call(msg), timeout)
    return reply


async def caller_uid(bus: Any, sender: str) -> int | None:
    """The Unix uid of the bus connection ``sender``, or None if the bus will not say."""
    try:
        reply = await _call(bus, Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="GetConnectionUnixUser",
            signature="s", body=[sender]), 10.0)
    except (TimeoutError, OSError) as exc:
        log.warning("cannot read the uid of %s: %s", sender, exc)
        return None
    if reply.message_type != MessageType.METHOD_RETURN:
        return None
    return int(reply.body[0])


async def polkit_allows(bus: Any, sender: str, action: str) -> bool:
    """Ask polkit whether ``sender`` may perform ``action`` (interactive authentication
    allowed). False when polkit says no, is not running, or errors."""
    subject = ["system-bus-name", {"name": Variant("s", sender)}]
    msg = Message(
        destination=POLKIT_NAME, path=POLKIT_PATH, interface=POLKIT_INTERFACE,
        member="CheckAuthorization", signature="(sa{sv})sa{ss}us",
        body=[subject, action, {}, ALLOW_USER_INTERACTION, ""],
    )
    try:
        reply = await _call(bus, msg, POLKIT_TIMEOUT)
    except (TimeoutError, OSError) as exc:
        log.warning("polkit check of %s for %s failed: %s", action, sender, exc)
        return False
    if reply.message_type != MessageType.METHOD_RETURN:
        log.info("polkit check of %s for %s: %s %s", action, sender, reply.error_name,
                 reply.body[0] if reply.body else "")
        return False
    authorized, _challenge, _details = reply.body[0]
    return bool(authorized)


async def authorize(bus: Any, sender: str | None, action: str) -> None:
    """Return if ``sender`` may perform ``action`` (uid 0, or polkit says yes).

    Raises AccessDeniedError otherwise.
    """
    if sender is None:
        raise AccessDeniedError(f"{action}: the caller is unknown")
    uid = await caller_uid(bus, sender)
    if uid == 0:
        return
    if await polkit_allows(bus, sender, action):
        return
    who = f"uid {uid}" if uid is not None else sender
    raise AccessDeniedError(
        f"{who} is not authorised for {action}",
        hint="run as root, or have polkit grant the action",
    )
