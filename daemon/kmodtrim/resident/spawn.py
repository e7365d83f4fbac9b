"""Running worker processes (worker.py) from the daemon: one per job or read, answering
with JSON lines. A worker that dies without answering is a failed request, named with its
exit status; the daemon lives on. (A self-heal worker answers twice: the trimmed drivers
a device needs, then, told ``go``, the restore job's result; see watch.py.)

The worker is started with the daemon's own interpreter and told where this kmodtrim
package lies, so it imports the same code however the daemon was installed (a site
directory, ``pip --target`` with a wrapper that extends ``sys.path``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import Canceled, KmodtrimError

log = logging.getLogger("kmodtrim.daemon")

PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent.parent)
_BOOT = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
         "from kmodtrim.resident.worker import main; sys.exit(main())")
WORKER_ARGV = (sys.executable, "-c", _BOOT, PACKAGE_PARENT)
# A protocol line is one JSON document: big for a plan of thousands of modules.
LINE_LIMIT = 256 * 1024 * 1024

Progress = Callable[[str, int, int], None]


class WorkerError(KmodtrimError):
    """What a worker reported: the error its request raised, with that error's D-Bus
    name (so callers and the CLI see the same error as in-process)."""

    def __init__(self, name: str, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.dbus_name = name


def _error(doc: dict[str, Any]) -> KmodtrimError:
    name = str(doc.get("name") or KmodtrimError.dbus_name)
    message = str(doc.get("message") or "the worker failed")
    hint = doc.get("hint")
    if name == Canceled.dbus_name:
        return Canceled(message, hint=hint)
    return WorkerError(name, message, hint)


def _died(spec: dict[str, Any], status: int | None) -> KmodtrimError:
    if status is not None and status < 0:
        how = f"was killed by signal {signal.Signals(-status).name}"
    else:
        how = f"exited with status {status} without an answer"
    return KmodtrimError(f"kmodtrimd's worker for {spec['op']} {how}",
                         hint="the journal has its messages (journalctl -u kmodtrimd)")


def _answer(doc: Any, spec: dict[str, Any], progress: Progress | None
            ) -> tuple[str, Any] | None:
    """(kind, value) for an answer (``result`` or ``matched``); None for progress (given
    to ``progress``). Raises the error a worker sends."""
    if not isinstance(doc, dict) or len(doc) != 1:
        raise KmodtrimError(f"kmodtrimd's worker for {spec['op']} answered {doc!r}")
    ((kind, value),) = doc.items()
    if kind == "progress":
        if progress is not None:
            step, done, total = value
            progress(str(step), int(done), int(total))
        return None
    if kind == "error":
        raise _error(value)
    return kind, value


class Worker:
    """One running worker process and its request."""

    def __init__(self, proc: asyncio.subprocess.Process, spec: dict[str, Any]) -> None:
        self.proc = proc
        self.spec = spec

    @classmethod
    async def start(cls, spec: dict[str, Any]) -> Worker:
        """Start a worker on ``spec``. Raises KmodtrimError when it cannot start."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *WORKER_ARGV, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=None, cwd="/", limit=LINE_LIMIT)
        except OSError as exc:
            raise KmodtrimError(f"cannot start kmodtrimd's worker: {exc}") from exc
        worker = cls(proc, spec)
        await worker.send(json.dumps(spec))
        return worker

    async def send(self, line: str) -> None:
        """Send one line (the request, ``cancel``, ``go``). A worker that is gone is
        noticed by ``receive``."""
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.proc.stdin.write(line.encode() + b"\n")
            await self.proc.stdin.drain()

    async def receive(self, progress: Progress | None = None) -> tuple[str, Any]:
        """The worker's next answer as (kind, value), its progress given to ``progress``
        meanwhile. Raises the error it sends, or KmodtrimError when it dies."""
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise _died(self.spec, await self.proc.wait())
            answer = _answer(json.loads(line), self.spec, progress)
            if answer is not None:
                return answer

    async def finish(self, progress: Progress | None = None,
                     cancel: asyncio.Event | None = None) -> Any:
        """The worker's result; setting ``cancel`` asks it to stop meanwhile. Raises the
        request's error (Canceled when canceled), or KmodtrimError when it dies."""
        async def cancel_when_asked() -> None:
            assert cancel is not None
            await cancel.wait()
            await self.send("cancel")

        canceling = asyncio.ensure_future(cancel_when_asked()) if cancel else None
        try:
            while True:
                kind, value = await self.receive(progress)
                if kind == "result":
                    return value
        finally:
            if canceling is not None:
                canceling.cancel()
            await self.close()

    async def close(self) -> None:
        """Close its stdin (a worker waiting for ``go`` stops) and wait for its exit."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()


async def run_worker(spec: dict[str, Any], progress: Progress | None = None,
                     cancel: asyncio.Event | None = None) -> Any:
    """Run ``spec`` in a worker and return its result; ``progress`` gets its progress and
    setting ``cancel`` asks it to stop. Raises the request's error (Canceled when
    canceled), or KmodtrimError when the worker cannot start or dies."""
    worker = await Worker.start(spec)
    return await worker.finish(progress, cancel)


def call_worker(spec: dict[str, Any]) -> Any:
    """``run_worker`` for a read, from a thread that may block (no progress, no cancel).
    Raises the request's error, or KmodtrimError when the worker cannot start or dies."""
    try:
        proc = subprocess.run(WORKER_ARGV, input=json.dumps(spec) + "\n",
                              stdout=subprocess.PIPE, stderr=None, text=True, cwd="/",
                              check=False)
    except OSError as exc:
        raise KmodtrimError(f"cannot start kmodtrimd's worker: {exc}") from exc
    for line in proc.stdout.splitlines():
        answer = _answer(json.loads(line), spec, None)
        if answer is not None and answer[0] == "result":
            return answer[1]
    raise _died(spec, proc.returncode)
