"""A kmodtrimd worker: one job or one read in a process of its own, which exits when done.

The daemon stays small because the index, planner, policy and engine are imported here and
never in the daemon; a crashed worker is a failed job, never a dead daemon. Started by
spawn.py; the protocol is JSON lines:

- stdin: the request (``{"op": …, "root": …, …}``), then ``cancel`` to cancel a job;
- stdout: ``{"progress": [step, done, total]}`` lines (jobs only), then one
  ``{"result": …}`` or ``{"error": {"name": D-Bus error name, "message": …, "hint": …}}``.

Self-healing (``heal``) asks before it changes anything: it loads the index once, answers
``{"matched": {module: modalias}}``, and restores those modules as a job only when told
``go`` (its stdin closing means no).

A cancel is honoured at the engine's next per-file step before its commit point, where the
engine undoes its partial work. Anything else written to stdout (a stray print) goes to
stderr, which is the daemon's (the journal).
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from ..errors import Canceled, KmodtrimError

log = logging.getLogger("kmodtrim.worker")

Report = Callable[[str, int, int], None]
FAILED = KmodtrimError.dbus_name


class _Channel:
    """The protocol's stdout: one JSON document per line, written whole."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def send(self, doc: dict[str, Any]) -> None:
        line = json.dumps(doc) + "\n"
        with self.lock:
            self.stream.write(line)
            self.stream.flush()


class Context:
    """One request: its root and fields, the progress callback of a job, and what the
    daemon said on stdin since (``cancel``, ``go``, or nothing more)."""

    def __init__(self, spec: dict[str, Any], channel: _Channel) -> None:
        self.spec = spec
        self.root = Path(spec["root"])
        self.channel = channel
        self.cancel = threading.Event()
        self.go = threading.Event()
        self.hung_up = threading.Event()
        self.report = _reporter(channel, self.cancel,
                                f"job {spec.get('job')} ({spec.get('type', spec['op'])})")

    def listen(self) -> None:
        """Follow stdin (in a thread of its own) until the daemon closes it."""
        for line in sys.stdin:
            word = line.strip()
            if word == "cancel":
                self.cancel.set()
            elif word == "go":
                self.go.set()
        self.hung_up.set()

    def ask(self, doc: dict[str, Any]) -> bool:
        """Send ``doc`` and wait for ``go`` (True) or the end of stdin (False)."""
        self.channel.send(doc)
        while not self.go.wait(0.5):
            if self.hung_up.is_set():
                return self.go.is_set()
        return True


def _target(root: Path, request: dict[str, Any]) -> Any:
    from ..operations import Target

    return Target(root=root, kernel=request.get("kernel"),
                  observed_files=tuple(Path(p) for p in request.get("observed", ())),
                  policy_file=Path(request["policy"]) if request.get("policy") else None,
                  clouds=tuple(request.get("cloud") or ()))


def _options(request: dict[str, Any], default_backend: str, report: Report) -> Any:
    from ..executor import Options

    return Options(dry_run=bool(request.get("dry_run")), force=bool(request.get("force")),
                   initramfs=request.get("initramfs") or "auto",
                   backend=request.get("backend") or default_backend, progress=report,
                   on_demand=bool(request.get("on_demand")))


def startup(ctx: Context) -> dict[str, Any]:
    """Recover an interrupted operation and snapshot the loaded modules; answers what
    recovery did and this boot's id."""
    from ..executor import recover
    from ..observe import read_proc_modules
    from ..operations import boot_id
    from ..state.observations import record_observation

    done = recover(ctx.root)
    boot = boot_id(ctx.root)
    if ctx.spec.get("observe"):
        names = [o.name for o in read_proc_modules(ctx.root)]
        # A root without /proc/modules (an image) has nothing loaded; recording an empty
        # boot would count towards the minimum observation, so record only real ones.
        if names:
            record_observation(ctx.root, boot, names)
    return {"recovered": done, "boot_id": boot,
            "dropped": [str(p) for p in _drop_booted_previous(ctx.root)]}


