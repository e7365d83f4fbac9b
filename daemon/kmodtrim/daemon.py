"""``kmodtrimd``: the asyncio service behind the D-Bus API.

A thin shell around the library calls the CLI makes (operations, executor, store): it adds
a job slot (one operation at a time; an identical request joins the running job, others
get ``Busy``), observation without polling (a ``/proc/modules`` snapshot at start, then the
kernel's module uevents), self-healing (a device appearing whose driver was trimmed gets
that driver restored, depmod'ed and loaded), kernel installs handed over by the hooks
(queued, persisted, and run once the package manager's transaction has finished), sd_notify
and structured journal messages.

Start-up order: claim the bus name, then recover an interrupted operation and snapshot the
loaded modules, then ``READY=1``. Idle means idle: no timer runs except the watchdog ping
(only when systemd asks for one with ``WATCHDOG_USEC``).

Stopping (SIGTERM/SIGINT): a running job is asked to cancel. Cancellation is honoured at
the executor's next per-file step before its commit point, where the executor undoes the
partial work itself (the same code crash recovery runs); a job past that point finishes.
The daemon waits for the worker thread, then exits. If it is killed instead, the
executor's write-ahead journal lets the next start finish or undo the operation.

This module imports no D-Bus library: ``kmodtrim.dbus`` attaches to a ``Daemon`` through
the ``Events`` protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from . import __version__
from .errors import BusyError, InputError, KmodtrimError, StoreError
from .executor import (
    Options,
    apply_plan,
    observation_shortfall,
    recover,
    restore_modules,
    rollback,
)
from .index import ModuleIndex, default_kernel
from .names import is_valid_kernel_version, normalize
from .observe import read_proc_modules
from .operations import (
    PlanResult,
    Target,
    boot_id,
    explain,
    explanation_json,
    generation_summary,
    kernel_event,
    load_index,
    load_target_policy,
    make_plan_for,
)
from .planner import Evidence
from .policy import load_policy
from .run import run
from .store import (
    atomic_write_json,
    current_generation,
    load_generation,
    read_json,
    read_observations,
    record_observation,
    state_dir,
)
from .uevent import parse_uevent

if TYPE_CHECKING:
    from .dbus.service import DaemonConnection

log = logging.getLogger("kmodtrim.daemon")

NETLINK_KOBJECT_UEVENT = 15  # not in Python's socket module
UEVENT_KERNEL_GROUP = 1
UEVENT_BUFFER = 64 * 1024

# One fixed MESSAGE_ID per kind of event, so `journalctl MESSAGE_ID=…` finds them all.
MESSAGE_IDS = {
    "trim": "5e2ebba6714c47f18ba7a7ef1dc7ed0c",
    "restore": "1cba284e2d1b4f908ab2124f771309a8",
    "rollback": "866a40a447d14568bf1161d8c0a7f7f1",
    "kernel-install": "3a0af944b1e740f0896733f498825fe0",
    "error": "78f0466ff63c4c71aefe3c383115d2dd",
    "self-heal": "1af01a0c7a424d05a2691782ac6f090f",
}


# ---------------------------------------------------------------------------------------
# systemd: notify and journal (both no-ops or stderr outside systemd)


def sd_notify(*lines: str) -> None:
    """Tell systemd about our state (``READY=1``, ``STATUS=…``). No-op outside systemd."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon as sd_daemon
    except ImportError:
        return
    sd_daemon.notify("\n".join(lines))


def _journal_available() -> bool:
    return os.path.exists("/run/systemd/journal/socket")


def log_event(kind: str, message: str, *, error: bool = False, **fields: object) -> None:
    """A structured journal message with the kind's fixed MESSAGE_ID and ``KMODTRIM_*``
    fields (e.g. ``generation=3`` → ``KMODTRIM_GENERATION=3``); stderr logging when no
    journal is reachable."""
    if _journal_available():
        try:
            from systemd import journal

            extra = {f"KMODTRIM_{k.upper()}": str(v) for k, v in fields.items() if v is not None}
            journal.send(message, MESSAGE_ID=MESSAGE_IDS[kind],
                         PRIORITY=str(3 if error else 6), **extra)
            return
        except (ImportError, OSError):
            pass
    details = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    (log.error if error else log.info)("%s%s", message, f" [{details}]" if details else "")


# ---------------------------------------------------------------------------------------
# Requests and jobs


