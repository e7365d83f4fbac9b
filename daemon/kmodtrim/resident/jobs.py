"""The job slot: one operation at a time, each run in a worker process of its own
(spawn.py, worker.py); an identical request joins the running job, a different one is
Busy. Also the request a job is made from, and the events the D-Bus layer publishes.

Cancellation is honoured at the engine's next per-file step before its commit point (the
worker's progress callback raises Canceled there), where the engine undoes the partial
work itself; a job past that point finishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import BusyError, Canceled, KmodtrimError
from .spawn import Worker, run_worker
from .systemd import MESSAGE_IDS, log_event, release_memory

log = logging.getLogger("kmodtrim.daemon")

# Progress goes 0 → 0.1 while planning, 0.1 → 0.9 over the engine's per-file steps, then
# 1.0. PropertiesChanged is emitted only for steps of at least 1 %.
PROGRESS_MIN_STEP = 0.01


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
    cloud: tuple[str, ...] = ()  # platforms whose drivers to keep (); the policy's
    on_demand: bool = False  # a Restore modprobe asked for (restore --on-demand)

    def to_json(self) -> dict[str, Any]:
        """The request as a worker takes it (worker.py)."""
        return {"kernel": self.kernel, "observed": [str(p) for p in self.observed],
                "policy": str(self.policy) if self.policy else None, "force": self.force,
                "dry_run": self.dry_run, "initramfs": self.initramfs,
                "backend": self.backend, "cloud": list(self.cloud),
                "on_demand": self.on_demand}


@dataclass(eq=False)
class Job:
    """One running (or just finished) operation. Owned by the event loop's thread."""

    id: int
    type: str  # "trim", "rollback", "restore", "kernel-install"
    key: Hashable  # identical requests have equal keys and join this job
    phase: str = "queued"
    progress: float = 0.0
    result: str = ""  # "" while running, then "done", "failed" or "canceled"
    error: str = ""  # D-Bus error name when failed
    error_message: str = ""
    outcome: dict[str, Any] = field(default_factory=dict)
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class Events(Protocol):
    """What the D-Bus layer publishes. Every call happens in the event loop's thread."""

    def job_new(self, job: Job) -> None: ...
    def job_changed(self, job: Job, changed: Mapping[str, object]) -> None: ...
    def job_removed(self, job: Job) -> None: ...
    def generation_new(self, number: int) -> None: ...
    def module_restored(self, name: str, modalias: str, generation: int) -> None: ...
    def module_requested(self, name: str, generation: int) -> None: ...
    def manager_changed(self, changed: Mapping[str, object]) -> None: ...


class NoEvents:
    """Events nobody listens to (before a transport is attached, and in tests)."""

    def job_new(self, job: Job) -> None: pass
    def job_changed(self, job: Job, changed: Mapping[str, object]) -> None: pass
    def job_removed(self, job: Job) -> None: pass
    def generation_new(self, number: int) -> None: pass
    def module_restored(self, name: str, modalias: str, generation: int) -> None: pass
    def module_requested(self, name: str, generation: int) -> None: pass
    def manager_changed(self, changed: Mapping[str, object]) -> None: pass


class EventRelay:
    """Passes events on to ``target``, which the composition root sets once the transport
    exists; the daemon's rooms hold the relay from the start."""

    def __init__(self) -> None:
        self.target: Events = NoEvents()

    def job_new(self, job: Job) -> None:
        self.target.job_new(job)

    def job_changed(self, job: Job, changed: Mapping[str, object]) -> None:
        self.target.job_changed(job, changed)

    def job_removed(self, job: Job) -> None:
        self.target.job_removed(job)

    def generation_new(self, number: int) -> None:
        self.target.generation_new(number)

    def module_restored(self, name: str, modalias: str, generation: int) -> None:
        self.target.module_restored(name, modalias, generation)

    def module_requested(self, name: str, generation: int) -> None:
        self.target.module_requested(name, generation)

    def manager_changed(self, changed: Mapping[str, object]) -> None:
        self.target.manager_changed(changed)


