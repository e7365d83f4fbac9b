"""Kernel installs and removals handed over by the hooks (``Manager.KernelEvent``): queued
on disk, then handled one by one as ``kernel-install`` jobs once no other job runs and the
package manager's transaction that installed or removed the kernel has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BusyError, InputError, KmodtrimError
from ..names import is_valid_kernel_version
from ..request import Backend, Initramfs, KernelAction
from ..state.files import atomic_write_json, read_json, state_dir
from .jobs import Events, Job, JobSlot, Request
from .systemd import log_event, sd_notify

log = logging.getLogger("kmodtrim.daemon")

# The queue's file under the state directory.
KERNEL_EVENTS_FILE = "kernel-events.json"
# While an event waits for the package manager, its lock is probed this often (seconds).
PM_PROBE_INTERVAL = 0.5


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
    initramfs: str = Initramfs.AUTO.value
    backend: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "kernel": self.kernel,
                "initramfs": self.initramfs, "backend": self.backend}

    @staticmethod
    def from_json(doc: Any) -> KernelEvent:
        """Raises InputError for a document that is not a valid event."""
        if not isinstance(doc, dict) or doc.get("action") not in tuple(KernelAction):
            raise InputError(f"not a kernel event: {doc!r}")
        initramfs = doc.get("initramfs", Initramfs.AUTO.value)
        backend = doc.get("backend")
        if initramfs not in tuple(Initramfs) or (backend is not None
                                                 and backend not in tuple(Backend)):
            raise InputError(f"not a kernel event: {doc!r}")
        return KernelEvent(str(doc["action"]),
                           check_kernel_version(str(doc.get("kernel", ""))),
                           str(initramfs), backend)


class KernelEventQueue:
    """The queue of one root, persisted in its state directory. Runs in the event loop's
    thread; ``loaded`` is set once start-up recovery is done."""

    def __init__(self, root: Path, slot: JobSlot, events: Events,
                 loaded: asyncio.Event) -> None:
        self.root = root
        self.slot = slot
        self.events = events
        self.loaded = loaded
        self.stopping = False
        self.queued: list[KernelEvent] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> list[str]:
        """Kernel events not handled yet, as "add KVER" / "remove KVER", oldest first."""
        return [f"{e.action} {e.kernel}" for e in self.queued]

    def _path(self) -> Path:
        return state_dir(self.root) / KERNEL_EVENTS_FILE

    def read(self) -> None:
        """Load the events an earlier run had not handled (in a worker thread at start-up).
        A corrupt file is set aside (logged) rather than stopping the daemon."""
        path = self._path()
        try:
            doc = read_json(path)
            if not isinstance(doc, list):
                raise InputError("not a list of kernel events")
            self.queued = [KernelEvent.from_json(item) for item in doc]
        except FileNotFoundError:
            self.queued = []
        except KmodtrimError as exc:
            aside = path.with_name(path.name + ".corrupt")
            with contextlib.suppress(OSError):
                path.replace(aside)
            log_event("error", f"{path}: unreadable pending kernel events ({exc.message}); "
                               f"set aside as {aside.name}; reinstall a kernel's package "
                               "or run `kmodtrim kernel-event add KVER` to hand it over "
                               "again", error=True)
            self.queued = []

    def _save(self, queue: Sequence[KernelEvent]) -> None:
        path = self._path()
        if queue:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, [e.to_json() for e in queue])
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def add(self, action: str, kernel: str, request: Request) -> int:
        """A hook reports that kernel ``kernel`` was installed (``add``) or removed.

        The event is queued (and written to disk before this returns) and handled as a
        ``kernel-install`` job once no other job runs and the package manager's lock is
        free: the hooks call from inside the package transaction that installs the
        kernel, so the trim must wait for it to end, and the caller must not wait for the
        trim. A later event for the same kernel replaces an earlier one still queued.
        Returns the number of queued events. Raises InputError for a bad action or
        version, StoreError/OSError when the queue cannot be written.
        """
        if action not in tuple(KernelAction):
            raise InputError(f"kernel event {action!r}: expected 'add' or 'remove'")
        event = KernelEvent(action, check_kernel_version(kernel), request.initramfs,
                            request.backend)
        queue = [e for e in self.queued if e.kernel != event.kernel] + [event]
        self._save(queue)
        self.queued = queue
        self.events.manager_changed({"PendingKernelEvents": self.pending})
        what = "installed" if action == KernelAction.ADD else "removed"
        log_event("kernel-install", f"kernel {kernel} {what}: queued ({len(queue)} pending)",
                  kernel=kernel)
        self._ensure_worker()
        return len(queue)

    def resume(self) -> None:
        """Start handling the events an earlier run left queued (at start-up)."""
        if self.queued:
            log_event("kernel-install", "resuming queued kernel events: "
                                        + ", ".join(self.pending))
        self._ensure_worker()

    def _ensure_worker(self) -> None:
        if self.queued and (self._task is None or self._task.done()):
            self._task = self.slot.spawn(self._run())

    def _package_manager_busy(self) -> str | None:
        """Why the root's package manager is busy (its lock is held), or None."""
        from ..backends.package import PackageManagerBusy
        from ..backends.select import detect_backend

        try:
            detect_backend(self.root).wait_for_lock(self.root, 0)
        except PackageManagerBusy as exc:
            return exc.message
        return None

    async def _run(self) -> None:
        """Handle queued kernel events in order, each after the running job and after the
        package manager's transaction (probed while an event waits; idle otherwise)."""
        await self.loaded.wait()
        waiting_logged = False
        while self.queued and not self.stopping:
            if self.slot.job is not None:
                await self.slot.job.finished.wait()
                continue
            busy = await asyncio.to_thread(self._package_manager_busy)
            if busy is not None:
                if not waiting_logged:
                    log.info("kernel events wait for the package manager: %s", busy)
                    sd_notify("STATUS=waiting for the package manager to finish")
                    waiting_logged = True
                await asyncio.sleep(PM_PROBE_INTERVAL)
                continue
            waiting_logged = False
            event = self.queued[0]
            try:
                job = self._start_job(event)
            except BusyError:
                continue  # a job started in between: wait for it
            await job.finished.wait()
            if job.result == "canceled" and self.stopping:
                return  # still queued on disk: the next start handles it
            if self.queued and self.queued[0] is event:
                self.queued.pop(0)
                try:
                    await asyncio.to_thread(self._save, list(self.queued))
                except (OSError, KmodtrimError) as exc:
                    # Handled events may run again after a restart: they are idempotent.
                    log_event("error", f"cannot update the kernel event queue: {exc}",
                              error=True)
                self.events.manager_changed({"PendingKernelEvents": self.pending})

    def _start_job(self, event: KernelEvent) -> Job:
        job, _ = self.slot.start("kernel-install", ("kernel-install", event), {
            "op": "kernel-event", "root": str(self.root), "event": event.to_json()})
        log_event("kernel-install", f"kernel {event.kernel}: handling '{event.action}' "
                                    f"(job {job.id})", kernel=event.kernel, job=job.id)
        return job
