"""The D-Bus interfaces of kmodtrimd: ``…Manager`` on /org/kmodtrim/KmodTrim1 and ``…Job``
on /org/kmodtrim/KmodTrim1/job/N.

dbus-next hands ``@method`` handlers no sender, so every method call to these interfaces is
taken by a message handler that runs before dbus-next's dispatch: it authorises the caller
(see auth.py), validates the arguments and calls the implementation here, then replies.
The ``@method`` definitions describe the interface (introspection); reaching one directly
would bypass authorisation, so they refuse. The read-only methods, open to everyone, are
bounded per caller, computed off the daemon's own worker threads and cached (limits.py,
reads.py).

Options are ``a{sv}`` (options.py); unknown keys and wrong types are ``InvalidArgs``.
Options naming files (``observed``, ``policy``) make the daemon read those files as root,
so they need uid 0 or the ``org.kmodtrim.configure`` action even on read-only methods.
"""

# No `from __future__ import annotations`: dbus-next reads the annotations at runtime.

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import (
    BusType,
    MessageFlag,
    MessageType,
    NameFlag,
    PropertyAccess,
    RequestNameReply,
)
from dbus_next.errors import DBusError
from dbus_next.message import Message
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from ..daemon import Daemon, Job, Request, release_memory
from ..errors import InputError, KmodtrimError
from ..names import is_valid_module_name
from . import (
    ACTION_CONFIGURE,
    ACTION_RESTORE,
    ACTION_ROLLBACK,
    ACTION_TRIM,
    BUS_NAME,
    JOB_INTERFACE,
    JOB_PATH_PREFIX,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    job_path,
)
from .auth import authorize
from .errors import ACCESS_DENIED, to_dbus_error
from .limits import ReadLimiter
from .options import parse_options
from .reads import (
    CallerUids,
    explain_text,
    generation_text,
    generations_text,
    generations_token,
    plan_text,
    plan_token,
)
from .writer import tolerate_full_socket

log = logging.getLogger("kmodtrim.dbus")
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"

F = TypeVar("F", bound=Callable[..., Any])


def _annotated(fn: F, ret: str, args: Mapping[str, str]) -> F:
    annotations: dict[str, str] = dict(args)
    if ret:
        annotations["return"] = ret
    fn.__annotations__ = annotations
    return fn


def dbus_method(ret: str = "", **args: str) -> Callable[[F], F]:
    """``@method()`` with the D-Bus signature given as arguments (``ret`` and one keyword
    per parameter), so the Python annotations stay checkable."""
    def decorator(fn: F) -> F:
        return cast(F, method()(_annotated(fn, ret, args)))
    return decorator


def dbus_signal(ret: str = "") -> Callable[[F], F]:
    def decorator(fn: F) -> F:
        return cast(F, signal()(_annotated(fn, ret, {})))
    return decorator


def dbus_readonly_property(sig: str) -> Callable[[F], F]:
    def decorator(fn: F) -> F:
        return cast(F, dbus_property(access=PropertyAccess.READ)(_annotated(fn, sig, {})))
    return decorator


def _not_dispatched() -> DBusError:
    return DBusError(ACCESS_DENIED,  # type: ignore[no-untyped-call]
                     "this call did not pass kmodtrimd's authorisation")


# ---------------------------------------------------------------------------------------
# Interfaces