def _drop_booted_previous(root: Path) -> list[Path]:
    """The running kernel's previous initramfs, once its replacement has booted (see
    regen.drop_booted_previous); nothing on a root that is not running (no /proc)."""
    from ..regen import drop_booted_previous

    try:
        kernel = (root / "proc/sys/kernel/osrelease").read_text().strip()
        stat = (root / "proc/stat").read_text()
    except OSError:
        return []
    btime = next((float(line.split()[1]) for line in stat.splitlines()
                  if line.startswith("btime ")), None)
    if not kernel or btime is None:
        return []
    return drop_booted_previous(root, kernel, btime)


def auto_trim_due(ctx: Context) -> dict[str, Any]:
    """policy mode = "auto": is a trim of the running (default) kernel due (the minimum
    observation met, the kernel not trimmed yet)? ``mode`` says what the policy says."""
    from ..executor import observation_shortfall
    from ..paths import default_kernel
    from ..planner import Evidence
    from ..policy import load_policy
    from ..store import current_generation

    policy = load_policy(ctx.root)
    mode = policy.settings.mode
    if mode != "auto":
        return {"mode": mode, "due": False}
    kernel = default_kernel(ctx.root)
    if any(f.kind == "module" and f.kernel == kernel
           for f in current_generation(ctx.root).removed):
        return {"mode": mode, "due": False}
    return {"mode": mode,
            "due": observation_shortfall(ctx.root, policy, Evidence()) is None}


def plan(ctx: Context) -> dict[str, Any]:
    from ..operations import make_plan_for
    from ..usecases import plan_document

    return plan_document(make_plan_for(_target(ctx.root, ctx.spec["request"])), ctx.root)


def explain(ctx: Context) -> dict[str, Any]:
    from ..operations import make_plan_for
    from ..usecases import explain_document

    made = make_plan_for(_target(ctx.root, ctx.spec["request"]))
    return explain_document(made, ctx.spec["name"])


def trim(ctx: Context) -> dict[str, Any]:
    from .. import usecases

    result = usecases.plan_for_trim(_target(ctx.root, ctx.spec["request"]))
    if ctx.cancel.is_set():
        raise Canceled(f"job {ctx.spec.get('job')} (trim) was canceled before it changed "
                       "anything")
    options = _options(ctx.spec["request"], result.policy.settings.backend, ctx.report)
    return usecases.apply_trim(result, ctx.root, options)


def rollback(ctx: Context) -> dict[str, Any]:
    from .. import usecases

    options = _options(ctx.spec["request"], "auto", ctx.report)
    return usecases.rollback(ctx.root, ctx.spec.get("to"), options)


def restore(ctx: Context) -> dict[str, Any]:
    """A Restore: by hand, or on demand (modprobe asked: recorded so, in the same job)."""
    from .. import usecases
    from ..ondemand import REQUESTED_BY

    request = ctx.spec["request"]
    options = _options(request, "auto", ctx.report)
    how = REQUESTED_BY if request.get("on_demand") else "restored by hand"
    return usecases.restore(_target(ctx.root, request), list(ctx.spec["names"]), options,
                            how)


def heal(ctx: Context) -> dict[str, Any] | None:
    """Match the devices' modaliases to trimmed modules of the kernel, ask, then restore
    them as a job (None when nothing matched or the daemon said no)."""
    from .. import usecases
    from ..operations import Target, load_index

    target = Target(root=ctx.root, kernel=ctx.spec.get("kernel"))
    index, _ = load_index(target, save_cache=False)  # a restore may follow
    wanted: dict[str, str] = {}
    for modalias in ctx.spec["modaliases"]:
        for name in index.match_alias(modalias):
            if name in index.modules and index.modules[name].stashed:
                wanted.setdefault(name, modalias)
    if not wanted or not ctx.ask({"matched": wanted}):
        return None
    # The device appeared after boot, so the system booted without its driver: the
    # initramfs needs no rebuild before the driver loads (that took minutes under TCG,
    # seconds on hardware, all of it before the disk appeared). The next change rebuilds
    # it, as on-demand restores leave it.
    options = _options({"initramfs": "skip"}, "auto", ctx.report)
    return usecases.restore(target, sorted(wanted), options,
                            "restored for a device that appeared", index=index)


