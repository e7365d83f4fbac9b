"""What the CLI uses to talk to kmodtrimd: synchronous helpers over dbus-next's asyncio API.

Every helper connects to the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` is honoured, or pass
``bus_address``), makes its call and disconnects. D-Bus errors are raised as the matching
KmodtrimError subclass (errors.from_dbus_error), so the CLI reports them and picks its exit
status exactly as for a local call.

Options are plain Python values: ``kernel`` (str), ``observed`` (paths), ``policy`` (path),
``force``/``dry_run``/``latest`` (bool), ``initramfs``/``backend`` (str); their D-Bus types
are kmodtrim.request's. Paths are made absolute here, because the daemon does not share
the caller's working directory.

What the helpers return is the JSON document the CLI prints: typed D-Bus results
(ListGenerations, ShowGeneration, a job's Outcome) are turned back into it (typed.py), and
the ``schema`` of Plan and Explain documents is checked and taken off.
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
from ..request import OPTION_BY_KEY
from . import BUS_NAME, JOB_INTERFACE, MANAGER_INTERFACE, OBJECT_PATH, api, typed
from .errors import from_dbus_error

ProgressCallback = Callable[[str, float], None]  # (phase, 0..1)


def to_variants(options: Mapping[str, Any]) -> dict[str, Variant]:
    """``a{sv}`` options from plain values; None values are left out.

    Raises InputError for an unknown key.
    """
    out: dict[str, Variant] = {}
    for key, value in options.items():
        if value is None:
            continue
        option = OPTION_BY_KEY.get(key)
        if option is None or not option.members:
            raise InputError(f"unknown option {key!r} for kmodtrimd")
        sig = option.signature
        if key == "observed":
            value = [os.path.abspath(str(v)) for v in value]
        elif key == "policy":
            value = os.path.abspath(str(value))
        elif sig == "b":
            value = bool(value)
        elif sig == "as":
            value = [str(v) for v in value]
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


async def _call(bus: Any, member: str, body: Sequence[Any] = (), *,
                path: str = OBJECT_PATH, interface: api.Interface = api.MANAGER) -> list[Any]:
    reply = await bus.call(Message(
        destination=BUS_NAME, path=path, interface=interface.name, member=member,
        signature=interface.method(member).in_signature, body=list(body)))
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


async def _query(bus_address: str | None, member: str, body: Sequence[Any] = ()) -> Any:
    bus = await _connect(bus_address)
    try:
        (answer,) = await _call(bus, member, body)
        return answer
    finally:
        bus.disconnect()


def _document(text: str) -> dict[str, Any]:
    """A Plan or Explain document without its ``schema`` (checked). Raises
    KmodtrimError for a schema this client does not know."""
    doc: dict[str, Any] = json.loads(text)
    schema = doc.pop("schema", api.DOCUMENT_SCHEMA)
    if schema != api.DOCUMENT_SCHEMA:
        raise KmodtrimError(f"kmodtrimd answered with document schema {schema!r}; this "
                            f"kmodtrim reads schema {api.DOCUMENT_SCHEMA}",
                            hint="install the same version of kmodtrim and kmodtrimd")
    return doc


def plan(options: Mapping[str, Any], *, bus_address: str | None = None) -> dict[str, Any]:
    """The daemon's plan (the document ``kmodtrim plan --json`` prints)."""
    return _document(_run(_query(bus_address, "Plan", [to_variants(options)])))


def explain(name: str, options: Mapping[str, Any], *,
            bus_address: str | None = None) -> dict[str, Any]:
    """Why ``name`` is kept or removed (with ``lines`` for humans)."""
    return _document(_run(_query(bus_address, "Explain", [name, to_variants(options)])))


def list_generations(*, bus_address: str | None = None) -> list[dict[str, Any]]:
    """Every generation (the document ``kmodtrim history --json`` prints)."""
    docs: list[dict[str, Any]] = typed.from_dbus(
        _run(_query(bus_address, "ListGenerations")), typed.SUMMARY)
    return docs