class ManagerInterface(ServiceInterface):
    """org.kmodtrim.KmodTrim1.Manager (methods are dispatched by Dispatcher)."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(MANAGER_INTERFACE)
        self.daemon = daemon

    @dbus_readonly_property("s")
    def Version(self) -> str:
        return self.daemon.version

    @dbus_readonly_property("s")
    def KernelRelease(self) -> str:
        return self.daemon.kernel_release

    @dbus_readonly_property("s")
    def Root(self) -> str:
        """The root this daemon serves ("/" on a live system, else an image root)."""
        return str(self.daemon.root)

    @dbus_readonly_property("s")
    def State(self) -> str:
        return self.daemon.state

    @dbus_readonly_property("u")
    def CurrentGeneration(self) -> int:
        return self.daemon.current_generation

    @dbus_readonly_property("t")
    def ObservedSince(self) -> int:
        return self.daemon.observed_since

    @dbus_readonly_property("as")
    def PendingKernelEvents(self) -> list[str]:
        """Kernel installs/removals handed over and not handled yet ("add 6.1.0-9-amd64")."""
        return self.daemon.pending_kernel_events

    @dbus_method("s", options="a{sv}")
    def Plan(self, options: Any) -> str:
        raise _not_dispatched()

    @dbus_method("s", name="s", options="a{sv}")
    def Explain(self, name: str, options: Any) -> str:
        raise _not_dispatched()

    @dbus_method("s")
    def ListGenerations(self) -> str:
        raise _not_dispatched()

    @dbus_method("s", generation="u")
    def ShowGeneration(self, generation: int) -> str:
        raise _not_dispatched()

    @dbus_method("uo", options="a{sv}")
    def Trim(self, options: Any) -> list[Any]:
        raise _not_dispatched()

    @dbus_method("uo", generation="u", options="a{sv}")
    def Rollback(self, generation: int, options: Any) -> list[Any]:
        raise _not_dispatched()

    @dbus_method("uo", names="as", options="a{sv}")
    def Restore(self, names: list[str], options: Any) -> list[Any]:
        raise _not_dispatched()

    @dbus_method("u", action="s", kernel="s", options="a{sv}")
    def KernelEvent(self, action: str, kernel: str, options: Any) -> int:
        raise _not_dispatched()

    @dbus_signal("uo")
    def JobNew(self, job_id: int, path: str) -> list[Any]:
        return [job_id, path]

    @dbus_signal("uos")
    def JobRemoved(self, job_id: int, path: str, result: str) -> list[Any]:
        return [job_id, path, result]

    @dbus_signal("u")
    def GenerationNew(self, generation: int) -> int:
        return generation

    @dbus_signal("ssu")
    def ModuleRestored(self, name: str, modalias: str, generation: int) -> list[Any]:
        return [name, modalias, generation]


class JobInterface(ServiceInterface):
    """org.kmodtrim.KmodTrim1.Job: one running operation."""

    def __init__(self, job: Job) -> None:
        super().__init__(JOB_INTERFACE)
        self.job = job

    @dbus_readonly_property("u")
    def Id(self) -> int:
        return self.job.id

    @dbus_readonly_property("s")
    def Type(self) -> str:
        return self.job.type

    @dbus_readonly_property("s")
    def Phase(self) -> str:
        return self.job.phase

    @dbus_readonly_property("d")
    def Progress(self) -> float:
        return self.job.progress

    @dbus_readonly_property("s")
    def Result(self) -> str:
        return self.job.result

    @dbus_readonly_property("s")
    def Error(self) -> str:
        return self.job.error

    @dbus_readonly_property("s")
    def ErrorMessage(self) -> str:
        return self.job.error_message

    @dbus_readonly_property("s")
    def Outcome(self) -> str:
        return json.dumps(self.job.outcome) if self.job.outcome else ""

    @dbus_method()
    def Cancel(self) -> None:
        raise _not_dispatched()


# ---------------------------------------------------------------------------------------
# Events → signals


class DBusEvents:
    """Publishes the daemon's events (kmodtrim.daemon.Events) as signals and objects."""

    def __init__(self, bus: Any, manager: ManagerInterface) -> None:
        self.bus = bus
        self.manager = manager
        self.jobs: dict[str, JobInterface] = {}

    def job_new(self, job: Job) -> None:
        path = job_path(job.id)
        iface = JobInterface(job)
        self.jobs[path] = iface
        self.bus.export(path, iface)
        self.manager.JobNew(job.id, path)

    def job_changed(self, job: Job, changed: Mapping[str, object]) -> None:
        iface = self.jobs.get(job_path(job.id))
        if iface is None:
            return
        props = dict(changed)
        if job.result:
            props["Outcome"] = json.dumps(job.outcome) if job.outcome else ""
        iface.emit_properties_changed(props)

    def job_removed(self, job: Job) -> None:
        path = job_path(job.id)
        self.manager.JobRemoved(job.id, path, job.result)
        iface = self.jobs.pop(path, None)
        if iface is not None:
            self.bus.unexport(path, iface)

    def generation_new(self, number: int) -> None:
        self.manager.GenerationNew(number)

    def module_restored(self, name: str, modalias: str, generation: int) -> None:
        self.manager.ModuleRestored(name, modalias, generation)

    def manager_changed(self, changed: Mapping[str, object]) -> None:
        if changed:
            self.manager.emit_properties_changed(dict(changed))


# ---------------------------------------------------------------------------------------
# Dispatch with authorisation


# Every implementation gets the message and the caller's uid (None: the bus did not say).
Impl = Callable[[Message, int | None], Awaitable[list[Any]]]


def _error_reply(msg: Message, exc: Exception) -> Message:
    error = to_dbus_error(exc)
    return Message.new_error(msg, error.type, error.text)


