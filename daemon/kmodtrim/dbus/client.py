"""What the CLI uses to talk to kmodtrimd: synchronous helpers over dbus-next's asyncio API.

Every helper connects to the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` is honoured, or pass
``bus_address``), makes its call and disconnects. D-Bus errors are raised as the matching
KmodtrimError subclass (errors.from_dbus_error), so the CLI reports them and picks its exit
status exactly as for a local call.

Options are plain Python values: ``kernel`` (str), ``observed`` (paths), ``policy`` (path),
``force``/``dry_run``/``latest`` (bool), ``initramfs``/``backend`` (str). Paths are made
absolute here, because the daemon does not share the caller's working directory.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import BusType, MessageType
from dbus_next.message import Message
from dbus_next.signature import Variant

from ..errors import InputError, KmodtrimError
from . import BUS_NAME, JOB_INTERFACE, MANAGER_INTERFACE, OBJECT_PATH
from .errors import from_dbus_error

ProgressCallback = Callable[[str, float], None]  # (phase, 0..1)

_OPTION_SIGNATURES = {
    "kernel": "s", "observed": "as", "policy": "s", "force": "b", "dry_run": "b",
    "initramfs": "s", "backend": "s", "latest": "b",
}


def to_variants(options: Mapping[str, Any]) -> dict[str, Variant]:
    """``a{sv}`` options from plain values; None values are left out.

    Raises InputError for an unknown key.
    """
    out: dict[str, Variant] = {}
    for key, value in options.items():
        if value is None:
            continue
        sig = _OPTION_SIGNATURES.get(key)
        if sig is None:
            raise InputError(f"unknown option {key!r} for kmodtrimd")
        if key == "observed":
            value = [os.path.abspath(str(v)) for v in value]
        elif key == "policy":
            value = os.path.abspath(str(value))
        elif sig == "b":
            value = bool(value)
        else:
            value = str(value)
        out[key] = Variant(sig, value)
    return out


async def _connect(bus_address: str | None) -> Any:
    try:
        if bus_address:
            return await MessageBus(bus_address=bus_address).connect()
        return await MessageBus(bus_type=BusType.SYSTEM).connect()
    except Exception as exc:  # OSError, AuthError, ValueError (bad address)
        raise KmodtrimError(f"cannot connect to the system bus: {exc}") from exc


def _check(reply: Message) -> Message:
    if reply.message_type == MessageType.ERROR:
        text = reply.body[0] if reply.body else reply.error_name
        raise from_dbus_error(reply.error_name, str(text))
    return reply


async def _call(bus: Any, member: str, signature: str = "",
                body: Sequence[Any] = (), *, path: str = OBJECT_PATH,
                interface: str = MANAGER_INTERFACE) -> list[Any]:
    reply = await bus.call(Message(
        destination=BUS_NAME, path=path, interface=interface, member=member,
        signature=signature, body=list(body)))
    result: list[Any] = _check(reply).body
    return result


async def _add_match(bus: Any, rule: str) -> None:
    _check(await bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule])))


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------------
# Queries


def daemon_running(bus_address: str | None = None) -> bool:
    """True if some process owns org.kmodtrim.KmodTrim1 on the system bus (False also
    when there is no bus to ask)."""
    async def ask() -> bool:
        try:
            bus = await _connect(bus_address)
        except KmodtrimError:
            return False
        try:
            reply = await bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="NameHasOwner", signature="s",
                body=[BUS_NAME]))
            return reply.message_type == MessageType.METHOD_RETURN and bool(reply.body[0])
        finally:
            bus.disconnect()

    result: bool = _run(ask())
    return result


async def _query(bus_address: str | None, member: str, signature: str = "",
                 body: Sequence[Any] = ()) -> Any:
    bus = await _connect(bus_address)
    try:
        (text,) = await _call(bus, member, signature, body)
        return json.loads(text)
    finally:
        bus.disconnect()


def plan(options: Mapping[str, Any], *, bus_address: str | None = None) -> dict[str, Any]:
    """The daemon's plan (the document ``kmodtrim plan --json`` prints)."""
    doc: dict[str, Any] = _run(_query(bus_address, "Plan", "a{sv}", [to_variants(options)]))
    return doc


def explain(name: str, options: Mapping[str, Any], *,
            bus_address: str | None = None) -> dict[str, Any]:
    """Why ``name`` is kept or removed (with ``lines`` for humans)."""
    doc: dict[str, Any] = _run(_query(bus_address, "Explain", "sa{sv}",
                                      [name, to_variants(options)]))
    return doc


def list_generations(*, bus_address: str | None = None) -> list[dict[str, Any]]:
    """Every generation (the document ``kmodtrim history --json`` prints)."""
    doc: list[dict[str, Any]] = _run(_query(bus_address, "ListGenerations"))
    return doc


def show_generation(number: int, *, bus_address: str | None = None) -> dict[str, Any]:
    """One generation's manifest. Raises NoSuchGenerationError."""
    doc: dict[str, Any] = _run(_query(bus_address, "ShowGeneration", "u", [number]))
    return doc


def manager_properties(*, bus_address: str | None = None) -> dict[str, Any]:
    """Version, KernelRelease, Root, State, CurrentGeneration, ObservedSince."""
    async def get() -> dict[str, Any]:
        bus = await _connect(bus_address)
        try:
            (props,) = await _call(bus, "GetAll", "s", [MANAGER_INTERFACE],
                                   interface="org.freedesktop.DBus.Properties")
            return {k: v.value for k, v in props.items()}
        finally:
            bus.disconnect()

    result: dict[str, Any] = _run(get())
    return result