def show_generation(number: int, *, bus_address: str | None = None) -> dict[str, Any]:
    """One generation's manifest. Raises NoSuchGenerationError."""
    doc: dict[str, Any] = typed.from_dbus(
        _run(_query(bus_address, "ShowGeneration", [number])), typed.GENERATION)
    return doc


def manager_properties(*, bus_address: str | None = None) -> dict[str, Any]:
    """Version, KernelRelease, Root, State, CurrentGeneration, ObservedSince."""
    async def get() -> dict[str, Any]:
        bus = await _connect(bus_address)
        try:
            reply = _check(await bus.call(Message(
                destination=BUS_NAME, path=OBJECT_PATH,
                interface="org.freedesktop.DBus.Properties", member="GetAll",
                signature="s", body=[MANAGER_INTERFACE])))
            return {k: v.value for k, v in reply.body[0].items()}
        finally:
            bus.disconnect()

    result: dict[str, Any] = _run(get())
    return result


# ---------------------------------------------------------------------------------------
# Jobs


async def _job(bus_address: str | None, member: str, body: Sequence[Any],
               progress: ProgressCallback | None, *, settled: bool = True) -> dict[str, Any]:
    """Call ``member``, follow its job and return its outcome. With ``settled`` (the
    default) once the job is removed, i.e. after kmodtrimd has re-read its state, so the
    next call finds it idle; else as soon as the job's Result and Outcome are published
    (a caller that must not wait: modprobe's install line)."""
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
        job_id, path = await _call(bus, member, body)
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
                if not settled and changed.get("Result"):
                    result = str(changed["Result"])
            elif msg.member == "JobRemoved" and msg.body[0] == job_id:
                result = msg.body[2]
        if result != "done":
            name = props.get("Error") or "org.kmodtrim.KmodTrim1.Error.Failed"
            raise from_dbus_error(name, props.get("ErrorMessage") or f"job {job_id} {result}")
        doc: dict[str, Any] = typed.from_dbus(props.get("Outcome") or {}, typed.OUTCOME)
        doc["job"] = job_id
        return doc
    finally:
        bus.disconnect()


def trim(options: Mapping[str, Any], progress_cb: ProgressCallback | None = None, *,
         bus_address: str | None = None) -> dict[str, Any]:
    """Trim as a daemon job and wait for it; returns the outcome (``apply --json``)."""
    doc: dict[str, Any] = _run(_job(bus_address, "Trim", [to_variants(options)],
                                    progress_cb))
    return doc


def rollback(generation: int | None, options: Mapping[str, Any],
             progress_cb: ProgressCallback | None = None, *,
             bus_address: str | None = None) -> dict[str, Any]:
    """Roll back to ``generation`` (None: undo the latest) and wait for it."""
    opts = dict(options)
    if generation is None:
        opts["latest"] = True
    doc: dict[str, Any] = _run(_job(bus_address, "Rollback",
                                    [generation or 0, to_variants(opts)], progress_cb))
    return doc


def restore(names: Sequence[str], options: Mapping[str, Any],
            progress_cb: ProgressCallback | None = None, *,
            bus_address: str | None = None, settled: bool = True) -> dict[str, Any]:
    """Restore modules (with dependencies and firmware) and wait for it (``settled``:
    see _job)."""
    doc: dict[str, Any] = _run(_job(bus_address, "Restore",
                                    [list(names), to_variants(options)], progress_cb,
                                    settled=settled))
    return doc


def kernel_event(action: str, kernel: str, options: Mapping[str, Any], *,
                 bus_address: str | None = None) -> int:
    """Hand a kernel install (``add``) or removal (``remove``) to the daemon, which
    queues it until the package manager's transaction has finished; returns how many
    events are queued. Does not wait: the hooks call this from inside that transaction."""
    async def call() -> int:
        bus = await _connect(bus_address)
        try:
            (pending,) = await _call(bus, "KernelEvent",
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
            await _call(bus, "Cancel", path=job_path, interface=api.JOB)
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