INITRAMFS_METHODS = ("auto", "skip", "dracut", "update-initramfs", "kernel-install")
BACKENDS = ("auto", "stash", "dpkg", "rpm")


@dataclass(frozen=True)
class Request:
    """Options of one request (the D-Bus ``a{sv}``, validated)."""

    kernel: str | None = None
    observed: tuple[Path, ...] = ()
    policy: Path | None = None
    force: bool = False
    dry_run: bool = False
    initramfs: str = "auto"
    backend: str | None = None  # None: the policy's (trim) or "auto"

    def target(self, root: Path) -> Target:
        return Target(root=root, kernel=self.kernel, observed_files=self.observed,
                      policy_file=self.policy)


class Canceled(KmodtrimError):
    """The job was canceled; nothing changed (the executor undid any partial work)."""

    dbus_name = "org.kmodtrim.KmodTrim1.Error.Canceled"


@dataclass(eq=False)
class Job:
    """One running (or just finished) operation. Owned by the event loop's thread; the
    worker thread only reads ``cancel`` and reports progress through the loop."""

    id: int
    type: str  # "trim", "rollback", "restore", "kernel-install"
    key: Hashable  # identical requests have equal keys and join this job
    phase: str = "queued"
    progress: float = 0.0
    result: str = ""  # "" while running, then "done", "failed" or "canceled"
    error: str = ""  # D-Bus error name when failed
    error_message: str = ""
    outcome: dict[str, Any] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class Events(Protocol):
    """What the D-Bus layer publishes. Every call happens in the event loop's thread."""

    def job_new(self, job: Job) -> None: ...
    def job_changed(self, job: Job, changed: Mapping[str, object]) -> None: ...
    def job_removed(self, job: Job) -> None: ...
    def generation_new(self, number: int) -> None: ...
    def module_restored(self, name: str, modalias: str, generation: int) -> None: ...
    def manager_changed(self, changed: Mapping[str, object]) -> None: ...


class _NoEvents:
    def job_new(self, job: Job) -> None: pass
    def job_changed(self, job: Job, changed: Mapping[str, object]) -> None: pass
    def job_removed(self, job: Job) -> None: pass
    def generation_new(self, number: int) -> None: pass
    def module_restored(self, name: str, modalias: str, generation: int) -> None: pass
    def manager_changed(self, changed: Mapping[str, object]) -> None: pass


# Progress goes 0 → 0.1 while planning, 0.1 → 0.9 over the executor's per-file steps,
# then 1.0. PropertiesChanged is emitted only for steps of at least 1 %.
_PROGRESS_MIN_STEP = 0.01

# Kernel events handed over by the hooks wait here (under the state directory) until the
# package manager's transaction that installed or removed the kernel has finished.
KERNEL_EVENTS_FILE = "kernel-events.json"
KERNEL_EVENT_ACTIONS = ("add", "remove")
# While an event waits for the package manager, its lock is probed this often (seconds).
_PM_PROBE_INTERVAL = 0.5


def check_kernel_version(kernel: str) -> str:
    """``kernel`` if it can name a directory under lib/modules; raises InputError."""
    if not is_valid_kernel_version(kernel):
        raise InputError(f"{kernel!r} is not a kernel version (as in `uname -r`)")
    return kernel


@dataclass(frozen=True)
class KernelEvent:
    """A kernel install (``add``) or removal (``remove``) waiting to be handled."""

    action: str
    kernel: str
    initramfs: str = "auto"
    backend: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "kernel": self.kernel,
                "initramfs": self.initramfs, "backend": self.backend}

    @staticmethod
    def from_json(doc: Any) -> KernelEvent:
        """Raises InputError for a document that is not a valid event."""
        if not isinstance(doc, dict) or doc.get("action") not in KERNEL_EVENT_ACTIONS:
            raise InputError(f"not a kernel event: {doc!r}")
        initramfs = doc.get("initramfs", "auto")
        backend = doc.get("backend")
        if initramfs not in INITRAMFS_METHODS or (backend is not None
                                                   and backend not in BACKENDS):
            raise InputError(f"not a kernel event: {doc!r}")
        return KernelEvent(doc["action"], check_kernel_version(str(doc.get("kernel", ""))),
                           initramfs, backend)


# ---------------------------------------------------------------------------------------
# The daemon


