"""``kmodtrim restore --on-demand NAME``: what the ``install`` lines of kmodtrim's own
modprobe.d file run (kmodtrim/ondemand.py) when modprobe — the kernel's request_module,
udev or a person — asks for a trimmed module.

It restores NAME with its closure (through kmodtrimd when it serves the root: one job;
in-process otherwise, under the same lock), records it as requested by modprobe (later
plans keep it), logs it with its MESSAGE_ID and loads it with ``modprobe
--ignore-install NAME``. On an image root it loads nothing: it asks ``modprobe -n`` of the
root's tree instead (a dry load proving depmod knows the module again).

It never hangs its caller: a running operation is waited for at most LOCK_WAIT seconds,
then it fails with one line. The restore itself runs with Options.on_demand: the package
manager's lock (needed only to reinstall a package removed whole; a stash restore needs
none, so modprobe run by a package's own scripts still works) is waited for 3 s at most,
an archive download may stall 10 s and take 2 minutes at most; a held lock, an archive
that does not answer or a missing stash copy is one line, and the restore is undone.
The initramfs is not rebuilt (a module modprobe asks for after boot was trimmed, so it
is in no image); the next change rebuilds it.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..documents import SCHEMA
from ..errors import (
    BusyError,
    CommandError,
    InputError,
    KmodtrimError,
    StashError,
    UnknownModuleError,
)
from ..ondemand import REQUESTED_BY
from . import remote, render
from .term import Console

LOCK_WAIT = 5.0  # seconds a running operation is waited for
LOAD_TIMEOUT = 60.0

T = TypeVar("T")


def _waiting(call: Callable[[], T], name: str) -> T:
    """``call()``, retried while another operation holds the lock, for LOCK_WAIT seconds
    at most; then BusyError saying NAME was not restored."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            return call()
        except BusyError as exc:
            if time.monotonic() >= deadline:
                raise BusyError(f"{name} not restored for modprobe: {exc.message} (waited "
                                f"{LOCK_WAIT:g} s)",
                                hint=f"run 'modprobe {name}' again once it has finished"
                                ) from None
            time.sleep(0.2)


