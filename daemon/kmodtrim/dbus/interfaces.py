"""kmodtrimd's D-Bus interfaces as dbus-next objects, built from the contract in api.py:
their methods (which refuse: the dispatcher in service.py answers every call after
authorising it), their properties (read from the daemon and its jobs) and their signals.
The table fixes every name and signature; a class that strays from it fails at import.
"""

# No `from __future__ import annotations`: dbus-next reads the annotations at runtime.

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast

from dbus_next.constants import PropertyAccess
from dbus_next.errors import DBusError
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from ..resident.core import Daemon
from ..resident.jobs import Job
from . import api, typed
from .errors import ACCESS_DENIED

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type[ServiceInterface])


def _annotated(fn: F, ret: str) -> F:
    fn.__annotations__ = {"return": ret} if ret else {}
    return fn


def _not_dispatched() -> DBusError:
    return DBusError(ACCESS_DENIED,  # type: ignore[no-untyped-call]
                     "this call did not pass kmodtrimd's authorisation")


def _refusing_method(member: api.Method) -> Any:
    """The ``@method`` dbus-next introspects for ``member``: its arguments and signature
    come from the table; calling it refuses (Dispatcher answers the real calls)."""
    def refuse(self: ServiceInterface, *args: Any) -> None:
        raise _not_dispatched()

    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
    parameters += [inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                     annotation=a.signature) for a in member.in_args]
    refuse.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        parameters, return_annotation=member.out_signature or inspect.Signature.empty)
    refuse.__name__ = member.name
    return method(name=member.name)(refuse)


def implements(interface: api.Interface) -> Callable[[C], C]:
    """Class decorator: add ``interface``'s methods (refusing stubs) and check that the
    class has exactly the table's properties and signals. Raises TypeError otherwise."""
    def decorate(cls: C) -> C:
        for member in interface.methods:
            setattr(cls, member.name, _refusing_method(member))
        probe = object.__new__(cls)
        ServiceInterface.__init__(probe, interface.name)
        declared = probe.introspect()
        for kind, have, want in (
                ("properties", {p.name for p in declared.properties},
                 {p.name for p in interface.properties}),
                ("signals", {s.name for s in declared.signals},
                 {s.name for s in interface.signals})):
            if have != want:
                raise TypeError(f"{cls.__name__}: {kind} {sorted(have ^ want)} differ "
                                f"from kmodtrim.dbus.api's {interface.name}")
        return cls
    return decorate


def read_property(interface: api.Interface, name: str) -> Callable[[F], F]:
    """A read-only property whose signature is the table's."""
    signature = interface.property(name).signature

    def decorator(fn: F) -> F:
        return cast(F, dbus_property(access=PropertyAccess.READ, name=name)(
            _annotated(fn, signature)))
    return decorator


def emits(interface: api.Interface, name: str) -> Callable[[F], F]:
    """A signal whose signature is the table's."""
    signature = interface.signal(name).signature

    def decorator(fn: F) -> F:
        return cast(F, signal(name=name)(_annotated(fn, signature)))
    return decorator


# ---------------------------------------------------------------------------------------
# Interfaces

M = api.MANAGER
J = api.JOB


@implements(M)
class ManagerInterface(ServiceInterface):
    """org.kmodtrim.KmodTrim1.Manager (methods are dispatched by Dispatcher)."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(M.name)
        self.daemon = daemon

    @read_property(M, "Version")
    def Version(self) -> str:
        return self.daemon.version

    @read_property(M, "KernelRelease")
    def KernelRelease(self) -> str:
        return self.daemon.kernel_release

    @read_property(M, "Root")
    def Root(self) -> str:
        return str(self.daemon.root)

    @read_property(M, "State")
    def State(self) -> str:
        return self.daemon.state

    @read_property(M, "CurrentGeneration")
    def CurrentGeneration(self) -> int:
        return self.daemon.current_generation

    @read_property(M, "ObservedSince")
    def ObservedSince(self) -> int:
        return self.daemon.observed_since

    @read_property(M, "PendingKernelEvents")
    def PendingKernelEvents(self) -> list[str]:
        return self.daemon.pending_kernel_events

    @emits(M, "JobNew")
    def JobNew(self, job_id: int, path: str) -> list[Any]:
        return [job_id, path]

    @emits(M, "JobRemoved")
    def JobRemoved(self, job_id: int, path: str, result: str) -> list[Any]:
        return [job_id, path, result]

    @emits(M, "GenerationNew")
    def GenerationNew(self, generation: int) -> int:
        return generation

    @emits(M, "ModuleRestored")
    def ModuleRestored(self, name: str, modalias: str, generation: int) -> list[Any]:
        return [name, modalias, generation]

    @emits(M, "ModuleRequested")
    def ModuleRequested(self, name: str, generation: int) -> list[Any]:
        return [name, generation]


@implements(J)
class JobInterface(ServiceInterface):
    """org.kmodtrim.KmodTrim1.Job: one running operation."""

    def __init__(self, job: Job) -> None:
        super().__init__(J.name)
        self.job = job
        self._outcome: dict[str, Any] | None = None

    @read_property(J, "Id")
    def Id(self) -> int:
        return self.job.id

    @read_property(J, "Type")
    def Type(self) -> str:
        return self.job.type

    @read_property(J, "Phase")
    def Phase(self) -> str:
        return self.job.phase

    @read_property(J, "Progress")
    def Progress(self) -> float:
        return self.job.progress

    @read_property(J, "Result")
    def Result(self) -> str:
        return self.job.result

    @read_property(J, "Error")
    def Error(self) -> str:
        return self.job.error

    @read_property(J, "ErrorMessage")
    def ErrorMessage(self) -> str:
        return self.job.error_message

    @read_property(J, "Outcome")
    def Outcome(self) -> dict[str, Any]:
        return self.outcome()

    def outcome(self) -> dict[str, Any]:
        """The job's outcome as ``a{sv}`` (empty until it is done), encoded once."""
        if not self.job.result:
            return {}
        if self._outcome is None:
            self._outcome = typed.to_dbus(self.job.outcome, typed.OUTCOME)
        return self._outcome