class Daemon:
    """State and operations of one kmodtrimd, for one root (``/`` or an image root)."""

    def __init__(self, root: Path, *, observe: bool = True) -> None:
        self.root = root
        self.live = root.resolve() == Path("/")
        self.observe = observe
        self.events: Events = _NoEvents()
        self.job: Job | None = None
        self.loading = True
        self.loaded = asyncio.Event()  # set when start-up (recovery, snapshot) is done
        self._next_job_id = 1
        self.revision = 0  # counts kernel uevents: devices and modules come and go
        self._generation = 0
        self._observed_since = 0
        self._trimmed: frozenset[str] = frozenset()  # stashed modules of the default kernel
        self._heal_index: tuple[int, ModuleIndex] | None = None
        self._pending_modules: set[str] = set()
        self._observation_task: asyncio.Task[None] | None = None
        self._pending_aliases: dict[str, None] = {}
        self._heal_task: asyncio.Task[None] | None = None
        self._uevent_socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._kernel_events: list[KernelEvent] = []
        self._kernel_task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- properties ------------------------------------------------------------------

    @property
    def version(self) -> str:
        return __version__

    @property
    def kernel_release(self) -> str:
        """The kernel requests default to (running kernel if installed, else newest)."""
        try:
            return default_kernel(self.root)
        except KmodtrimError:
            return ""

    @property
    def state(self) -> str:
        return "busy" if self.loading or self.job is not None else "idle"

    @property
    def current_generation(self) -> int:
        return self._generation

    @property
    def observed_since(self) -> int:
        return self._observed_since

    # -- start-up --------------------------------------------------------------------

    def load(self) -> str | None:
        """Recover an interrupted operation, snapshot the loaded modules, read the state.
        Runs in a worker thread before READY=1. Returns what recovery did, if anything."""
        done = recover(self.root)
        if done:
            log_event("error", f"start-up recovery: {done}", error=False)
        if self.observe:
            names = [o.name for o in read_proc_modules(self.root)]
            # A root without /proc/modules (an image) has nothing loaded; recording an empty
            # boot would count towards the minimum observation, so record only real ones.
            if names:
                record_observation(self.root, boot_id(self.root), names)
        self._kernel_events = self._read_kernel_events()
        self._refresh_state()
        return done

    def _refresh_state(self) -> dict[str, object]:
        """Re-read generation and observation state; return the properties that changed."""
        before = (self._generation, self._observed_since)
        try:
            generation = current_generation(self.root)
        except StoreError as exc:
            log_event("error", f"cannot read the current generation: {exc}", error=True)
            return {}
        self._generation = generation.number
        boots = read_observations(self.root)
        self._observed_since = int(min(
            (float(b.get("first_seen", 0)) for b in boots.values()), default=0))
        kernel = self.kernel_release
        self._trimmed = frozenset(
            f.module for f in generation.removed
            if f.kind == "module" and f.kernel == kernel and f.module)
        changed: dict[str, object] = {}
        if before[0] != self._generation:
            changed["CurrentGeneration"] = self._generation
        if before[1] != self._observed_since:
            changed["ObservedSince"] = self._observed_since
        return changed

    # -- read-only operations (run in a worker thread) -------------------------------

    def plan(self, request: Request, made: PlanResult | None = None) -> dict[str, Any]:
        """The plan for ``request`` (``made`` if made already) as ``kmodtrim plan --json``."""
        return (made or make_plan_for(request.target(self.root))).plan.to_json()

    def explain(self, name: str, request: Request,
                made: PlanResult | None = None) -> dict[str, Any]:
        """Why ``name`` is kept or removed. Raises UnknownModuleError."""
        return explanation_json(explain(made or make_plan_for(request.target(self.root)), name))

    def list_generations(self) -> list[dict[str, Any]]:
        return generation_summary(self.root)

    def show_generation(self, number: int) -> dict[str, Any]:
        """Raises NoSuchGenerationError."""
        doc: dict[str, Any] = load_generation(self.root, number).to_json()
        return doc

    # -- jobs ------------------------------------------------------------------------

    def start_job(self, kind: str, key: Hashable,
                  work: Callable[[Job, Callable[[str, int, int], None]], dict[str, Any]]
                  ) -> tuple[Job, bool]:
        """Start ``work`` as a job in a worker thread, or join the running job if its key
        equals ``key``. Returns (job, started). Raises BusyError for a different request."""
        if self.job is not None:
            if self.job.key == key:
                return self.job, False
            raise BusyError(
                f"a {self.job.type} job is running (job {self.job.id}); "
                "kmodtrimd runs one operation at a time",
                hint="wait for JobRemoved, or call the same request again to join it",
            )
        if self.loading:
            raise BusyError("kmodtrimd is starting up (recovering state)",
                            hint="try again in a moment")
        job = Job(self._next_job_id, kind, key)
        self._next_job_id += 1
        self.job = job
        self.events.job_new(job)
        self.events.manager_changed({"State": self.state})
        self._spawn(self._run_job(job, work))
        return job, True

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _progress_reporter(self, job: Job) -> Callable[[str, int, int], None]:
        loop = asyncio.get_running_loop()
        last = [0.0]

        def report(step: str, done: int, total: int) -> None:
            # Runs in the worker thread: raising here makes the executor undo the
            # transition (cancellation point); state changes go through the loop.
            if job.cancel.is_set():
                raise Canceled(f"job {job.id} ({job.type}) was canceled; nothing changed")
            value = 0.1 + 0.8 * (done / total if total else 1.0)
            if value - last[0] >= _PROGRESS_MIN_STEP or done == total:
                last[0] = value
                loop.call_soon_threadsafe(self._set_progress, job, step, value)

        return report

    def _set_progress(self, job: Job, phase: str, value: float) -> None:
        changed: dict[str, object] = {}
        if phase != job.phase:
            job.phase = phase
            changed["Phase"] = phase
        if value != job.progress:
            job.progress = value
            changed["Progress"] = value
        if changed:
            self.events.job_changed(job, changed)

    async def _run_job(
        self, job: Job,
        work: Callable[[Job, Callable[[str, int, int], None]], dict[str, Any]],
    ) -> None:
        self._set_progress(job, "planning", 0.0)
        report = self._progress_reporter(job)
        try:
            job.outcome = await asyncio.to_thread(work, job, report)
            job.result = "done"
        except Canceled as exc:
            job.result, job.error, job.error_message = "canceled", exc.dbus_name, exc.message
        except KmodtrimError as exc:
            job.result, job.error = "failed", exc.dbus_name
            job.error_message = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
        except Exception as exc:  # a bug: keep the traceback in the log
            log.exception("job %d (%s) failed", job.id, job.type)
            job.result, job.error = "failed", "org.kmodtrim.KmodTrim1.Error.Failed"
            job.error_message = f"internal error: {type(exc).__name__}: {exc}"
        job.phase = "finished"
        job.progress = 1.0
        generation = job.outcome.get("generation")
        kind = job.type if job.type in MESSAGE_IDS else "error"
        if job.result == "done":
            what = "would change" if job.outcome.get("dry_run") else "changed"
            log_event(kind, f"{job.type} job {job.id} done: {what} "
                            f"{len(job.outcome.get('stash', []))} files out, "
                            f"{len(job.outcome.get('restore', []))} back",
                      generation=generation, job=job.id)
        else:
            log_event("error", f"{job.type} job {job.id} {job.result}: {job.error_message}",
                      error=job.result == "failed", job=job.id)
        self.events.job_changed(job, {
            "Phase": job.phase, "Progress": job.progress, "Result": job.result,
            "Error": job.error, "ErrorMessage": job.error_message,
        })
        changed = await asyncio.to_thread(self._refresh_state)
        if "CurrentGeneration" in changed:
            self._heal_index = None
            self.events.generation_new(self._generation)
        self.job = None
        job.finished.set()
        self.events.job_removed(job)
        self.events.manager_changed({"State": self.state, **changed})
        sd_notify(f"STATUS=idle (generation {self._generation})")

    def cancel(self, job: Job) -> None:
        """Ask ``job`` to stop at its next cancellation point (see the module docstring)."""
        if not job.result:
            job.cancel.set()
            self._set_progress(job, "canceling", job.progress)

    # -- mutating operations ---------------------------------------------------------

    def trim(self, request: Request) -> tuple[Job, bool]:
        """Plan and apply (``kmodtrim apply``) as a job. Raises BusyError."""
        def work(job: Job, report: Callable[[str, int, int], None]) -> dict[str, Any]:
            target = request.target(self.root)
            recover(self.root)
            result = make_plan_for(target)
            if job.cancel.is_set():
                raise Canceled(f"job {job.id} (trim) was canceled before it changed anything")
            options = self._options(request, result.policy.settings.backend, report)
            return apply_plan(self.root, result.plan, result.index, result.evidence,
                              result.policy, options).to_json()

        return self.start_job("trim", ("trim", request), work)

    def rollback(self, to: int | None, request: Request) -> tuple[Job, bool]:
        """Roll back to generation ``to`` (None: undo the latest). Raises BusyError,
        NoSuchGenerationError (before starting a job)."""
        if to is not None:
            load_generation(self.root, to)  # fail early on a bad number

        def work(job: Job, report: Callable[[str, int, int], None]) -> dict[str, Any]:
            recover(self.root)
            return rollback(self.root, to, self._options(request, "auto", report)).to_json()

        return self.start_job("rollback", ("rollback", to, request), work)

    def restore(self, names: Sequence[str], request: Request) -> tuple[Job, bool]:
        """Put modules (with closure and firmware) back as a job. Raises BusyError; the
        job fails with UnknownModuleError for a name the kernel does not know."""
        key = ("restore", tuple(sorted(normalize(n) for n in names)), request)

        def work(job: Job, report: Callable[[str, int, int], None]) -> dict[str, Any]:
            recover(self.root)
            index, _ = load_index(request.target(self.root))
            return restore_modules(self.root, list(names), index,
                                   self._options(request, "auto", report)).to_json()

        return self.start_job("restore", key, work)

    @staticmethod
    def _options(request: Request, default_backend: str,
                 report: Callable[[str, int, int], None]) -> Options:
        return Options(dry_run=request.dry_run, force=request.force,
                       initramfs=request.initramfs,
                       backend=request.backend or default_backend, progress=report)

    # -- observation and self-healing ------------------------------------------------

    def handle_uevent(self, payload: bytes) -> None:
        """Act on one kernel uevent datagram (the socket reader and tests both call this).

        Module ``add`` → recorded as observed on this boot. Device ``add`` with a MODALIAS
        whose driver is trimmed → restored (self-heal). Anything else is ignored.
        Must be called in the event loop's thread.
        """
        event = parse_uevent(payload)
        if event is None:
            return
        self.revision += 1
        module = event.module_loaded
        if module is not None:
            self._pending_modules.add(module)
            if self._observation_task is None or self._observation_task.done():
                self._observation_task = self._spawn(self._flush_observations())
            return
        if event.action == "add" and event.modalias and self._trimmed:
            self._pending_aliases[event.modalias] = None
            if self._heal_task is None or self._heal_task.done():
                self._heal_task = self._spawn(self._heal())

    def _auto_trim_due(self) -> bool:
        """policy mode = "auto": trim the running (default) kernel once the minimum
        observation is met, if it has not been trimmed yet."""
        try:
            policy = load_policy(self.root)
            if policy.settings.mode != "auto":
                return False
            kernel = default_kernel(self.root)
            if any(f.kind == "module" and f.kernel == kernel
                   for f in current_generation(self.root).removed):
                return False
            return observation_shortfall(self.root, policy, Evidence()) is None
        except KmodtrimError as exc:
            log_event("error", f"auto mode: cannot decide whether to trim: {exc.message}",
                      error=True)
            return False

    async def maybe_auto_trim(self) -> None:
        """Start an automatic trim if it is due (called at start-up and after new
        observations are recorded: event-driven, never on a timer)."""
        if self.job is not None or not await asyncio.to_thread(self._auto_trim_due):
            return
        try:
            job, _ = self.trim(Request())
        except KmodtrimError as exc:
            log_event("error", f"auto mode: trim not started: {exc.message}", error=True)
            return
        log_event("trim", f"auto mode: minimum observation met, trimming (job {job.id})")

    async def _flush_observations(self) -> None:
        # A burst of module loads is written once, not once per module.
        while self._pending_modules:
            names = sorted(self._pending_modules)
            self._pending_modules.clear()
            try:
                await asyncio.to_thread(record_observation, self.root, boot_id(self.root),
                                        names)
            except (OSError, KmodtrimError) as exc:
                log_event("error", f"cannot record observed modules {names}: {exc}",
                          error=True)
        changed = await asyncio.to_thread(self._refresh_state)
        if changed:
            self.events.manager_changed(changed)
        await self.maybe_auto_trim()

    def _stashed_matches(self, modalias: str) -> list[str]:
        assert self._heal_index is not None
        index = self._heal_index[1]
        return [name for name in index.match_alias(modalias)
                if name in index.modules and index.modules[name].stashed]

    async def _heal(self) -> None:
        while self._pending_aliases:
            await self.loaded.wait()
            while self.job is not None:
                # The device is still there after the running job: wait for it.
                await self.job.finished.wait()
            if not self._trimmed:
                self._pending_aliases.clear()
                return
            try:
                if self._heal_index is None or self._heal_index[0] != self._generation:
                    target = Target(root=self.root, kernel=self.kernel_release or None)
                    index, _ = await asyncio.to_thread(load_index, target)
                    self._heal_index = (self._generation, index)
            except KmodtrimError as exc:
                log_event("error", f"self-heal: cannot index the kernel: {exc}", error=True)
                self._pending_aliases.clear()
                return
            wanted: dict[str, str] = {}
            for modalias in list(self._pending_aliases):
                del self._pending_aliases[modalias]
                for name in self._stashed_matches(modalias):
                    wanted.setdefault(name, modalias)
            if not wanted:
                continue
            await self._restore_for_devices(wanted)

    async def _restore_for_devices(self, wanted: dict[str, str]) -> None:
        names = sorted(wanted)
        try:
            job, _ = self.restore(names, Request(kernel=self.kernel_release or None))
        except BusyError:
            for modalias in wanted.values():
                self._pending_aliases[modalias] = None  # retried after the running job
            return
        await job.finished.wait()
        if job.result != "done":
            log_event("error", f"self-heal: restoring {', '.join(names)} for "
                               f"{', '.join(sorted(set(wanted.values())))} failed: "
                               f"{job.error_message}", error=True)
            return
        # The device needs these from now on: a later plan (a re-trim, the next kernel)
        # must keep them even if loading them below fails or the device goes away.
        try:
            await asyncio.to_thread(record_observation, self.root, boot_id(self.root), names)
        except (OSError, KmodtrimError) as exc:
            log_event("error", f"self-heal: cannot record {names} as observed: {exc}",
                      error=True)
        for name in names:
            loaded = ""
            if self.live:
                done = await asyncio.to_thread(run, ["modprobe", name], check=False)
                loaded = " and loaded" if done.returncode == 0 else \
                    f"; modprobe failed: {done.stderr.strip()[-200:]}"
            log_event("self-heal", f"device {wanted[name]} appeared: restored {name}"
                                   f"{loaded} (generation {self._generation})",
                      generation=self._generation, module=name, modalias=wanted[name])
            self.events.module_restored(name, wanted[name], self._generation)

    # -- kernel installs ---------------------------------------------------------------

    @property
    def pending_kernel_events(self) -> list[str]:
        """Kernel events not handled yet, as "add KVER" / "remove KVER", oldest first."""
        return [f"{e.action} {e.kernel}" for e in self._kernel_events]

    def _kernel_events_path(self) -> Path:
        return state_dir(self.root) / KERNEL_EVENTS_FILE

    def _read_kernel_events(self) -> list[KernelEvent]:
        """The events an earlier run had not handled. A corrupt file is set aside (logged)
        rather than stopping the daemon."""
        path = self._kernel_events_path()
        try:
            doc = read_json(path)
            if not isinstance(doc, list):
                raise InputError("not a list of kernel events")
            return [KernelEvent.from_json(item) for item in doc]
        except FileNotFoundError:
            return []
        except KmodtrimError as exc:
            aside = path.with_name(path.name + ".corrupt")
            with contextlib.suppress(OSError):
                path.replace(aside)
            log_event("error", f"{path}: unreadable pending kernel events ({exc.message}); "
                               f"set aside as {aside.name}; reinstall a kernel's package "
                               "or run `kmodtrim kernel-event add KVER` to hand it over "
                               "again", error=True)
            return []

    def _save_kernel_events(self, events: Sequence[KernelEvent]) -> None:
        path = self._kernel_events_path()
        if events:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, [e.to_json() for e in events])
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def kernel_event(self, action: str, kernel: str, request: Request) -> int:
        """A hook reports that kernel ``kernel`` was installed (``add``) or removed.

        The event is queued (and written to disk before this returns) and handled as a
        ``kernel-install`` job once no other job runs and the package manager's lock is
        free: the hooks call from inside the package transaction that installs the
        kernel, so the trim must wait for it to end, and the caller must not wait for the
        trim. A later event for the same kernel replaces an earlier one still queued.
        Returns the number of queued events. Raises InputError for a bad action or
        version, StoreError/OSError when the queue cannot be written.
        """
        if action not in KERNEL_EVENT_ACTIONS:
            raise InputError(f"kernel event {action!r}: expected 'add' or 'remove'")
        event = KernelEvent(action, check_kernel_version(kernel), request.initramfs,
                            request.backend)
        queue = [e for e in self._kernel_events if e.kernel != event.kernel] + [event]
        self._save_kernel_events(queue)
        self._kernel_events = queue
        self.events.manager_changed({"PendingKernelEvents": self.pending_kernel_events})
        what = "installed" if action == "add" else "removed"
        log_event("kernel-install", f"kernel {kernel} {what}: queued ({len(queue)} pending)",
                  kernel=kernel)
        self._ensure_kernel_worker()
        return len(queue)

    def resume_kernel_events(self) -> None:
        """Start handling the events an earlier run left queued (at start-up)."""
        if self._kernel_events:
            log_event("kernel-install", "resuming queued kernel events: "
                                        + ", ".join(self.pending_kernel_events))
        self._ensure_kernel_worker()

    def _ensure_kernel_worker(self) -> None:
        if self._kernel_events and (self._kernel_task is None or self._kernel_task.done()):
            self._kernel_task = self._spawn(self._run_kernel_events())

    def _package_manager_busy(self) -> str | None:
        """Why the root's package manager is busy (its lock is held), or None."""
        from .backends.package import PackageManagerBusy
        from .backends.select import detect_backend

        try:
            detect_backend(self.root).wait_for_lock(self.root, 0)
        except PackageManagerBusy as exc:
            return exc.message
        return None

    async def _run_kernel_events(self) -> None:
        """Handle queued kernel events in order, each after the running job and after the
        package manager's transaction (probed while an event waits; idle otherwise)."""
        await self.loaded.wait()
        waiting_logged = False
        while self._kernel_events and not self._stopping:
            if self.job is not None:
                await self.job.finished.wait()
                continue
            busy = await asyncio.to_thread(self._package_manager_busy)
            if busy is not None:
                if not waiting_logged:
                    log.info("kernel events wait for the package manager: %s", busy)
                    sd_notify("STATUS=waiting for the package manager to finish")
                    waiting_logged = True
                await asyncio.sleep(_PM_PROBE_INTERVAL)
                continue
            waiting_logged = False
            event = self._kernel_events[0]
            try:
                job = self._start_kernel_job(event)
            except BusyError:
                continue  # a job started in between: wait for it
            await job.finished.wait()
            if job.result == "canceled" and self._stopping:
                return  # still queued on disk: the next start handles it
            if self._kernel_events and self._kernel_events[0] is event:
                self._kernel_events.pop(0)
                try:
                    await asyncio.to_thread(self._save_kernel_events,
                                            list(self._kernel_events))
                except (OSError, KmodtrimError) as exc:
                    # Handled events may run again after a restart: they are idempotent.
                    log_event("error", f"cannot update the kernel event queue: {exc}",
                              error=True)
                self.events.manager_changed(
                    {"PendingKernelEvents": self.pending_kernel_events})

    def _start_kernel_job(self, event: KernelEvent) -> Job:
        def work(job: Job, report: Callable[[str, int, int], None]) -> dict[str, Any]:
            recover(self.root)
            target = Target(root=self.root)
            backend = event.backend or load_target_policy(target).settings.backend
            options = Options(initramfs=event.initramfs, backend=backend, progress=report)
            doc = kernel_event(target, event.action, event.kernel, options).to_json()
            doc["kernel_event"] = event.to_json()
            return doc

        job, _ = self.start_job("kernel-install", ("kernel-install", event), work)
        log_event("kernel-install", f"kernel {event.kernel}: handling '{event.action}' "
                                    f"(job {job.id})", kernel=event.kernel, job=job.id)
        return job

    # -- the uevent socket -----------------------------------------------------------

    def start_uevent_listener(self) -> bool:
        """Listen to the kernel's uevents (live root only). Returns False, logged, when
        the socket cannot be opened (e.g. in a container without the netlink family)."""
        try:
            sock = open_uevent_socket()
        except OSError as exc:
            log_event("error", f"not listening to kernel uevents: {exc}; device "
                               "self-healing and module observation after start are off",
                      error=True)
            return False
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._read_uevents, sock)
        self._uevent_socket = sock
        return True

    def _read_uevents(self, sock: socket.socket) -> None:
        while True:
            try:
                payload = sock.recv(UEVENT_BUFFER)
            except BlockingIOError:
                return
            except OSError as exc:  # ENOBUFS: the kernel dropped events; keep going
                log.warning("uevent socket: %s", exc)
                return
            self.handle_uevent(payload)

    def close(self) -> None:
        self._stopping = True
        if self._uevent_socket is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._uevent_socket.fileno())
            self._uevent_socket.close()
            self._uevent_socket = None


