"""``kmodtrimd``: the composition root of the daemon. It builds the resident daemon
(kmodtrim.resident: job slot, kernel-event queue, observation and self-healing; its jobs
and heavy reads run in worker processes) and its D-Bus transport (kmodtrim.dbus.service),
wires one to the other, and runs them.

Start-up order: claim the bus name, listen to uevents, then recover an interrupted
operation and snapshot the loaded modules, then ``READY=1``. Idle means idle: no timer
runs except the watchdog ping (only when systemd asks for one with ``WATCHDOG_USEC``).

Stopping (SIGTERM/SIGINT): a running job is asked to cancel. Cancellation is honoured at
the engine's next per-file step before its commit point, where the engine undoes the
partial work itself (the same code crash recovery runs); a job past that point finishes.
The daemon waits for the worker, then exits. If it is killed instead, the engine's
write-ahead journal lets the next start finish or undo the operation.

This module imports asyncio, dbus-next and the daemon's rooms only when it runs them, so
that ``main`` can keep ssl out first (see there).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import KmodtrimError
from .resident.systemd import (
    MESSAGE_IDS,
    log_event,
    release_memory,
    sd_notify,
    watchdog_interval,
)

if TYPE_CHECKING:
    from .dbus.service import DaemonConnection
    from .resident.core import Daemon

__all__ = ["MESSAGE_IDS", "build_parser", "main", "serve", "start"]

log = logging.getLogger("kmodtrim.daemon")


async def start(root: Path, bus: str, observe: bool, metrics: Path | None = None
                ) -> tuple[Daemon, DaemonConnection]:
    """Build the daemon, connect it to the bus and claim the name, listen to the kernel's
    uevents (live root, ``observe``), then load (recover, snapshot observations). Returns
    the loaded daemon and its connection. Raises KmodtrimError (bus unreachable, name
    taken, state unreadable)."""
    import asyncio

    from .dbus.service import connect
    from .resident.core import Daemon

    daemon = Daemon(root, observe=observe, metrics=metrics)
    connection = await connect(daemon, bus)
    if observe and daemon.live:
        # Before start-up's work, which runs in workers and takes a while: a device that
        # appears meanwhile waits in the socket, and is healed once start-up is done.
        daemon.start_uevent_listener()
    sd_notify("STATUS=recovering and snapshotting observations")
    try:
        await asyncio.to_thread(daemon.load)
    except BaseException:
        daemon.close()
        connection.disconnect()
        raise
    await daemon.started()
    return daemon, connection


async def serve(root: Path, bus: str, observe: bool, metrics: Path | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the exit status."""
    import asyncio

    loop = asyncio.get_running_loop()
    # Ping from the start: with Type=dbus systemd counts us started once the name is
    # ours, and the first index of a large tree may take longer than WatchdogSec.
    interval = watchdog_interval()
    watchdog: asyncio.TimerHandle | None = None
    if interval:
        def ping() -> None:
            nonlocal watchdog
            sd_notify("WATCHDOG=1")
            watchdog = loop.call_later(interval, ping)
        ping()
    try:
        daemon, connection = await start(root, bus, observe, metrics)
    except KmodtrimError as exc:
        if watchdog is not None:
            watchdog.cancel()
        log_event("error", f"kmodtrimd: cannot start: {exc.message}", error=True)
        return 1
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
    parser.add_argument("--metrics-dir", type=Path, metavar="DIR",
                        help="write node_exporter textfile metrics (kmodtrim.prom) here "
                             "(default for the live root: /var/lib/prometheus/node-exporter "
                             "if it exists; an image root's daemon writes none unless given)")
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
    # kmodtrimd speaks no TLS, but asyncio imports ssl for those who do, which maps
    # OpenSSL's libssl into a daemon that idles for days (about 4 MiB). With None in
    # sys.modules that import fails, which asyncio expects; workers are not affected.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    import asyncio

    started = time.monotonic()
    status = asyncio.run(serve(args.root, args.bus, not args.no_observe, args.metrics_dir))
    log.debug("ran for %.1f s", time.monotonic() - started)
    return status


if __name__ == "__main__":
    sys.exit(main())