# ---------------------------------------------------------------------------------------
# Jobs


async def _job(bus_address: str | None, member: str, signature: str, body: Sequence[Any],
               progress: ProgressCallback | None) -> dict[str, Any]:
    bus = await _connect(bus_address)
    try:
        # Subscribe before the call: a short job may finish right after the reply.
        await _add_match(bus, f"type='signal',sender='{BUS_NAME}',"
                              f"interface='{MANAGER_INTERFACE}',member='JobRemoved'")
        await _add_match(bus, f"type='signal',sender='{BUS_NAME}',"
                              "interface='org.freedesktop.DBus.Properties',"
                              f"member='PropertiesChanged',path_namespace='{OBJECT_PATH}'")
        seen: list[Message] = []
        wake = asyncio.Event()

        def on_message(msg: Message) -> bool:
            if msg.message_type == MessageType.SIGNAL:
                seen.append(msg)
                wake.set()
            return False

        bus.add_message_handler(on_message)
        job_id, path = await _call(bus, member, signature, body)
        props: dict[str, Any] = {}
        result = ""
        while not result:
            while not seen:
                wake.clear()
                await wake.wait()
            msg = seen.pop(0)
            if msg.member == "PropertiesChanged" and msg.path == path \
                    and msg.body[0] == JOB_INTERFACE:
                changed = {k: v.value for k, v in msg.body[1].items()}
                props.update(changed)
                if progress is not None and ("Progress" in changed or "Phase" in changed):
                    progress(str(props.get("Phase", "")), float(props.get("Progress", 0.0)))
            elif msg.member == "JobRemoved" and msg.body[0] == job_id:
                result = msg.body[2]
        if result != "done":
            name = props.get("Error") or "org.kmodtrim.KmodTrim1.Error.Failed"
            raise from_dbus_error(name, props.get("ErrorMessage") or f"job {job_id} {result}")
        outcome = props.get("Outcome") or "{}"
        doc: dict[str, Any] = json.loads(outcome)
        doc["job"] = job_id
        return doc
    finally:
        bus.disconnect()


def trim(options: Mapping[str, Any], progress_cb: ProgressCallback | None = None, *,
         bus_address: str | None = None) -> dict[str, Any]:
    """Trim as a daemon job and wait for it; returns the outcome (``apply --json``)."""
    doc: dict[str, Any] = _run(_job(bus_address, "Trim", "a{sv}", [to_variants(options)],
                                    progress_cb))
    return doc


def rollback(generation: int | None, options: Mapping[str, Any],
             progress_cb: ProgressCallback | None = None, *,
             bus_address: str | None = None) -> dict[str, Any]:
    """Roll back to ``generation`` (None: undo the latest) and wait for it."""
    opts = dict(options)
    if generation is None:
        opts["latest"] = True
    doc: dict[str, Any] = _run(_job(bus_address, "Rollback", "ua{sv}",
                                    [generation or 0, to_variants(opts)], progress_cb))
    return doc


def restore(names: Sequence[str], options: Mapping[str, Any],
            progress_cb: ProgressCallback | None = None, *,
            bus_address: str | None = None) -> dict[str, Any]:
    """Restore modules (with dependencies and firmware) and wait for it."""
    doc: dict[str, Any] = _run(_job(bus_address, "Restore", "asa{sv}",
                                    [list(names), to_variants(options)], progress_cb))
    return doc


def kernel_event(action: str, kernel: str, options: Mapping[str, Any], *,
                 bus_address: str | None = None) -> int:
    """Hand a kernel install (``add``) or removal (``remove``) to the daemon, which
    queues it until the package manager's transaction has finished; returns how many
    events are queued. Does not wait: the hooks call this from inside that transaction."""
    async def call() -> int:
        bus = await _connect(bus_address)
        try:
            (pending,) = await _call(bus, "KernelEvent", "ssa{sv}",
                                     [action, kernel, to_variants(options)])
            return int(pending)
        finally:
            bus.disconnect()

    result: int = _run(call())
    return result


def cancel(job_path: str, *, bus_address: str | None = None) -> None:
    """Ask the daemon to cancel the job at ``job_path`` (e.g. on Ctrl-C in the CLI)."""
    async def call() -> None:
        bus = await _connect(bus_address)
        try:
            await _call(bus, "Cancel", path=job_path, interface=JOB_INTERFACE)
        finally:
            bus.disconnect()

    _run(call())


def _main(argv: Sequence[str]) -> int:
    """``python -m kmodtrim.dbus.client METHOD [JSON-ARGS…]``: call one helper and print
    its JSON result, or ``error NAME: MESSAGE`` (for scripts and tests)."""
    import sys

    helpers: dict[str, Callable[..., Any]] = {
        "plan": plan, "explain": explain, "list_generations": list_generations,
        "show_generation": show_generation, "trim": trim, "rollback": rollback,
        "restore": restore, "daemon_running": daemon_running,
        "manager_properties": manager_properties, "cancel": cancel,
        "kernel_event": kernel_event,
    }
    if not argv or argv[0] not in helpers:
        print(f"usage: client.py {{{','.join(helpers)}}} [JSON-ARG…]", file=sys.stderr)
        return 2
    args = [json.loads(a) for a in argv[1:]]
    try:
        print(json.dumps(helpers[argv[0]](*args)))
    except KmodtrimError as exc:
        print(f"error {type(exc).__name__} {getattr(exc, 'dbus_name', '')}: {exc.message}")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