class JobSlot:
    """The one job running at a time. ``settle`` runs after each job, before the job is
    removed: it re-reads the daemon's state and returns the Manager properties that
    changed."""

    def __init__(self, events: Events,
                 settle: Callable[[], Awaitable[dict[str, object]]]) -> None:
        self.events = events
        self.settle = settle
        self.job: Job | None = None
        self.loading = True  # no job starts before start-up recovery is done
        self._next_id = 1
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, kind: str, key: Hashable, spec: dict[str, Any],
              worker: Worker | None = None) -> tuple[Job, bool]:
        """Start the worker request ``spec`` (worker.py) as a job, or join the running job
        if its key equals ``key``. Returns (job, started). ``worker`` is one already
        running that waits for ``go`` (self-healing). Raises BusyError for a different
        request or while starting up."""
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
        job = Job(self._next_id, kind, key)
        self._next_id += 1
        self.job = job
        self.events.job_new(job)
        self.events.manager_changed({"State": "busy"})
        self.spawn(self._run(job, {**spec, "job": job.id, "type": kind}, worker))
        return job, True

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Run ``coro`` as a task the slot keeps a reference to until it ends."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel(self, job: Job) -> None:
        """Ask ``job`` to stop at its next cancellation point."""
        if not job.result:
            job.cancel.set()
            self._set_progress(job, "canceling", job.progress)

    def _reporter(self, job: Job) -> Callable[[str, int, int], None]:
        last = [0.0]

        def report(step: str, done: int, total: int) -> None:
            value = 0.1 + 0.8 * (done / total if total else 1.0)
            if value - last[0] >= PROGRESS_MIN_STEP or done == total:
                last[0] = value
                self._set_progress(job, step, value)

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

    async def _run(self, job: Job, spec: dict[str, Any], worker: Worker | None) -> None:
        self._set_progress(job, "planning", 0.0)
        try:
            if worker is None:
                job.outcome = await run_worker(spec, self._reporter(job), job.cancel)
            else:
                await worker.send("go")
                job.outcome = await worker.finish(self._reporter(job), job.cancel)
            job.result = "done"
        except Canceled as exc:
            job.result, job.error, job.error_message = "canceled", exc.dbus_name, exc.message
        except KmodtrimError as exc:
            job.result, job.error = "failed", exc.dbus_name
            job.error_message = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
        except Exception as exc:  # a bug: keep the traceback in the log
            log.exception("job %d (%s) failed", job.id, job.type)
            job.result, job.error = "failed", KmodtrimError.dbus_name
            job.error_message = f"internal error: {type(exc).__name__}: {exc}"
        job.phase = "finished"
        job.progress = 1.0
        _log_result(job)
        self.events.job_changed(job, {
            "Phase": job.phase, "Progress": job.progress, "Result": job.result,
            "Error": job.error, "ErrorMessage": job.error_message,
        })
        changed = await self.settle()
        self.job = None
        job.finished.set()
        self.events.job_removed(job)
        self.events.manager_changed({"State": "idle", **changed})
        # The worker's outcome was parsed here and sent on: give that heap back, the
        # daemon may now idle for days.
        release_memory()


def _log_result(job: Job) -> None:
    if job.result == "done":
        kind = job.type if job.type in MESSAGE_IDS else "error"
        what = "would change" if job.outcome.get("dry_run") else "changed"
        log_event(kind, f"{job.type} job {job.id} done: {what} "
                        f"{len(job.outcome.get('taken_out', []))} files out, "
                        f"{len(job.outcome.get('put_back', []))} back",
                  generation=job.outcome.get("generation"), job=job.id)
    else:
        log_event("error", f"{job.type} job {job.id} {job.result}: {job.error_message}",
                  error=job.result == "failed", job=job.id)