def _via_daemon(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """One Restore job in kmodtrimd with the option on_demand: the job itself records
    that modprobe asked (and the daemon counts and signals it so)."""
    options = remote.options(args, "Restore")
    options["initramfs"] = args.initramfs if args.initramfs != "auto" else "skip"
    options["on_demand"] = True
    # Back as soon as the job's outcome is out: the daemon's re-reading of its state
    # afterwards is nothing modprobe needs to wait for.
    doc = _waiting(lambda: remote.client().restore([name], options, None, settled=False),
                   name)
    return remote.complete_outcome(doc)


def _in_process(args: argparse.Namespace, name: str) -> tuple[dict[str, Any] | None, str]:
    """Restore NAME here (None when it is in the tree already); and the kernel."""
    from .. import usecases
    from ..executor import Options
    from ..operations import load_index
    from .read import target

    tgt = target(args)
    index, _ = load_index(tgt, save_cache=False)  # the restore changes the tree
    names = [name] if name in index.modules else index.resolve(name)
    if not names:
        raise UnknownModuleError(f"kernel {index.kernel} has no module {name!r}",
                                 hint="modprobe asked kmodtrim for a name its index "
                                      "does not know (kmodtrim explain NAME)")
    if not any(index.modules[n].stashed for n in names if n in index.modules):
        return None, index.kernel
    options = Options(dry_run=args.dry_run,
                      initramfs=args.initramfs if args.initramfs != "auto" else "skip",
                      backend=args.backend or "auto", on_demand=True)
    doc = _waiting(lambda: usecases.restore(tgt, names, options, REQUESTED_BY, index), name)
    return doc, index.kernel


def _modprobe(root: Path, kernel: str) -> list[str]:
    """modprobe for the live root, or for an image root's tree and modprobe.d."""
    from ..paths import is_live_root

    if is_live_root(root):
        return ["modprobe"]
    argv = ["modprobe", "-d", str(root), "-S", kernel]
    conf = root / "etc/modprobe.d"
    return [*argv, "-C", str(conf)] if conf.is_dir() else argv


def _extra(root: Path, kernel: str, name: str, given: list[str]) -> list[str]:
    """The options modprobe gave ($CMDLINE_OPTS) that ``modprobe --ignore-install NAME``
    does not apply by itself (ondemand.extra_options); asks ``modprobe -n -v`` which
    those are, only when there are options."""
    import shlex

    from ..ondemand import extra_options
    from ..run import run

    if not given:
        return []
    shown = run([*_modprobe(root, kernel), "-n", "-v", "--ignore-install", name],
                timeout=LOAD_TIMEOUT, check=False).stdout.strip().splitlines()
    configured = shlex.split(shown[-1])[2:] if shown and shown[-1].startswith("insmod ") \
        else []
    return extra_options(given, configured)


def _load(root: Path, kernel: str, name: str, options: list[str]) -> str:
    """Load NAME with ``options`` (what $CMDLINE_OPTS gave) on the live root; on an image
    root, a dry load of its tree. Returns what was done. Raises CommandError."""
    from ..paths import is_live_root
    from ..run import run

    extra = _extra(root, kernel, name, options)
    if is_live_root(root):
        run(["modprobe", "--ignore-install", name, *extra], timeout=LOAD_TIMEOUT)
        return "loaded"
    argv = [*_modprobe(root, kernel), "-n", "-v", "--ignore-install"]
    done = run([*argv, name, *extra], timeout=LOAD_TIMEOUT)
    shown = done.stdout.strip().splitlines()
    if not shown or not shown[-1].startswith("insmod "):
        raise CommandError(f"{name} was restored, but modprobe -n does not load it from "
                           f"the tree of {kernel}: {' / '.join(shown) or 'no output'}",
                           hint=f"check with: modprobe -n -v -d {root} -S {kernel} {name}")
    return "image root: not loaded; modprobe -n: " + shown[-1]


def _journal(message: str, *, error: bool = False, **fields: object) -> None:
    """The journal line (MESSAGE_ID "on-demand") when the journal is reachable; the
    caller prints its own line either way."""
    from ..resident import systemd

    if systemd._journal_available():
        systemd.log_event("on-demand", message, error=error, **fields)


def restore_on_demand(args: argparse.Namespace, console: Console) -> int:
    from ..names import is_valid_module_name, normalize
    from ..ondemand import is_module_option

    if not is_valid_module_name(args.names[0]):
        raise InputError("restore --on-demand takes one module name (modprobe's install "
                         f"line gives one), not {args.names[0]!r}")
    name, options = normalize(args.names[0]), list(args.names[1:])
    bad = [o for o in options if not is_module_option(o)]
    if bad:
        raise InputError(f"restore --on-demand {name}: {bad[0]!r} is not a module option "
                         "(modprobe's install line gives NAME, then its options)")
    started = time.monotonic()
    kernel = args.kernel
    try:
        if remote.via_daemon(args):
            doc: dict[str, Any] | None = _via_daemon(args, name)
        else:
            doc, kernel = _in_process(args, name)
    except (InputError, BusyError):
        raise  # a bad name, or the running operation waited for: their lines say so
    except KmodtrimError as exc:  # the restore failed and was undone: say for whom
        exc.message = f"{name} not restored for modprobe: {exc.message}"
        _journal(exc.message, error=True, module=name, kernel=kernel)
        raise
    if kernel is None:
        from ..paths import default_kernel

        kernel = default_kernel(args.root)
    damaged = (doc or {}).get("damaged") or []
    if damaged:  # those files stay out (and recorded so): nothing to load
        for why in damaged[1:]:
            console.warn(why)
        _journal(f"{name} not restored for modprobe: {damaged[0]}",
                  error=True, module=name, kernel=kernel)
        raise StashError(f"{name} not restored for modprobe: {damaged[0]}",
                         hint="kmodtrim status --verify names every damaged copy")
    loaded = ("dry run: not loaded" if args.dry_run
              else _load(args.root, kernel, name, options))
    seconds = time.monotonic() - started
    if doc is None:
        line = f"{name} is in the tree of kernel {kernel}: nothing to restore; {loaded}"
    else:
        files = len(doc.get("put_back") or [])
        line = (f"restored {name} for modprobe ({files} file{'s' if files != 1 else ''} "
                f"back, generation {doc.get('generation')}); {loaded} in {seconds:.2f} s")
    if not args.dry_run:
        _journal(line, module=name, kernel=kernel,
                  generation=doc.get("generation") if doc else None)
    if args.json:
        render.dump({**(doc or {"schema": SCHEMA}), "on_demand": {
            "module": name, "kernel": kernel, "load": loaded, "seconds": round(seconds, 3)}},
            console.out)
    elif not console.quiet:
        print(line, file=console.out)
    return 0