@dataclass(frozen=True)
class _Member:
    in_signature: str
    out_signature: str
    impl: Impl
    read: bool = False  # read-only, open to everyone: bounded by ReadLimiter


class Dispatcher:
    """Takes every method call to the Manager and Job interfaces before dbus-next does."""

    def __init__(self, bus: Any, daemon: Daemon, events: DBusEvents) -> None:
        self.bus = bus
        self.daemon = daemon
        self.events = events
        self.uids = CallerUids(bus)
        self.reads = ReadLimiter(release_memory)
        self._tasks: set[asyncio.Task[None]] = set()
        self.manager_members: dict[str, _Member] = {
            "Plan": _Member("a{sv}", "s", self._plan, read=True),
            "Explain": _Member("sa{sv}", "s", self._explain, read=True),
            "ListGenerations": _Member("", "s", self._list_generations, read=True),
            "ShowGeneration": _Member("u", "s", self._show_generation, read=True),
            "Trim": _Member("a{sv}", "uo", self._trim),
            "Rollback": _Member("ua{sv}", "uo", self._rollback),
            "Restore": _Member("asa{sv}", "uo", self._restore),
            "KernelEvent": _Member("ssa{sv}", "u", self._kernel_event),
        }
        self.job_members: dict[str, _Member] = {"Cancel": _Member("", "", self._cancel)}

    def on_message(self, msg: Message) -> bool:
        """dbus-next message handler: True when the call is ours (answered later)."""
        if msg.message_type != MessageType.METHOD_CALL:
            return False
        member: _Member | None = None
        if msg.interface == MANAGER_INTERFACE and msg.path == OBJECT_PATH:
            member = self.manager_members.get(msg.member)
        elif msg.interface == JOB_INTERFACE and msg.path.startswith(JOB_PATH_PREFIX):
            # Also for finished jobs: the caller is authorised before it learns anything.
            member = self.job_members.get(msg.member)
        if member is None or member.in_signature != (msg.signature or ""):
            return False  # dbus-next answers UnknownMethod / UnknownObject
        task = asyncio.ensure_future(self._dispatch(msg, member))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _dispatch(self, msg: Message, member: _Member) -> None:
        try:
            uid = await self.uids.get(msg.sender)
            with self.reads.admit(uid) if member.read else contextlib.nullcontext():
                # A read call counts until its answer is written: a caller that does not
                # read its answers cannot pile them up in the daemon.
                await self._send(msg, Message.new_method_return(
                    msg, member.out_signature, await member.impl(msg, uid)))
        except Exception as exc:  # every error becomes a D-Bus error reply
            if not isinstance(exc, (KmodtrimError, DBusError)):
                log.exception("%s.%s failed", msg.interface, msg.member)
            await self._send(msg, _error_reply(msg, exc))

    async def _send(self, msg: Message, reply: Message) -> None:
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            # An error here means the connection is gone, which the daemon handles.
            with contextlib.suppress(Exception):
                await self.bus.send(reply)

    async def _authorize_files(self, msg: Message, uid: int | None,
                               request: Request) -> None:
        # Reading files the caller names happens as root: only for root or `configure`.
        if (request.observed or request.policy) and uid != 0:
            await authorize(self.bus, msg.sender, ACTION_CONFIGURE)

    async def _plan(self, msg: Message, uid: int | None) -> list[Any]:
        request, _ = parse_options("Plan", msg.body[0])
        await self._authorize_files(msg, uid, request)
        token = plan_token(self.daemon, request)
        return [await self.reads.answer(
            ("Plan", request), token, partial(plan_text, self.daemon, request, token),
            privileged=uid == 0, expensive=True)]

    async def _explain(self, msg: Message, uid: int | None) -> list[Any]:
        name: str = msg.body[0]
        if not name or len(name) > 4096:
            raise InputError("Explain: give a module name or alias")
        request, _ = parse_options("Explain", msg.body[1])
        await self._authorize_files(msg, uid, request)
        token = plan_token(self.daemon, request)
        return [await self.reads.answer(
            ("Explain", name, request), token,
            partial(explain_text, self.daemon, name, request, token),
            privileged=uid == 0, expensive=True)]

    async def _list_generations(self, msg: Message, uid: int | None) -> list[Any]:
        return [await self.reads.answer(
            ("ListGenerations",), generations_token(self.daemon),
            partial(generations_text, self.daemon), privileged=uid == 0, expensive=False)]

    async def _show_generation(self, msg: Message, uid: int | None) -> list[Any]:
        number = int(msg.body[0])
        return [await self.reads.answer(
            ("ShowGeneration", number), generations_token(self.daemon),
            partial(generation_text, self.daemon, number), privileged=uid == 0,
            expensive=False)]

    async def _trim(self, msg: Message, uid: int | None) -> list[Any]:
        await authorize(self.bus, msg.sender, ACTION_TRIM)
        request, _ = parse_options("Trim", msg.body[0])
        await self._authorize_files(msg, uid, request)
        job, _started = self.daemon.trim(request)
        return [job.id, job_path(job.id)]

    async def _rollback(self, msg: Message, uid: int | None) -> list[Any]:
        await authorize(self.bus, msg.sender, ACTION_ROLLBACK)
        request, latest = parse_options("Rollback", msg.body[1])
        job, _started = self.daemon.rollback(None if latest else int(msg.body[0]), request)
        return [job.id, job_path(job.id)]

    async def _restore(self, msg: Message, uid: int | None) -> list[Any]:
        await authorize(self.bus, msg.sender, ACTION_RESTORE)
        names: list[str] = msg.body[0]
        if not names:
            raise InputError("Restore: give at least one module name")
        bad = [n for n in names if not is_valid_module_name(n)]
        if bad:
            raise InputError(f"Restore: not module names: {', '.join(repr(n) for n in bad)}")
        request, _ = parse_options("Restore", msg.body[1])
        job, _started = self.daemon.restore(names, request)
        return [job.id, job_path(job.id)]

    async def _kernel_event(self, msg: Message, uid: int | None) -> list[Any]:
        # Installing a kernel's trim (or forgetting a removed kernel's stash) is a trim.
        await authorize(self.bus, msg.sender, ACTION_TRIM)
        action: str = msg.body[0]
        kernel: str = msg.body[1]
        request, _ = parse_options("KernelEvent", msg.body[2])
        # In the loop's thread: it queues (one small file write) and starts no work here.
        return [self.daemon.kernel_event(action, kernel, request)]

    async def _cancel(self, msg: Message, uid: int | None) -> list[Any]:
        iface = self.events.jobs.get(msg.path)
        kind = iface.job.type if iface is not None else "trim"
        action = {"rollback": ACTION_ROLLBACK, "restore": ACTION_RESTORE}.get(kind, ACTION_TRIM)
        await authorize(self.bus, msg.sender, action)
        iface = self.events.jobs.get(msg.path)
        if iface is None:
            raise DBusError(UNKNOWN_OBJECT,  # type: ignore[no-untyped-call]
                            f"no job at {msg.path} (it has finished)")
        self.daemon.cancel(iface.job)
        return []