def open_uevent_socket() -> socket.socket:
    """A non-blocking NETLINK_KOBJECT_UEVENT socket bound to the kernel's event group.

    Raises OSError (EPERM/EPROTONOSUPPORT…) where the kernel or sandbox refuses it.
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    try:
        with contextlib.suppress(OSError):  # a bigger buffer survives boot-time bursts
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, UEVENT_KERNEL_GROUP))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------------------------
# Main


def release_memory() -> None:
    """Give freed heap back to the system: what start-up used (recovery, the snapshot, the
    policy and generation reads), or a burst of read calls: the daemon idles for days."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


async def start(root: Path, bus: str, observe: bool) -> tuple[Daemon, DaemonConnection]:
    """Claim the bus name, then load (recover, snapshot observations). Returns the loaded
    daemon and its connection. Raises KmodtrimError (bus unreachable, name taken, state
    unreadable)."""
    from .dbus.service import connect

    daemon = Daemon(root, observe=observe)
    connection = await connect(daemon, bus)
    sd_notify("STATUS=recovering and snapshotting observations")
    try:
        await asyncio.to_thread(daemon.load)
    except BaseException:
        connection.disconnect()
        raise
    daemon.loading = False
    daemon.loaded.set()
    connection.events.manager_changed({"State": daemon.state})
    daemon.resume_kernel_events()
    await daemon.maybe_auto_trim()
    return daemon, connection


