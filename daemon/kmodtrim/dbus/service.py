"""kmodtrimd on D-Bus: the connection, the events published as signals and Job objects,
and the dispatch of every method call to ``…Manager`` on /org/kmodtrim/KmodTrim1 and
``…Job`` on /org/kmodtrim/KmodTrim1/job/N as the contract in api.py declares it (member
names, signatures, polkit actions and options are declared there, once; the dbus-next
interface objects are in interfaces.py).

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

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from dbus_next.aio.message_bus import MessageBus
from dbus_next.constants import (
    BusType,
    MessageFlag,
    MessageType,
    NameFlag,
    RequestNameReply,
)
from dbus_next.errors import DBusError
from dbus_next.message import Message

from ..errors import InputError, KmodtrimError
from ..names import is_valid_module_name
from ..resident.core import Daemon
from ..resident.jobs import Job, Request
from ..resident.systemd import release_memory
from . import BUS_NAME, JOB_PATH_PREFIX, OBJECT_PATH, api, job_path
from .auth import authorize
from .errors import to_dbus_error
from .interfaces import JobInterface, ManagerInterface
from .limits import ReadLimiter, Typed
from .options import parse_options
from .reads import (
    CallerUids,
    explain_text,
    generation_answer,
    generations_answer,
    generations_token,
    plan_text,
    plan_token,
)
from .writer import tolerate_full_socket

log = logging.getLogger("kmodtrim.dbus")
M = api.MANAGER
J = api.JOB
UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"

# ---------------------------------------------------------------------------------------
# Events → signals


class DBusEvents:
    """Publishes the daemon's events (kmodtrim.resident.jobs.Events) as signals and
    objects."""

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
            props["Outcome"] = iface.outcome()
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

    def module_requested(self, name: str, generation: int) -> None:
        self.manager.ModuleRequested(name, generation)

    def manager_changed(self, changed: Mapping[str, object]) -> None:
        if changed:
            self.manager.emit_properties_changed(dict(changed))


# ---------------------------------------------------------------------------------------
# Dispatch with authorisation


# An implementation gets the call, the caller's uid (None: the bus did not say) and its
# parsed options (with the ``latest`` flag); it returns the reply's body.
Impl = Callable[[Message, int | None, Request, bool], Awaitable[list[Any]]]


def _error_reply(msg: Message, exc: Exception) -> Message:
    error = to_dbus_error(exc)
    return Message.new_error(msg, error.type, error.text)


def _body(answer: str | Typed) -> list[Any]:
    return [answer.value if isinstance(answer, Typed) else answer]


class Dispatcher:
    """Takes every method call to the Manager and Job interfaces before dbus-next does,
    and handles it as kmodtrim.dbus.api declares: signature, polkit action (uid 0 needs
    none), options and their actions, read-call bounds."""

    def __init__(self, bus: Any, daemon: Daemon, events: DBusEvents) -> None:
        self.bus = bus
        self.daemon = daemon
        self.events = events
        self.uids = CallerUids(bus)
        self.reads = ReadLimiter(release_memory)
        self._tasks: set[asyncio.Task[None]] = set()
        impls: dict[str, Impl] = {
            "Plan": self._plan, "Explain": self._explain,
            "ListGenerations": self._list_generations,
            "ShowGeneration": self._show_generation, "Trim": self._trim,
            "Rollback": self._rollback, "Restore": self._restore,
            "KernelEvent": self._kernel_event, "Cancel": self._cancel,
        }
        self.members: dict[tuple[str, str], tuple[api.Method, Impl]] = {
            (iface.name, m.name): (m, impls[m.name])
            for iface in api.INTERFACES for m in iface.methods}
        missing = set(impls) ^ {name for _, name in self.members}
        assert not missing, f"implementations and kmodtrim.dbus.api differ: {missing}"

    def on_message(self, msg: Message) -> bool:
        """dbus-next message handler: True when the call is ours (answered later)."""
        if msg.message_type != MessageType.METHOD_CALL:
            return False
        if msg.interface == M.name and msg.path != OBJECT_PATH:
            return False
        if msg.interface == J.name and not msg.path.startswith(JOB_PATH_PREFIX):
            return False
        # Job calls are taken also for finished jobs: the caller is authorised before it
        # learns anything.
        found = self.members.get((msg.interface or "", msg.member or ""))
        if found is None or found[0].in_signature != (msg.signature or ""):
            return False  # dbus-next answers UnknownMethod / UnknownObject
        task = asyncio.ensure_future(self._dispatch(msg, *found))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _dispatch(self, msg: Message, member: api.Method, impl: Impl) -> None:
        try:
            uid = await self.uids.get(msg.sender)
            with self.reads.admit(uid) if member.read_only else contextlib.nullcontext():
                # A read call counts until its answer is written: a caller that does not
                # read its answers cannot pile them up in the daemon.
                await self._authorize(msg, uid, self._action(msg, member))
                request, latest = Request(), False
                options = [i for i, a in enumerate(member.in_args) if a.name == "options"]
                if options:
                    raw = msg.body[options[0]]
                    request, latest = parse_options(member.name, raw)
                    for key in sorted(set(raw) & set(api.OPTION_ACTIONS)):
                        await self._authorize(msg, uid, api.OPTION_ACTIONS[key])
                body = await impl(msg, uid, request, latest)
                await self._send(msg, Message.new_method_return(
                    msg, member.out_signature, body))
        except Exception as exc:  # every error becomes a D-Bus error reply
            if not isinstance(exc, (KmodtrimError, DBusError)):
                log.exception("%s.%s failed", msg.interface, msg.member)
            await self._send(msg, _error_reply(msg, exc))

    def _action(self, msg: Message, member: api.Method) -> str | None:
        if member.action != api.JOB_ACTION:
            return member.action
        iface = self.events.jobs.get(msg.path)
        kind = iface.job.type if iface is not None else "trim"
        return api.JOB_TYPE_ACTIONS.get(kind, api.ACTION_TRIM)

    async def _authorize(self, msg: Message, uid: int | None, action: str | None) -> None:
        if action is not None and uid != 0:
            await authorize(self.bus, msg.sender, action)

    async def _send(self, msg: Message, reply: Message) -> None:
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            # An error here means the connection is gone, which the daemon handles.
            with contextlib.suppress(Exception):
                await self.bus.send(reply)

    async def _plan(self, msg: Message, uid: int | None, request: Request,
                    _latest: bool) -> list[Any]:
        token = plan_token(self.daemon, request)
        return _body(await self.reads.answer(
            ("Plan", request), token, partial(plan_text, self.daemon, request, token),
            privileged=uid == 0, expensive=True))

    async def _explain(self, msg: Message, uid: int | None, request: Request,
                       _latest: bool) -> list[Any]:
        name: str = msg.body[0]
        if not name or len(name) > 4096:
            raise InputError("Explain: give a module name or alias")
        token = plan_token(self.daemon, request)
        return _body(await self.reads.answer(
            ("Explain", name, request), token,
            partial(explain_text, self.daemon, name, request, token),
            privileged=uid == 0, expensive=True))

    async def _list_generations(self, msg: Message, uid: int | None, _request: Request,
                                _latest: bool) -> list[Any]:
        return _body(await self.reads.answer(
            ("ListGenerations",), generations_token(self.daemon),
            partial(generations_answer, self.daemon), privileged=uid == 0,
            expensive=False))

    async def _show_generation(self, msg: Message, uid: int | None, _request: Request,
                               _latest: bool) -> list[Any]:
        number = int(msg.body[0])
        return _body(await self.reads.answer(
            ("ShowGeneration", number), generations_token(self.daemon),
            partial(generation_answer, self.daemon, number), privileged=uid == 0,
            expensive=False))

    async def _trim(self, msg: Message, uid: int | None, request: Request,
                    _latest: bool) -> list[Any]:
        job, _started = self.daemon.trim(request)
        return [job.id, job_path(job.id)]

    async def _rollback(self, msg: Message, uid: int | None, request: Request,
                        latest: bool) -> list[Any]:
        job, _started = self.daemon.rollback(None if latest else int(msg.body[0]), request)
        return [job.id, job_path(job.id)]

    async def _restore(self, msg: Message, uid: int | None, request: Request,
                       _latest: bool) -> list[Any]:
        names: list[str] = msg.body[0]
        if not names:
            raise InputError("Restore: give at least one module name")
        bad = [n for n in names if not is_valid_module_name(n)]
        if bad:
            raise InputError(f"Restore: not module names: {', '.join(repr(n) for n in bad)}")
        job, _started = self.daemon.restore(names, request)
        return [job.id, job_path(job.id)]

    async def _kernel_event(self, msg: Message, uid: int | None, request: Request,
                            _latest: bool) -> list[Any]:
        action: str = msg.body[0]
        kernel: str = msg.body[1]
        # In the loop's thread: it queues (one small file write) and starts no work here.
        return [self.daemon.kernel_event(action, kernel, request)]

    async def _cancel(self, msg: Message, uid: int | None, _request: Request,
                      _latest: bool) -> list[Any]:
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
    daemon.attach(events)
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
