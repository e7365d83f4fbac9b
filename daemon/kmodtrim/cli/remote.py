"""When a verb goes through kmodtrimd: a daemon serves the same root and the verb takes
nothing the daemon does not. Then admin tools and the CLI share one job slot, one lock
holder and one log. The daemon's answers are completed from the same root into the very
documents the use cases give in-process (usecases.py), so one renderer prints both."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..request import OPTION_BY_KEY

DAEMON_VERBS = frozenset({"plan", "explain", "history", "apply", "rollback", "restore",
                          "kernel-event"})
_SYSTEM_BUS_SOCKET = Path("/run/dbus/system_bus_socket")


def client() -> Any:
    from ..dbus import client as dbus_client

    return dbus_client


def via_daemon(args: argparse.Namespace) -> bool:
    """True when this verb should be a request to a running kmodtrimd."""
    if (args.offline or args.verb not in DAEMON_VERBS
            or args.cache_dir or args.symvers or args.no_cache):
        return False
    if args.verb == "kernel-event" and (args.observed or args.policy):
        return False  # KernelEvent takes neither: the daemon uses what it has
    if not (os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or _SYSTEM_BUS_SOCKET.exists()):
        return False
    cached = getattr(args, "_daemon_root", None)
    if cached is None:
        try:
            bus = client()
            served = bus.manager_properties()["Root"] if bus.daemon_running() else ""
        except Exception:  # no bus, no dbus-next, an older daemon: run in-process
            served = ""
        args._daemon_root = cached = served
    return bool(cached) and Path(cached).resolve() == args.root.resolve()


def options(args: argparse.Namespace, member: str) -> dict[str, Any]:
    """The ``a{sv}`` options of ``member`` from the parsed arguments (request.OPTIONS says
    which a member takes)."""
    out: dict[str, Any] = {}
    for key, option in OPTION_BY_KEY.items():
        if member not in option.members or not hasattr(args, key):
            continue
        value = getattr(args, key)
        if key == "observed":
            value = [str(p.resolve()) for p in value] or None
        elif key == "policy":
            value = str(value.resolve()) if value else None
        out[key] = value
    return out


def complete_outcome(doc: dict[str, Any]) -> dict[str, Any]:
    """A daemon job's outcome as the in-process document. The daemon's worker made it with
    the same use case (usecases.outcome_document), so only what D-Bus cannot carry (a null
    is left out) is put back; ``job`` stays: which kmodtrimd job did it."""
    from ..documents import SCHEMA

    full = dict(doc)
    full.setdefault("schema", SCHEMA)
    for key in ("generation", "description", "removed_files", "removed_bytes"):
        full.setdefault(key, None)
    full.setdefault("damaged", [])
    return full