async def serve(root: Path, bus: str, observe: bool) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the exit status."""
    loop = asyncio.get_running_loop()
    # Ping from the start: with Type=dbus systemd counts us started once the name is
    # ours, and the first index of a large tree may take longer than WatchdogSec.
    interval = _watchdog_interval()
    watchdog: asyncio.TimerHandle | None = None
    if interval:
        def ping() -> None:
            nonlocal watchdog
            sd_notify("WATCHDOG=1")
            watchdog = loop.call_later(interval, ping)
        ping()
    try:
        daemon, connection = await start(root, bus, observe)
    except KmodtrimError as exc:
        if watchdog is not None:
            watchdog.cancel()
        log_event("error", f"kmodtrimd: cannot start: {exc.message}", error=True)
        return 1
    if observe and daemon.live:
        daemon.start_uevent_listener()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    release_memory()
    sd_notify("READY=1", f"STATUS=idle (generation {daemon.current_generation})")
    log.info("kmodtrimd %s ready on the %s bus (root %s, generation %d)",
             __version__, bus, root, daemon.current_generation)
    disconnected = asyncio.ensure_future(connection.wait_for_disconnect())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({disconnected, stopping}, return_when=asyncio.FIRST_COMPLETED)
    sd_notify("STOPPING=1", "STATUS=stopping")
    if watchdog is not None:
        watchdog.cancel()
    daemon.close()
    job = daemon.job
    if job is not None:
        daemon.cancel(job)
        await job.finished.wait()
    connection.disconnect()
    for task in (disconnected, stopping):
        task.cancel()
    return 0 if stopping.done() and not disconnected.done() else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmodtrimd", description="kmodtrim's D-Bus service (run by systemd).")
    parser.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                        help="serve an image root instead of the live system")
    parser.add_argument("--bus", choices=["system", "session"], default="system",
                        help="the bus to claim org.kmodtrim.KmodTrim1 on (default: system)")
    parser.add_argument("--no-observe", action="store_true",
                        help="do not record loaded modules nor listen to kernel uevents")
    parser.add_argument("--debug", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"kmodtrimd {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kmodtrimd``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="kmodtrimd: %(message)s", stream=sys.stderr)
    if not args.root.is_dir():
        print(f"kmodtrimd: error: --root {args.root}: not a directory", file=sys.stderr)
        return 2
    started = time.monotonic()
    status = asyncio.run(serve(args.root, args.bus, not args.no_observe))
    log.debug("ran for %.1f s", time.monotonic() - started)
    return status


if __name__ == "__main__":
    sys.exit(main())