def kernel_event(ctx: Context) -> dict[str, Any]:
    from .. import usecases
    from ..operations import Target, load_target_policy

    event = ctx.spec["event"]
    usecases.recover(ctx.root)
    target = Target(root=ctx.root)
    backend = event.get("backend") or load_target_policy(target).settings.backend
    request = {"initramfs": event.get("initramfs"), "backend": backend}
    doc = usecases.kernel_event(target, event["action"], event["kernel"],
                                _options(request, backend, ctx.report))
    doc["kernel_event"] = event
    return doc


# What each request imports (ahead of its work, see main).
_ENGINE = ("..executor", "..operations")
IMPORTS = {"startup": _ENGINE, "auto-trim-due": _ENGINE, "plan": ("..operations",),
           "explain": ("..operations",), "trim": _ENGINE, "rollback": _ENGINE,
           "restore": _ENGINE, "heal": _ENGINE, "kernel-event": _ENGINE}

OPS: dict[str, Callable[[Context], Any]] = {
    "startup": startup, "auto-trim-due": auto_trim_due, "plan": plan, "explain": explain,
    "trim": trim, "rollback": rollback, "restore": restore, "heal": heal,
    "kernel-event": kernel_event,
}


def _reporter(channel: _Channel, cancel: threading.Event, what: str) -> Report:
    last: list[Any] = [None, -1.0]

    def report(step: str, done: int, total: int) -> None:
        # The engine's cancellation point: raising here makes it undo its partial work.
        if cancel.is_set():
            raise Canceled(f"{what} was canceled; nothing changed")
        fraction = done / total if total else 1.0
        # Only what the daemon would publish: a new step, 1 % more, or the end.
        if step != last[0] or fraction - last[1] >= 0.01 or done == total:
            last[0], last[1] = step, fraction
            channel.send({"progress": [step, done, total]})

    return report


def serve(ctx: Context) -> None:
    """Run one request and send its result or error."""
    try:
        result = OPS[ctx.spec["op"]](ctx)
    except KmodtrimError as exc:
        ctx.channel.send({"error": {"name": exc.dbus_name, "message": exc.message,
                                    "hint": exc.hint}})
    except Exception as exc:  # a bug: keep the traceback in the journal
        traceback.print_exc()
        ctx.channel.send({"error": {
            "name": FAILED, "hint": None,
            "message": f"internal error: {type(exc).__name__}: {exc}"}})
    else:
        ctx.channel.send({"result": result})


def main() -> int:
    """The worker's entry point (see spawn.py). Returns the exit status."""
    channel = _Channel(os.fdopen(os.dup(1), "w", encoding="utf-8"))
    os.dup2(2, 1)  # a stray print must not break the protocol
    logging.basicConfig(level=logging.INFO, format="kmodtrimd worker: %(message)s",
                        stream=sys.stderr)
    line = sys.stdin.readline()
    if not line:
        return 2
    ctx = Context(json.loads(line), channel)
    # Imports are most of a worker's time (self-healing waits for them): the collector
    # finds no garbage among freshly imported modules, so it stays off while they load,
    # and later collections leave them alone.
    gc.disable()
    for module in IMPORTS.get(ctx.spec["op"], ()):
        importlib.import_module(module, __package__)
    gc.freeze()
    gc.enable()
    threading.Thread(target=ctx.listen, daemon=True).start()
    serve(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
