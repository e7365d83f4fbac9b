"""Observation and self-healing, driven by the kernel's uevents (no polling).

A module ``add`` is recorded as observed on this boot; a device ``add`` whose MODALIAS
matches a trimmed driver (a worker matches it against the kernel's index) gets that driver
restored (a ``restore`` job), depmod'ed and, on a live system, loaded. New observations
may make an automatic trim due (policy mode ``auto``). The netlink socket is read by the
event loop: it is the only thing that wakes an idle daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import Protocol

from ..errors import BusyError, KmodtrimError
from ..state.observations import HowSeen, record_observation
from ..uevent import parse_uevent
from .jobs import Events, Job, JobSlot, Request
from .spawn import Worker
from .systemd import log_event

log = logging.getLogger("kmodtrim.daemon")

NETLINK_KOBJECT_UEVENT = 15  # not in Python's socket module
UEVENT_KERNEL_GROUP = 1
UEVENT_BUFFER = 64 * 1024


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


class Resident(Protocol):
    """What watching needs of the daemon (kmodtrim.resident.core.Daemon)."""

    root: Path
    live: bool
    loaded: asyncio.Event
    slot: JobSlot
    boot_id: str  # this boot's, as observations record it

    @property
    def events(self) -> Events: ...

    @property
    def kernel_release(self) -> str: ...
    @property
    def current_generation(self) -> int: ...
    @property
    def trimmed(self) -> frozenset[str]: ...
    def restore(self, names: list[str], request: Request,
                worker: Worker | None = None) -> tuple[Job, bool]: ...
    def refresh(self) -> Awaitable[dict[str, object]]: ...
    def maybe_auto_trim(self) -> Awaitable[None]: ...


class Watch:
    """The uevent socket, observation and self-healing of one daemon."""

    def __init__(self, daemon: Resident) -> None:
        self.daemon = daemon
        self.revision = 0  # counts kernel uevents: devices and modules come and go
        self._pending_modules: set[str] = set()
        self._observation_task: asyncio.Task[None] | None = None
        self._pending_aliases: dict[str, None] = {}
        self._heal_task: asyncio.Task[None] | None = None
        self.socket: socket.socket | None = None

    # -- the socket --------------------------------------------------------------------

    def listen(self) -> bool:
        """Listen to the kernel's uevents. Returns False, logged, when the socket cannot
        be opened (e.g. in a container without the netlink family)."""
        try:
            sock = open_uevent_socket()
        except OSError as exc:
            log_event("error", f"not listening to kernel uevents: {exc}; device "
                               "self-healing and module observation after start are off",
                      error=True)
            return False
        asyncio.get_running_loop().add_reader(sock.fileno(), self.read, sock)
        self.socket = sock
        log.debug("listening to kernel uevents (netlink port %s, fd %d)",
                  sock.getsockname()[0], sock.fileno())
        return True

    def read(self, sock: socket.socket) -> None:
        """Handle every datagram waiting on ``sock`` (the event loop calls this)."""
        while True:
            try:
                payload = sock.recv(UEVENT_BUFFER)
            except BlockingIOError:
                return
            except OSError as exc:  # ENOBUFS: the kernel dropped events; keep going
                log.warning("uevent socket: %s", exc)
                return
            self.handle(payload)

    def close(self) -> None:
        if self.socket is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.socket.fileno())
            self.socket.close()
            self.socket = None

    # -- events ------------------------------------------------------------------------

    def handle(self, payload: bytes) -> None:
        """Act on one kernel uevent datagram (the socket reader and tests both call this).

        Module ``add`` → recorded as observed on this boot. Device ``add`` with a MODALIAS
        whose driver is trimmed → restored (self-heal). Anything else is ignored.
        Must be called in the event loop's thread.
        """
        event = parse_uevent(payload)
        if event is None:
            return
        log.debug("uevent %s %s%s", event.action, event.devpath,
                  f" ({event.modalias})" if event.modalias else "")
        self.revision += 1
        module = event.module_loaded
        if module is not None:
            self._pending_modules.add(module)
            if self._observation_task is None or self._observation_task.done():
                self._observation_task = self.daemon.slot.spawn(self._flush_observations())
            return
        if event.action == "add" and event.modalias and self.daemon.trimmed:
            self._pending_aliases[event.modalias] = None
            if self._heal_task is None or self._heal_task.done():
                self._heal_task = self.daemon.slot.spawn(self._heal())

    async def _flush_observations(self) -> None:
        # A burst of module loads is written once, not once per module; after start-up,
        # which knows the boot they belong to.
        await self.daemon.loaded.wait()
        root = self.daemon.root
        while self._pending_modules:
            names = sorted(self._pending_modules)
            self._pending_modules.clear()
            try:
                await asyncio.to_thread(record_observation, root, self.daemon.boot_id,
                                        names, None, HowSeen.UEVENT)
            except (OSError, KmodtrimError) as exc:
                log_event("error", f"cannot record observed modules {names}: {exc}",
                          error=True)
        changed = await self.daemon.refresh()
        if changed:
            self.daemon.events.manager_changed(changed)
        await self.daemon.maybe_auto_trim()

    # -- self-healing ------------------------------------------------------------------

    async def _heal(self) -> None:
        daemon = self.daemon
        while self._pending_aliases:
            await daemon.loaded.wait()
            while daemon.slot.job is not None:
                # The device is still there after the running job: wait for it.
                await daemon.slot.job.finished.wait()
            if not daemon.trimmed:
                self._pending_aliases.clear()
                return
            modaliases = list(self._pending_aliases)
            self._pending_aliases.clear()
            try:
                await self._heal_devices(modaliases)
            except KmodtrimError as exc:
                log_event("error", f"self-heal: cannot restore the trimmed drivers of "
                                   f"{', '.join(modaliases)}: {exc}", error=True)

    async def _heal_devices(self, modaliases: list[str]) -> None:
        """One worker matches the devices to trimmed drivers and, if any, restores them as
        a job (the index loaded once). Raises KmodtrimError when it cannot match."""
        daemon = self.daemon
        worker = await Worker.start({"op": "heal", "root": str(daemon.root),
                                     "kernel": daemon.kernel_release or None,
                                     "modaliases": modaliases})
        kind, wanted = await worker.receive()
        log.debug("self-heal: %s: %s", ", ".join(modaliases),
                  ", ".join(sorted(wanted or ())) or "no trimmed driver")
        if kind != "matched" or not wanted:
            await worker.close()
            return
        names = sorted(wanted)
        try:
            job, started = daemon.restore(
                names, Request(kernel=daemon.kernel_release or None), worker)
        except BusyError:
            await worker.close()
            for modalias in modaliases:
                self._pending_aliases[modalias] = None  # retried after the running job
            return
        if not started:
            await worker.close()  # the same restore is running: it serves this device
        await job.finished.wait()
        if job.result != "done":
            log_event("error", f"self-heal: restoring {', '.join(names)} for "
                               f"{', '.join(sorted(set(wanted.values())))} failed: "
                               f"{job.error_message}", error=True)
            return
        # The device needs these from now on: a later plan (a re-trim, the next kernel)
        # must keep them even if loading them below fails or the device goes away.
        try:
            await asyncio.to_thread(record_observation, daemon.root, daemon.boot_id, names,
                                    None, HowSeen.MODALIAS)
        except (OSError, KmodtrimError) as exc:
            log_event("error", f"self-heal: cannot record {names} as observed: {exc}",
                      error=True)
        generation = daemon.current_generation
        for name in names:
            loaded = ""
            if daemon.live:
                loaded = await asyncio.to_thread(_load_module, name)
            log_event("self-heal", f"device {wanted[name]} appeared: restored {name}"
                                   f"{loaded} (generation {generation})",
                      generation=generation, module=name, modalias=wanted[name])
            daemon.events.module_restored(name, wanted[name], generation)


def _load_module(name: str) -> str:
    """modprobe ``name``; what to add to the self-heal message."""
    from ..run import run

    done = run(["modprobe", name], check=False)
    return " and loaded" if done.returncode == 0 else \
        f"; modprobe failed: {done.stderr.strip()[-200:]}"

