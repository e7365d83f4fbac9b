"""``Daemon``: the state and operations of one kmodtrimd, for one root (``/`` or an image
root), over the job slot, the kernel-event queue and the uevent watch.

What needs the index, planner, policy or engine runs in a worker process (worker.py):
start-up recovery and the snapshot of loaded modules, every job, Plan and Explain, the
automatic-trim check and matching devices to trimmed drivers. The daemon itself reads
only its own state (generations, observations). The transport (kmodtrim.dbus) attaches
through ``attach`` and calls the methods here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import KmodtrimError, StoreError
from ..names import normalize
from ..paths import default_kernel
from ..state.history import generation_rows, generation_summary
from ..state.observations import read_observations
from ..state.summary import generation_numbers
from ..store import load_generation
from .jobs import EventRelay, Events, Job, JobSlot, Request
from .kernel_events import KernelEventQueue
from .metrics import (
    TRIM_ACTIONS,
    MetricsState,
    RestoreCounters,
    created_epoch,
    metrics_dir,
    render_metrics,
    stash_bytes,
    write_metrics,
)
from .spawn import Worker, call_worker
from .systemd import log_event, sd_notify
from .watch import Watch

# The policy's files under the root (policy.MAIN_POLICY and DROPIN_DIR, which the daemon
# does not import: the policy module brings pydantic). While none of them changes, a policy
# found in manual mode needs no new automatic-trim check.
POLICY_FILES = ("etc/kmodtrim/policy.toml", "etc/kmodtrim/policy.d")

log = logging.getLogger("kmodtrim.daemon")


class Daemon:
    """State and operations of one kmodtrimd, for one root (``/`` or an image root)."""

    def __init__(self, root: Path, *, observe: bool = True,
                 metrics: Path | None = None) -> None:
        self.root = root
        self.live = root.resolve() == Path("/")
        self.observe = observe
        self.metrics_dir = metrics_dir(root, metrics, self.live)
        self.restores = RestoreCounters()
        self._heal_jobs: set[int] = set()  # restore jobs self-healing started
        self._last_trim: float | None = None
        self._last_trim_known = False
        self.events = EventRelay()
        self.loaded = asyncio.Event()  # set when start-up (recovery, snapshot) is done
        self.slot = JobSlot(self.events, self._settle)
        self.kernel_events = KernelEventQueue(root, self.slot, self.events, self.loaded)
        self.watch = Watch(self)
        self._generation = 0
        self._observed_since = 0
        self._trimmed: frozenset[str] = frozenset()  # stashed modules of the default kernel
        self._manual_policy: object = None  # the policy files' stamp when last manual
        self.boot_id = "offline"  # read at start-up (observations are recorded per boot)

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
        """Recover an interrupted operation, snapshot the loaded modules (in a worker),
        read the state. Runs in a thread before READY=1. Returns what recovery did, if
        anything. Raises KmodtrimError when that fails."""
        answer = call_worker({"op": "startup", "root": str(self.root),
                              "observe": self.observe})
        done: str | None = answer.get("recovered")
        self.boot_id = str(answer["boot_id"])
        if done:
            log_event("error", f"start-up recovery: {done}", error=False)
        for image in answer.get("dropped", ()):
            log.info("the new initramfs has booted: dropped the previous one, %s", image)
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
            # Its summary, not its manifest: kmodtrimd never holds thousands of records.
            summary = generation_summary(self.root, generation_numbers(self.root)[-1])
        except StoreError as exc:
            log_event("error", f"cannot read the current generation: {exc}", error=True)
            return {}
        self._generation = int(summary["generation"])
        boots = read_observations(self.root)
        self._observed_since = int(min(
            (float(b.get("first_seen", 0)) for b in boots.values()), default=0))
        self._write_metrics(summary, len(boots))
        trimmed = summary["kernels"].get(self.kernel_release)
        self._trimmed = frozenset(trimmed["modules"] if trimmed else ())
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
            self.events.generation_new(self._generation)
        return changed

    def _write_metrics(self, summary: dict[str, Any], boots: int) -> None:
        """The node_exporter textfile (metrics.py), if a directory is set; ``summary``:
        the current generation's."""
        if self.metrics_dir is None:
            return
        if summary["action"] in TRIM_ACTIONS:
            self._last_trim, self._last_trim_known = created_epoch(summary["created"]), True
        elif not self._last_trim_known:  # once: the latest trim before a rollback/restore
            for number in reversed(generation_numbers(self.root)[:-1]):
                with contextlib.suppress(StoreError):
                    earlier = generation_summary(self.root, number)
                    if earlier["action"] in TRIM_ACTIONS:
                        self._last_trim = created_epoch(earlier["created"])
                        break
            self._last_trim_known = True
        write_metrics(self.metrics_dir, render_metrics(MetricsState(
            summary, stash_bytes(self.root), boots, self._last_trim, self.restores)))

    async def _settle(self) -> dict[str, object]:
        # After each job, before it is removed: count its restores for the metrics, and
        # say which modules modprobe asked for came back (their jobs end after this).
        job = self.slot.job
        requested: list[str] = []
        if job is not None and job.type == "restore" and job.result == "done" \
                and not job.outcome.get("dry_run") and isinstance(job.key, tuple):
            names, request = list(job.key[1]), job.key[2]
            if job.id in self._heal_jobs:
                self.restores.self_heal += len(names)
            elif isinstance(request, Request) and request.on_demand:
                self.restores.on_demand += len(names)
                requested = names
            else:
                self.restores.by_hand += len(names)
        if job is not None:
            self._heal_jobs.discard(job.id)
        changed = await self.refresh()
        generation = job.outcome.get("generation") if job is not None else None
        for name in requested:
            self.events.module_requested(name, int(generation or self._generation))
        sd_notify(f"STATUS=idle (generation {self._generation})")
        return changed

    # -- read-only operations (run in a thread that may block) ----------------------

    def plan(self, request: Request) -> dict[str, Any]:
        """The plan for ``request`` as ``kmodtrim plan --json`` (made by a worker). Raises
        KmodtrimError on bad input."""
        doc: dict[str, Any] = call_worker({"op": "plan", "root": str(self.root),
                                           "request": request.to_json()})
        return doc

    def explain(self, name: str, request: Request) -> dict[str, Any]:
        """Why ``name`` is kept or removed (by a worker). Raises UnknownModuleError."""
        doc: dict[str, Any] = call_worker({"op": "explain", "root": str(self.root),
                                           "name": name, "request": request.to_json()})
        return doc

    def list_generations(self) -> list[dict[str, Any]]:
        """Every generation, oldest first (``kmodtrim history --json``'s rows). Raises
        StoreError."""
        return generation_rows(self.root)

    def show_generation(self, number: int) -> dict[str, Any]:
        """Raises NoSuchGenerationError."""
        doc: dict[str, Any] = load_generation(self.root, number).to_json()
        return doc

    # -- jobs ------------------------------------------------------------------------

    def cancel(self, job: Job) -> None:
        """Ask ``job`` to stop at its next cancellation point (see jobs.py)."""
        self.slot.cancel(job)

    def trim(self, request: Request) -> tuple[Job, bool]:
        """Plan and apply (``kmodtrim apply``) as a job. Raises BusyError."""
        return self.slot.start("trim", ("trim", request), {
            "op": "trim", "root": str(self.root), "request": request.to_json()})

    def rollback(self, to: int | None, request: Request) -> tuple[Job, bool]:
        """Roll back to generation ``to`` (None: undo the latest). Raises BusyError,
        NoSuchGenerationError (before starting a job)."""
        if to is not None:
            generation_summary(self.root, to)  # fail early on a bad number
        return self.slot.start("rollback", ("rollback", to, request), {
            "op": "rollback", "root": str(self.root), "to": to,
            "request": request.to_json()})

    def restore(self, names: Sequence[str], request: Request,
                worker: Worker | None = None) -> tuple[Job, bool]:
        """Put modules (with closure and firmware) back as a job (``worker``: a self-heal
        worker waiting to do it). Raises BusyError; the job fails with UnknownModuleError
        for a name the kernel does not know."""
        key = ("restore", tuple(sorted(normalize(n) for n in names)), request)
        job, started = self.slot.start("restore", key, {
            "op": "restore", "root": str(self.root), "names": list(names),
            "request": request.to_json()}, worker)
        if started and worker is not None:
            self._heal_jobs.add(job.id)
        return job, started

    def kernel_event(self, action: str, kernel: str, request: Request) -> int:
        """Queue a kernel install or removal (see KernelEventQueue.add)."""
        return self.kernel_events.add(action, kernel, request)

    # -- policy mode "auto" ----------------------------------------------------------

    def _policy_stamp(self) -> object:
        """What changes when a policy file is written, added or removed."""
        main, dropins = (self.root / name for name in POLICY_FILES)
        try:
            paths = [main, *sorted(dropins.iterdir())]
        except OSError:
            paths = [main]
        stamps: list[tuple[str, tuple[int, int, int] | None]] = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append((str(path), None))
                continue
            stamps.append((str(path), (st.st_ino, st.st_size, st.st_mtime_ns)))
        return tuple(stamps)

    def _auto_trim_due(self) -> bool:
        """policy mode = "auto": trim the running (default) kernel once the minimum
        observation is met, if it has not been trimmed yet (asked of a worker, unless the
        policy files are as they were when the policy was last found manual)."""
        stamp = self._policy_stamp()
        if stamp == self._manual_policy:
            return False
        try:
            answer = call_worker({"op": "auto-trim-due", "root": str(self.root)})
        except KmodtrimError as exc:
            log_event("error", f"auto mode: cannot decide whether to trim: {exc.message}",
                      error=True)
            return False
        self._manual_policy = stamp if answer.get("mode") != "auto" else None
        return bool(answer.get("due"))

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
