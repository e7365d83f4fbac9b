"""``Daemon``: the state and operations of one kmodtrimd, for one root (``/`` or an image
root), over the job slot, the kernel-event queue and the uevent watch.

A thin shell around the library calls the CLI makes (operations, executor, store), which
are imported when a job or a read call first needs them. Start-up (``load``): recover an
interrupted operation, snapshot the loaded modules, read the state. The transport
(kmodtrim.dbus) attaches through ``attach`` and calls the methods here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import Canceled, KmodtrimError, StoreError
from ..names import normalize
from ..paths import default_kernel
from ..store import current_generation, load_generation, read_observations
from .jobs import EventRelay, Events, Job, JobSlot, Report, Request, Work
from .kernel_events import KernelEventQueue
from .systemd import log_event, sd_notify
from .watch import Watch

if TYPE_CHECKING:
    from ..executor import Options
    from ..operations import PlanResult

log = logging.getLogger("kmodtrim.daemon")


class Daemon:
    """State and operations of one kmodtrimd, for one root (``/`` or an image root)."""

    def __init__(self, root: Path, *, observe: bool = True) -> None:
        self.root = root
        self.live = root.resolve() == Path("/")
        self.observe = observe
        self.events = EventRelay()
        self.loaded = asyncio.Event()  # set when start-up (recovery, snapshot) is done
        self.slot = JobSlot(self.events, self._settle)
        self.kernel_events = KernelEventQueue(root, self.slot, self.events, self.loaded)
        self.watch = Watch(self)
        self._generation = 0
        self._observed_since = 0
        self._trimmed: frozenset[str] = frozenset()  # stashed modules of the default kernel

    def attach(self, events: Events) -> None:
        """Publish this daemon's events through ``events`` (the transport's)."""
        self.events.target = events

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
    def job(self) -> Job | None:
        return self.slot.job

    @property
    def state(self) -> str:
        return "busy" if self.slot.loading or self.slot.job is not None else "idle"

    @property
    def current_generation(self) -> int:
        return self._generation

    @property
    def observed_since(self) -> int:
        return self._observed_since

    @property
    def trimmed(self) -> frozenset[str]:
        """The stashed modules of the default kernel (what self-healing can restore)."""
        return self._trimmed

    @property
    def revision(self) -> int:
        """Counts kernel uevents: devices and modules come and go."""
        return self.watch.revision

    @property
    def pending_kernel_events(self) -> list[str]:
        return self.kernel_events.pending

    # -- start-up --------------------------------------------------------------------

    def load(self) -> str | None:
        """Recover an interrupted operation, snapshot the loaded modules, read the state.
        Runs in a worker thread before READY=1. Returns what recovery did, if anything."""
        from ..executor import recover
        from ..observe import read_proc_modules
        from ..store import record_observation
        from .watch import boot_id

        done = recover(self.root)
        if done:
            log_event("error", f"start-up recovery: {done}", error=False)
        if self.observe:
            names = [o.name for o in read_proc_modules(self.root)]
            # A root without /proc/modules (an image) has nothing loaded; recording an empty
            # boot would count towards the minimum observation, so record only real ones.
            if names:
                record_observation(self.root, boot_id(self.root), names)
        self.kernel_events.read()
        self._refresh_state()
        return done

    async def started(self) -> None:
        """Start-up is done: open the job slot, resume queued kernel events, and trim if
        policy mode ``auto`` says it is due."""
        self.slot.loading = False
        self.loaded.set()
        self.events.manager_changed({"State": self.state})
        self.kernel_events.resume()
        await self.maybe_auto_trim()

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

    async def refresh(self) -> dict[str, object]:
        """Re-read the state (after a job or new observations); returns the Manager
        properties that changed. A new generation is signalled here."""
        changed = await asyncio.to_thread(self._refresh_state)
        if "CurrentGeneration" in changed:
            self.watch.forget_index()
            self.events.generation_new(self._generation)
        return changed

    async def _settle(self) -> dict[str, object]:
        # After each job, before it is removed.
        changed = await self.refresh()
        sd_notify(f"STATUS=idle (generation {self._generation})")
        return changed

    # -- read-only operations (run in a worker thread) -------------------------------

    def make_plan(self, request: Request) -> PlanResult:
        """The plan for ``request``. Raises KmodtrimError on bad input."""
        from ..operations import make_plan_for

        return make_plan_for(request.target(self.root))

    def plan(self, request: Request, made: PlanResult | None = None) -> dict[str, Any]:
        """The plan for ``request`` (``made`` if made already) as ``kmodtrim plan --json``."""
        doc: dict[str, Any] = (made or self.make_plan(request)).plan.to_json()
        return doc

    def explain(self, name: str, request: Request,
                made: PlanResult | None = None) -> dict[str, Any]:
        """Why ``name`` is kept or removed. Raises UnknownModuleError."""
        from ..operations import explain, explanation_json

        doc: dict[str, Any] = explanation_json(explain(made or self.make_plan(request), name))
        return doc

    def list_generations(self) -> list[dict[str, Any]]:
        from ..operations import generation_summary

        return generation_summary(self.root)

    def show_generation(self, number: int) -> dict[str, Any]:
        """Raises NoSuchGenerationError."""
        doc: dict[str, Any] = load_generation(self.root, number).to_json()
        return doc

    # -- jobs ------------------------------------------------------------------------

    def start_job(self, kind: str, key: Hashable, work: Work) -> tuple[Job, bool]:
        """Start ``work`` as a job, or join the running job if its key equals ``key``.
        Returns (job, started). Raises BusyError for a different request."""
        return self.slot.start(kind, key, work)

    def cancel(self, job: Job) -> None:
        """Ask ``job`` to stop at its next cancellation point (see jobs.py)."""
        self.slot.cancel(job)

    def trim(self, request: Request) -> tuple[Job, bool]:
        """Plan and apply (``kmodtrim apply``) as a job. Raises BusyError."""
        root = self.root

        def work(job: Job, report: Report) -> dict[str, Any]:
            from ..executor import apply_plan, recover

            recover(root)
            result = self.make_plan(request)
            if job.cancel.is_set():
                raise Canceled(f"job {job.id} (trim) was canceled before it changed anything")
            options = _options(request, result.policy.settings.backend, report)
            doc: dict[str, Any] = apply_plan(root, result.plan, result.index, result.evidence,
                                             result.policy, options).to_json()
            return doc

        return self.slot.start("trim", ("trim", request), work)

    def rollback(self, to: int | None, request: Request) -> tuple[Job, bool]:
        """Roll back to generation ``to`` (None: undo the latest). Raises BusyError,
        NoSuchGenerationError (before starting a job)."""
        root = self.root
        if to is not None:
            load_generation(root, to)  # fail early on a bad number

        def work(job: Job, report: Report) -> dict[str, Any]:
            from ..executor import recover, rollback

            recover(root)
            doc: dict[str, Any] = rollback(root, to, _options(request, "auto", report)).to_json()
            return doc

        return self.slot.start("rollback", ("rollback", to, request), work)

    def restore(self, names: Sequence[str], request: Request) -> tuple[Job, bool]:
        """Put modules (with closure and firmware) back as a job. Raises BusyError; the
        job fails with UnknownModuleError for a name the kernel does not know."""
        root = self.root
        key = ("restore", tuple(sorted(normalize(n) for n in names)), request)

        def work(job: Job, report: Report) -> dict[str, Any]:
            from ..executor import recover, restore_modules
            from ..operations import load_index

            recover(root)
            index, _ = load_index(request.target(root))
            doc: dict[str, Any] = restore_modules(
                root, list(names), index, _options(request, "auto", report)).to_json()
            return doc

        return self.slot.start("restore", key, work)

    def kernel_event(self, action: str, kernel: str, request: Request) -> int:
        """Queue a kernel install or removal (see KernelEventQueue.add)."""
        return self.kernel_events.add(action, kernel, request)

    # -- policy mode "auto" ----------------------------------------------------------

    def _auto_trim_due(self) -> bool:
        """policy mode = "auto": trim the running (default) kernel once the minimum
        observation is met, if it has not been trimmed yet."""
        from ..executor import observation_shortfall
        from ..planner import Evidence
        from ..policy import load_policy

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
        if self.slot.job is not None or not await asyncio.to_thread(self._auto_trim_due):
            return
        try:
            job, _ = self.trim(Request())
        except KmodtrimError as exc:
            log_event("error", f"auto mode: trim not started: {exc.message}", error=True)
            return
        log_event("trim", f"auto mode: minimum observation met, trimming (job {job.id})")

    # -- uevents ---------------------------------------------------------------------

    def handle_uevent(self, payload: bytes) -> None:
        """Act on one kernel uevent datagram (see Watch.handle)."""
        self.watch.handle(payload)

    def start_uevent_listener(self) -> bool:
        """Listen to the kernel's uevents (live root). False, logged, when refused."""
        return self.watch.listen()

    def close(self) -> None:
        """Stop listening and let queued kernel events wait for the next start."""
        self.kernel_events.stopping = True
        self.watch.close()


def _options(request: Request, default_backend: str, report: Report) -> Options:
    from ..executor import Options

    return Options(dry_run=request.dry_run, force=request.force,
                   initramfs=request.initramfs,
                   backend=request.backend or default_backend, progress=report)