# ---------------------------------------------------------------------------------------
# Connecting


class DaemonConnection:
    """The daemon's bus connection, interfaces and event publisher."""

    def __init__(self, bus: Any, events: DBusEvents, dispatcher: Dispatcher) -> None:
        self.bus = bus
        self.events = events
        self.dispatcher = dispatcher

    async def wait_for_disconnect(self) -> None:
        await self.bus.wait_for_disconnect()

    def disconnect(self) -> None:
        self.bus.disconnect()
        self.dispatcher.reads.close()


async def connect(daemon: Daemon, which: str) -> DaemonConnection:
    """Connect to the system (honours DBUS_SYSTEM_BUS_ADDRESS) or session bus, export the
    Manager, attach the daemon's events and claim org.kmodtrim.KmodTrim1.

    Raises KmodtrimError when the bus is unreachable or the name is taken or forbidden.
    """
    bus_type = BusType.SYSTEM if which == "system" else BusType.SESSION
    try:
        bus: Any = await MessageBus(bus_type=bus_type).connect()
    except Exception as exc:  # dbus-next raises OSError, AuthError, ValueError…
        raise KmodtrimError(f"cannot connect to the {which} bus: {exc}") from exc
    tolerate_full_socket(bus)
    manager = ManagerInterface(daemon)
    events = DBusEvents(bus, manager)
    daemon.events = events
    dispatcher = Dispatcher(bus, daemon, events)
    bus.add_message_handler(dispatcher.on_message)
    bus.export(OBJECT_PATH, manager)
    try:
        reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
    except DBusError as exc:
        bus.disconnect()
        raise KmodtrimError(
            f"cannot own {BUS_NAME} on the {which} bus: {exc.text}",
            hint="the bus policy (org.kmodtrim.KmodTrim1.conf) lets only root own it",
        ) from exc
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        bus.disconnect()
        raise KmodtrimError(f"{BUS_NAME} is already owned on the {which} bus "
                            "(is another kmodtrimd running?)")
    return DaemonConnection(bus, events, dispatcher)
