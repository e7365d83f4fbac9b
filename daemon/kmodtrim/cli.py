"""The ``kmodtrim`` command line. Thin: parses, calls operations, prints.

Exit status: 0 success, 1 the operation failed, 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from . import __version__, salvage
from .errors import InputError, KmodtrimError
from .executor import (
    Options,
    Outcome,
    apply_plan,
    recover,
    restore_modules,
    rollback,
)
from .names import is_valid_kernel_version, normalize
from .operations import (
    Target,
    boot_id,
    explain,
    explanation_json,
    gather_evidence,
    generation_summary,
    human_bytes,
    kernel_event,
    load_index,
    load_target_policy,
    make_plan_for,
)
from .policy import LoadedPolicy
from .salvage import StateView
from .state.stash import Stash
from .store import (
    forget_restored,
    load_generation,
    operation_lock,
    read_journal,
    read_observations,
    record_observation,
)

log = logging.getLogger("kmodtrim")
TOP_SAVINGS = 15


class UsageExit(Exception):
    """argparse wants to stop with a message and status (kept so main() decides)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageExit(2, f"{self.prog}: error: {message}\n{self.format_usage().rstrip()}")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("KMODTRIM_ROOT", "/")),
                        metavar="DIR", help="operate on an image root instead of the live "
                        "system (default: $KMODTRIM_ROOT, else /)")
    parser.add_argument("--kernel", metavar="KVER",
                        help="kernel version (default: running kernel, else newest installed)")
    parser.add_argument("--observed", type=Path, action="append", default=[], metavar="FILE",
                        help="modules seen loaded: names one per line, '#' comments, "
                        "/proc/modules or lsmod lines (repeatable)")
    parser.add_argument("--policy", type=Path, metavar="FILE",
                        help="policy file to use instead of ROOT/etc/kmodtrim/policy.toml")
    parser.add_argument("--symvers", type=Path, metavar="FILE",
                        help="the kernel's Module.symvers (exported symbols)")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR",
                        help="index cache directory (default ROOT/var/cache/kmodtrim)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--offline", action="store_true",
                        help="never ask a running kmodtrimd; work in this process")
    parser.add_argument("--debug", action="store_true", help="debug log and tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kmodtrim",
        description="Keep installed kernel modules down to what this machine uses.",
    )
    parser.add_argument("--version", action="version", version=f"kmodtrim {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    p = verbs.add_parser("index", help="index the kernel's modules and show a summary")
    _common(p)
    p.add_argument("--rebuild", action="store_true",
                   help="ignore the cache and re-read every module")
    p = verbs.add_parser("plan", help="show what would be kept and removed")
    _common(p)
    p.add_argument("--all", action="store_true", help="list every kept and removed module")
    p = verbs.add_parser("explain", help="why a module is kept or removed")
    _common(p)
    p.add_argument("name", metavar="NAME", help="module name or alias")
    p = verbs.add_parser("observe", help="show what is observed on the root")
    _common(p)
    p.add_argument("--record", action="store_true",
                   help="remember the modules loaded now (for this boot) in the state store")
    p = verbs.add_parser("apply", help="trim: apply the plan as a new generation")
    _common(p)
    _mutating(p)
    p.add_argument("--force", action="store_true",
                   help="trim even before the minimum observation is met")
    p = verbs.add_parser("history", help="list generations")
    _common(p)
    p = verbs.add_parser("show", help="show one generation")
    _common(p)
    p.add_argument("generation", type=int, metavar="GEN")
    p = verbs.add_parser("rollback", help="return to generation GEN (default: undo the latest)")
    _common(p)
    _mutating(p)
    p.add_argument("generation", type=int, nargs="?", metavar="GEN")
    p = verbs.add_parser("restore", help="put modules (and their dependencies) back")
    _common(p)
    _mutating(p)
    p.add_argument("names", nargs="+", metavar="NAME")
    p = verbs.add_parser("status", help="current generation, stash and observation state")
    _common(p)
    p.add_argument("--verify", action="store_true",
                   help="read and hash every stash copy (default: check each is present)")
    p = verbs.add_parser("forget", help="stop keeping modules restored by hand or on demand")
    _common(p)
    p.add_argument("names", nargs="+", metavar="NAME")
    p = verbs.add_parser("kernel-event", help="(for kernel install hooks) a kernel was added "
                         "or removed")
    _common(p)
    p.add_argument("action", choices=["add", "remove"])
    p.add_argument("kver", metavar="KVER")
    p.set_defaults(dry_run=False, yes=True, initramfs="auto", backend=None)
    return parser


def _mutating(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="show what would happen, change nothing")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--initramfs", default="auto",
                        choices=["auto", "skip", "dracut", "update-initramfs", "kernel-install"],
                        help="initramfs generator (default: the policy's, else detected)")
    parser.add_argument("--backend", default=None, choices=["auto", "stash", "dpkg", "rpm"],
                        help="package-manager backend (default: the policy's)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kmodtrim``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageExit as exc:
        print(exc.message, file=sys.stderr)
        return exc.status
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    if args.verb is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(name)s: %(message)s",
    )
    target = Target(
        root=args.root,
        kernel=args.kernel,
        observed_files=tuple(args.observed),
        policy_file=args.policy,
        cache_dir=args.cache_dir,
        symvers=args.symvers,
        use_cache=not args.no_cache,
    )
    try:
        if not args.root.is_dir():
            print(f"kmodtrim: error: --root {args.root}: not a directory", file=sys.stderr)
            return 2
        if args.kernel is not None and not is_valid_kernel_version(args.kernel):
            print(f"kmodtrim: error: --kernel {args.kernel[:80]!r}: not a kernel version",
                  file=sys.stderr)
            return 2
        return int(VERBS[args.verb](args, target, sys.stdout))
    except KmodtrimError as exc:
        if args.debug:
            log.exception("failed")
        print(f"kmodtrim: error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"kmodtrim: hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("kmodtrim: interrupted; " + _state_after_interrupt(target.root), file=sys.stderr)
        return 130
    except (OSError, MemoryError, RecursionError, Exception) as exc:  # never a traceback
        if args.debug:
            log.exception("failed")
        print(f"kmodtrim: error: {_describe_unexpected(exc)}", file=sys.stderr)
        print("kmodtrim: hint: run it again with --debug for the details", file=sys.stderr)
        return 1


def _describe_unexpected(exc: BaseException) -> str:
    """One line for an error no layer turned into a KmodtrimError."""
    if isinstance(exc, PermissionError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"permission denied{where}: changing the system's modules needs root"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    text = str(exc)
    text = text if len(text) <= 200 else text[:197] + "…"
    return f"unexpected {type(exc).__name__}: {text}" if text else \
        f"unexpected {type(exc).__name__}"


def _state_after_interrupt(root: Path) -> str:
    """What an interrupt left: the tree as it was, or an operation to finish or undo."""
    try:
        if read_journal(root) is not None:
            return ("an operation was under way; it is finished or undone by the next "
                    "kmodtrim command that changes something (kmodtrim status shows it)")
    except KmodtrimError:
        return "the journal of the interrupted operation is damaged; run kmodtrim status"
    return "nothing was changed (the tree is as it was)"


def _warn(message: str) -> None:
    """A warning: on stderr, prefixed, so stdout stays the document asked for."""
    print(f"kmodtrim: warning: {message}", file=sys.stderr)


def _warn_state(root: Path) -> StateView:
    """Warn (stderr) when the state is not what its records say: an operation to finish or
    undo, or records rebuilt from the stash. Read-only verbs call it; they never fix it."""
    state = salvage.view(root)
    if state.interrupted:
        _warn(f"an interrupted {state.interrupted} is pending: the tree is part-way; the "
              "next change command finishes or undoes it first (kmodtrim status)")
    for problem in state.problems:
        _warn(problem)
    if state.salvaged:
        _warn("showing the state rebuilt from the stash's own records; the next change "
              "command writes it as a new generation")
    return state


def _dump(doc: Any, out: TextIO) -> None:
    json.dump(doc, out, indent=2, sort_keys=False)
    out.write("\n")


# ---------------------------------------------------------------------------------------
# Verbs


def cmd_index(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    started = time.perf_counter()
    index, stats = load_index(target, rebuild=args.rebuild)
    elapsed = time.perf_counter() - started
    aliases = sum(len(e.info.aliases) for e in index.modules.values())
    doc = {
        "kernel": index.kernel,
        "module_dir": str(index.moddir),
        "modules": len(index.modules),
        "builtins": len(index.builtins),
        "aliases": aliases,
        "total_bytes": index.total_bytes(),
        "kernel_exports": len(index.kernel_exports),
        "kernel_exports_source": index.kernel_exports_source,
        "files": stats.files,
        "parsed": stats.parsed,
        "cached": stats.cached,
        "seconds": round(elapsed, 3),
        "parse_errors": [str(e) for e in index.parse_errors],
    }
    if args.json:
        _dump(doc, out)
    else:
        print(f"kernel {index.kernel}: {len(index.modules)} modules "
              f"({human_bytes(index.total_bytes())}), {len(index.builtins)} builtins, "
              f"{aliases} aliases", file=out)
        print(f"kernel exports: {len(index.kernel_exports)} symbols, "
              f"{index.kernel_exports_source}", file=out)
        print(f"read {stats.parsed} files, {stats.cached} from cache, in {elapsed:.2f} s", file=out)
        for err in index.parse_errors:
            _warn(str(err))
    return 1 if index.parse_errors else 0


def _print_plan(doc: dict[str, Any], out: TextIO, show_all: bool) -> None:
    """Human output of a plan document (plan.to_json(), local or from the daemon)."""
    totals = doc["totals"]
    total = doc["total_bytes"] or 1
    print(f"kernel {doc['kernel']} (root {doc['root']})", file=out)
    print(f"  keep   {totals['keep_modules']:5d} modules  {human_bytes(doc['keep_bytes']):>10}",
          file=out)
    print(f"  remove {totals['remove_modules']:5d} modules  "
          f"{human_bytes(doc['remove_bytes']):>10}  "
          f"({100 * doc['remove_bytes'] / total:.1f}% of {human_bytes(doc['total_bytes'])})",
          file=out)
    if doc["firmware_remove"]:
        print(f"  firmware: remove {totals['firmware_remove_files']} files "
              f"({human_bytes(totals['firmware_remove_bytes'])})", file=out)
    roots: Counter[str] = Counter()
    for m in doc["keep"]:
        first = m["reasons"][0]
        roots[first["kind"] if first["via"] is None else "dependency"] += 1
    print("  kept because: " + ", ".join(f"{k} {n}" for k, n in roots.most_common()), file=out)
    if doc["unresolved_symbols"]:
        print(f"  SYMBOL CHECK FAILED: {len(doc['unresolved_symbols'])} unresolved symbols",
              file=out)
    else:
        print("  symbol check: every kept module's symbols resolve "
              f"(kernel exports: {doc['kernel_exports_source']})", file=out)
    for warning in doc["warnings"]:
        _warn(warning)
    biggest = sorted(doc["remove"], key=lambda m: int(m["size"]), reverse=True)
    shown = biggest if show_all else biggest[:TOP_SAVINGS]
    if shown:
        print(f"\n{'biggest savings' if not show_all else 'remove'}:", file=out)
        for r in shown:
            print(f"  {human_bytes(r['size']):>10}  {r['name']}", file=out)
        if len(biggest) > len(shown):
            print(f"  … and {len(biggest) - len(shown)} more (--all lists them)", file=out)
    if show_all:
        print("\nkeep:", file=out)
        for k in doc["keep"]:
            print(f"  {human_bytes(k['size']):>10}  {k['name']}: {k['reasons'][0]['text']}",
                  file=out)


def cmd_plan(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    _warn_state(target.root)
    doc = _daemon().plan(_remote_options(args)) if _via_daemon(args) else \
        make_plan_for(target).plan.to_json()
    if args.json:
        _dump(doc, out)
    else:
        _print_plan(doc, out, args.all)
    return 0


def cmd_explain(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    _warn_state(target.root)
    if _via_daemon(args):
        doc = _daemon().explain(args.name, _remote_options(args))
    else:
        doc = explanation_json(explain(make_plan_for(target), args.name))
    if args.json:
        _dump({k: v for k, v in doc.items() if k != "lines"}, out)
    else:
        print("\n".join(doc["lines"]), file=out)
    return 0


def cmd_observe(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    evidence = gather_evidence(target)
    if args.record:
        current = boot_id(target.root)
        if current == "offline":
            raise InputError(f"--record: {target.root} is not a running system (it has no "
                             "boot id), so there is no boot to record",
                             hint="give observations of that image's VMs with --observed")
        record_observation(target.root, current, [o.name for o in evidence.loaded])
    index = None
    try:
        index, _ = load_index(target)
    except KmodtrimError:
        index = None  # observing works without a module tree; matching needs one
    devices = []
    for dev in evidence.devices:
        drivers = index.match_alias(dev.modalias) if index is not None else []
        devices.append({"devpath": dev.devpath, "modalias": dev.modalias, "drivers": drivers})
    doc = {
        "root": str(target.root),
        "kernel": index.kernel if index is not None else None,
        "loaded": [o.name for o in evidence.loaded],
        "observed": [{"name": o.name, "source": o.source, "line": o.line}
                     for o in evidence.observed],
        "devices": devices,
        "filesystems": [{"type": f.fstype, "mountpoint": f.mountpoint, "source": f.source}
                        for f in evidence.filesystems],
        "root_drivers": [{"module": d.module, "mountpoint": d.mountpoint, "devpath": d.devpath}
                         for d in evidence.root_drivers],
    }
    if args.json:
        _dump(doc, out)
        return 0
    print(f"loaded now: {len(evidence.loaded)} modules", file=out)
    if evidence.loaded:
        print("  " + " ".join(o.name for o in evidence.loaded), file=out)
    if evidence.observed:
        print(f"observed (from files): {len(evidence.observed)} modules", file=out)
    matched = [d for d in devices if d["drivers"]]
    print(f"devices with a modalias: {len(devices)}, matched by a module: {len(matched)}",
          file=out)
    for d in matched:
        print(f"  {d['modalias']}: {', '.join(d['drivers'])}", file=out)
    print("filesystems: " + ", ".join(sorted({f.fstype for f in evidence.filesystems})), file=out)
    for drv in evidence.root_drivers:
        print(f"storage driver of {drv.mountpoint}: {drv.module}", file=out)
    return 0


def _progress(step: str, done: int, total: int) -> None:
    if total >= 50 and (done == total or done % max(total // 20, 1) == 0):
        print(f"\r  {step}: {done}/{total}", end="\n" if done == total else "",
              file=sys.stderr, flush=True)


def _options(args: argparse.Namespace, policy: LoadedPolicy | None) -> Options:
    backend = args.backend or (policy.settings.backend if policy is not None else "auto")
    return Options(
        dry_run=args.dry_run,
        force=getattr(args, "force", False),
        initramfs=args.initramfs,
        backend=backend,
        progress=_progress if sys.stderr.isatty() and not args.json else None,
    )


def _confirm(args: argparse.Namespace, question: str) -> bool:
    if args.yes or args.dry_run:
        return True
    if not sys.stdin.isatty():
        raise InputError(f"{question}: refusing without --yes when not on a terminal",
                         hint="review with --dry-run, then pass --yes")
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")


def _print_outcome(outcome: Outcome, args: argparse.Namespace, out: TextIO, root: Path) -> None:
    if args.json:
        doc = outcome.to_json()
        doc["stash_bytes_on_disk"] = Stash(root).size_on_disk()
        _dump(doc, out)
        return
    verb = "would" if outcome.dry_run else "did"
    print(f"{verb} take out {len(outcome.stash)} files and put back {len(outcome.restore)}",
          file=out)
    if outcome.dry_run:
        for path in outcome.stash[:20]:
            print(f"  - {path}", file=out)
        for path in outcome.restore[:20]:
            print(f"  + {path}", file=out)
        more = len(outcome.stash) + len(outcome.restore) - 40
        if more > 0:
            print(f"  … {more} more (--json lists all)", file=out)
    for note in outcome.notes:
        print(note, file=out)
    for line in outcome.damaged:
        _warn(f"not put back: {line}")
    if outcome.generation is not None:
        g = outcome.generation
        print(f"generation {g.number}: {g.description}", file=out)
        print(f"out of the tree now: {len(g.removed)} files ({human_bytes(g.removed_bytes)}); "
              f"stash on disk {human_bytes(Stash(root).size_on_disk())}", file=out)
        for kernel, entry in g.regen.items():
            initramfs = entry.get("initramfs") or {}
            state = initramfs.get("image") or initramfs.get("skipped") or "skipped"
            print(f"kernel {kernel}: depmod done, initramfs: {state}", file=out)


# Verbs that go through kmodtrimd when it runs on the live system, so admin tools and
# the CLI share one job slot, one lock holder and one log.
_DAEMON_VERBS = frozenset({"plan", "explain", "history", "apply", "rollback", "restore",
                           "kernel-event"})
_SYSTEM_BUS_SOCKET = Path("/run/dbus/system_bus_socket")


def _daemon() -> Any:
    from .dbus import client

    return client


def _via_daemon(args: argparse.Namespace) -> bool:
    """True when this verb should be a request to a running kmodtrimd: a daemon serves
    the same root, and no option is given that the daemon does not take."""
    if (args.offline or args.verb not in _DAEMON_VERBS
            or args.cache_dir or args.symvers or args.no_cache):
        return False
    if args.verb == "kernel-event" and (args.observed or args.policy):
        return False  # KernelEvent takes neither: the daemon uses what it has
    if not (os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or _SYSTEM_BUS_SOCKET.exists()):
        return False
    cached = getattr(args, "_daemon_root", None)
    if cached is None:
        try:
            client = _daemon()
            served = client.manager_properties()["Root"] if client.daemon_running() else ""
        except Exception:  # no bus, no dbus-next, an older daemon: run in-process
            served = ""
        args._daemon_root = cached = served
    return bool(cached) and Path(cached).resolve() == args.root.resolve()


def _remote_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "kernel": args.kernel,
        "observed": [str(p.resolve()) for p in args.observed] or None,
        "policy": str(args.policy.resolve()) if args.policy else None,
    }


def _remote_progress(args: argparse.Namespace) -> Callable[[str, float], None] | None:
    if args.json or not sys.stderr.isatty():
        return None

    def show(phase: str, fraction: float) -> None:
        print(f"\r  {phase}: {100 * fraction:3.0f}%", end="", file=sys.stderr, flush=True)

    return show


def _print_remote_outcome(doc: dict[str, Any], args: argparse.Namespace, out: TextIO) -> None:
    if args.json:
        _dump(doc, out)
        return
    verb = "would" if doc.get("dry_run") else "did"
    print(f"{verb} take out {len(doc.get('stash', []))} files and put back "
          f"{len(doc.get('restore', []))} (kmodtrimd job {doc.get('job')})", file=out)
    for note in doc.get("notes", []):
        print(note, file=out)
    if doc.get("generation") is not None:
        print(f"generation {doc['generation']}", file=out)


def _recover(args: argparse.Namespace, target: Target) -> None:
    """Finish or undo an interrupted operation (or write rebuilt state) before a change;
    a dry run only says what would be done first."""
    if getattr(args, "dry_run", False):
        state = _warn_state(target.root)
        if state.interrupted or state.salvaged:
            _warn("--dry-run: that recovery is not done now; the plan below is from the "
                  "state as it will be after it")
        return
    done = recover(target.root)
    if done:
        print(f"kmodtrim: {done}", file=sys.stderr)


def cmd_apply(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    if _via_daemon(args):
        doc = _daemon().plan(_remote_options(args))
        if not args.json:
            _print_plan(doc, out, False)
            print(file=out)
        if not _confirm(args, f"remove {len(doc['remove'])} modules "
                              f"({human_bytes(doc['remove_bytes'])}) from kernel "
                              f"{doc['kernel']}?"):
            print("nothing changed", file=out)
            return 1
        opts = {**_remote_options(args), "force": args.force, "dry_run": args.dry_run,
                "initramfs": args.initramfs, "backend": args.backend}
        _print_remote_outcome(_daemon().trim(opts, _remote_progress(args)), args, out)
        return 0
    _recover(args, target)
    result = make_plan_for(target)
    plan = result.plan
    if not args.json:
        _print_plan(plan.to_json(), out, False)
        print(file=out)
    options = _options(args, result.policy)
    if not _confirm(args, f"remove {len(plan.remove)} modules "
                          f"({human_bytes(plan.remove_bytes)}) from kernel {plan.kernel}?"):
        print("nothing changed", file=out)
        return 1
    outcome = apply_plan(target.root, plan, result.index, result.evidence, result.policy, options)
    _print_outcome(outcome, args, out, target.root)
    return 1 if outcome.damaged else 0


def cmd_rollback(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    _recover(args, target)
    to = args.generation
    if to is not None:
        load_generation(target.root, to)  # fail early on a bad number
    which = str(to) if to is not None else "before the latest"
    if not _confirm(args, f"roll back to generation {which}?"):
        print("nothing changed", file=out)
        return 1
    if _via_daemon(args):
        opts = {"dry_run": args.dry_run, "initramfs": args.initramfs, "backend": args.backend}
        _print_remote_outcome(_daemon().rollback(to, opts, _remote_progress(args)), args, out)
        return 0
    outcome = rollback(target.root, to, _options(args, None))
    _print_outcome(outcome, args, out, target.root)
    return 1 if outcome.damaged else 0


def cmd_restore(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    if _via_daemon(args):
        opts = {"kernel": args.kernel, "dry_run": args.dry_run, "initramfs": args.initramfs,
                "backend": args.backend}
        doc = _daemon().restore(args.names, opts, _remote_progress(args))
        _print_remote_outcome(doc, args, out)
        return 0
    _recover(args, target)
    index, _ = load_index(target)
    outcome = restore_modules(target.root, args.names, index, _options(args, None))
    _print_outcome(outcome, args, out, target.root)
    return 1 if outcome.damaged else 0


def cmd_history(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    _warn_state(target.root)
    gens = _daemon().list_generations() if _via_daemon(args) else \
        generation_summary(target.root)
    if args.json:
        _dump(gens, out)
        return 0
    for g in gens:
        mark = "*" if g["current"] else " "
        print(f"{mark}{g['generation']:4d}  {g['created'] or '-':24}  {g['action']:9}  "
              f"{g['removed_files']:5d} files {human_bytes(g['removed_bytes']):>10} out  "
              f"{g['description']}", file=out)
    return 0


def cmd_show(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    g = load_generation(target.root, args.generation)
    if args.json:
        _dump(g.to_json(), out)
        return 0
    print(f"generation {g.number} ({g.action}, {g.created or 'as installed'}): {g.description}",
          file=out)
    print(f"  out of the tree: {len(g.removed)} files, {human_bytes(g.removed_bytes)}", file=out)
    print(f"  this generation took out {len(g.stashed)} and put back {len(g.restored)} files",
          file=out)
    for verb, names in (("removed", g.packages_removed), ("reinstalled", g.packages_reinstalled)):
        if names:
            print(f"  this generation {verb} package(s): {', '.join(names)}", file=out)
    for p in g.packages:
        print(f"  package out of the system: {p.name} {p.version} ({len(p.files)} files "
              "in the stash)", file=out)
    for kernel, entry in g.regen.items():
        print(f"  kernel {kernel}: {json.dumps(entry, sort_keys=True)}", file=out)
    return 0


def cmd_status(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    state = salvage.view(target.root)
    g = state.generation
    boots = read_observations(target.root)
    stash = Stash(target.root)
    if args.verify:
        damaged = [f"{why}" for _entry, why in stash.verify(g.removed)]
    else:
        damaged = [f"stash copy of {f.path} is missing" for f in g.removed
                   if not stash.has_copy(f)]
    if state.interrupted:
        pending: str | None = (f"an interrupted {state.interrupted}: the tree is part-way; the "
                               "next change command (apply, rollback, restore) first finishes "
                               "or undoes it")
    elif state.salvaged:
        pending = (f"the state was rebuilt from the stash's own records as generation "
                   f"{g.number}; the next change command writes it")
    else:
        pending = None
    stash_bytes = stash.size_on_disk()
    doc = {
        "generation": g.number,
        "removed_files": len(g.removed),
        "removed_bytes": g.removed_bytes,
        "stash_bytes_on_disk": stash_bytes,
        "observed_boots": len(boots),
        "interrupted_operation": state.interrupted is not None,
        "pending": pending,
        "problems": list(state.problems),
        "damaged": damaged,
        "verified": bool(args.verify),
    }
    if args.json:
        _dump(doc, out)
    else:
        print(f"generation {g.number}: {g.description}", file=out)
        print(f"  {len(g.removed)} files ({human_bytes(g.removed_bytes)}) out of the tree, "
              f"stash {human_bytes(stash_bytes)} on disk", file=out)
        print(f"  observed boots: {len(boots)}", file=out)
        if pending:
            print(f"  PENDING: {pending}", file=out)
        for problem in state.problems:
            print(f"  problem: {problem}", file=out)
        if damaged:
            print(f"  DAMAGED: {len(damaged)} stash cop{'y' if len(damaged) == 1 else 'ies'} "
                  "cannot be restored:", file=out)
            for line in damaged[:20]:
                print(f"    {line}", file=out)
            if len(damaged) > 20:
                print(f"    … and {len(damaged) - 20} more (--json lists all)", file=out)
        elif args.verify:
            print("  every stash copy verified", file=out)
    return 1 if damaged else 0


def cmd_forget(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    """Stop keeping modules for having been restored (later plans may trim them again)."""
    names = {normalize(n) for n in args.names}
    with operation_lock(target.root, f"forget {' '.join(sorted(names))}"):
        known = forget_restored(target.root, names)
    for name in sorted(names):
        state = "no longer kept for being restored" if name in known else \
            "was not kept for being restored"
        print(f"{name}: {state}", file=out)
    return 0


def cmd_kernel_event(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    """A kernel was installed or removed. Added kernels are trimmed like the ones before
    them (or, in auto mode, once observation suffices); removed ones are forgotten.

    With kmodtrimd serving this root the event is handed to it and this returns at once:
    the daemon handles it after the package manager's transaction (which is running the
    hook that called us) has finished. Without a daemon (image builds) it runs here."""
    if _via_daemon(args):
        opts = {"initramfs": args.initramfs, "backend": args.backend}
        pending = _daemon().kernel_event(args.action, args.kver, opts)
        if args.json:
            _dump({"queued": True, "action": args.action, "kernel": args.kver,
                   "pending": pending}, out)
        else:
            what = "trims" if args.action == "add" else "forgets the stash of"
            print(f"kmodtrimd {what} kernel {args.kver} once the package manager has "
                  f"finished ({pending} kernel event(s) queued)", file=out)
        return 0
    _recover(args, target)
    policy = load_target_policy(target)
    outcome = kernel_event(target, args.action, args.kver, _options(args, policy))
    _print_outcome(outcome, args, out, target.root)
    return 1 if outcome.damaged else 0


VERBS = {
    "kernel-event": cmd_kernel_event,
    "index": cmd_index,
    "plan": cmd_plan,
    "explain": cmd_explain,
    "observe": cmd_observe,
    "apply": cmd_apply,
    "history": cmd_history,
    "show": cmd_show,
    "rollback": cmd_rollback,
    "restore": cmd_restore,
    "status": cmd_status,
    "forget": cmd_forget,
}


if __name__ == "__main__":
    sys.exit(main())
