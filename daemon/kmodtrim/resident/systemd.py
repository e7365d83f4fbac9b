"""systemd's side of the daemon: sd_notify, structured journal messages, the watchdog
interval, and giving memory back. Each is a no-op (or stderr logging) outside systemd."""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger("kmodtrim.daemon")

# One fixed MESSAGE_ID per kind of event, so `journalctl MESSAGE_ID=…` finds them all.
MESSAGE_IDS = {
    "trim": "5e2ebba6714c47f18ba7a7ef1dc7ed0c",
    "restore": "1cba284e2d1b4f908ab2124f771309a8",
    "rollback": "866a40a447d14568bf1161d8c0a7f7f1",
    "kernel-install": "3a0af944b1e740f0896733f498825fe0",
    "error": "78f0466ff63c4c71aefe3c383115d2dd",
    "self-heal": "1af01a0c7a424d05a2691782ac6f090f",
    "on-demand": "c3e2a1f6b9d84f0e8a51d7b2e4c90a67",  # restored for modprobe's install line
}


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


def watchdog_interval() -> float | None:
    """How often to ping the watchdog (half of ``WATCHDOG_USEC``), or None when systemd
    asks for no pings (or asks another process)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


def release_memory() -> None:
    """Give freed heap back to the system: what start-up used (recovery, the snapshot, the
    policy and generation reads), or a burst of read calls: the daemon idles for days."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
