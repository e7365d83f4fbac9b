"""The verbs that change nothing in the tree: status, history, show, plan, explain,
observe, index (and forget, which only changes what later plans keep). Each imports what
it uses when it runs, so the quick ones start quickly."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, TextIO

from .. import usecases
from ..documents import SCHEMA
from ..errors import InputError
from ..sizes import human_bytes
from . import remote, render
from .term import Console


def warn_state(args: argparse.Namespace, console: Console) -> bool:
    """Warn (stderr) when the state is not what its records say: an operation to finish
    or undo, or records rebuilt from the stash. Read-only verbs never fix it. Returns
    whether the next change command recovers first. Whole records are seen at a glance
    (state/glance.py); only others need the full view."""
    from ..state.glance import quick_or_none

    if quick_or_none(args.root) is not None:
        return False
    from .. import salvage

    state = salvage.view(args.root)
    if state.interrupted:
        console.warn(f"an interrupted {state.interrupted} is pending: the tree is part-way; "
                     "the next change command finishes or undoes it first (kmodtrim status)")
    for problem in state.problems:
        console.warn(problem)
    if state.salvaged:
        console.warn("showing the state rebuilt from the stash's own records; the next "
                     "change command writes it as a new generation")
    return bool(state.interrupted or state.salvaged)


def _answer(args: argparse.Namespace, console: Console, doc: dict[str, Any],
            human: Callable[[dict[str, Any], TextIO], None]) -> None:
    """The document itself with --json, else its human rendering."""
    if args.json:
        render.dump(doc, console.out)
    else:
        human(doc, console.out)


def status(args: argparse.Namespace, console: Console) -> int:
    doc = usecases.status(args.root, kernel=args.kernel, policy=args.policy,
                          verify=args.verify)
    _answer(args, console, doc, render.status)
    return 1 if doc["damaged"] else 0


def history(args: argparse.Namespace, console: Console) -> int:
    warn_state(args, console)
    if remote.via_daemon(args):
        doc = {"schema": SCHEMA, "generations": remote.client().list_generations()}
    else:
        doc = usecases.history(args.root)
    _answer(args, console, doc, render.history)
    return 0


def show(args: argparse.Namespace, console: Console) -> int:
    doc = usecases.show(args.root, args.generation)
    _answer(args, console, doc, render.show)
    return 0


def plan(args: argparse.Namespace, console: Console) -> int:
    warn_state(args, console)
    if remote.via_daemon(args):
        doc = remote.client().plan(remote.options(args, "Plan"))
    else:
        from ..operations import make_plan_for

        doc = usecases.plan_document(make_plan_for(target(args)), args.root)
    doc = {"schema": SCHEMA, **doc}
    if args.json:
        render.dump(doc, console.out)
    else:
        for warning in render.plan(doc, console.out, args.all):
            console.warn(warning)
    return 0


def explain(args: argparse.Namespace, console: Console) -> int:
    warn_state(args, console)
    if remote.via_daemon(args):
        doc = remote.client().explain(args.name, remote.options(args, "Explain"))
    else:
        from ..operations import make_plan_for

        doc = usecases.explain_document(make_plan_for(target(args)), args.name)
    if args.json:
        render.dump({"schema": SCHEMA,
                     **{k: v for k, v in doc.items() if k != "lines"}}, console.out)
    else:
        print("\n".join(doc["lines"]), file=console.out)
    return 0


def observe(args: argparse.Namespace, console: Console) -> int:
    from ..errors import KmodtrimError
    from ..operations import boot_id, gather_evidence, load_index
    from ..state.observations import record_observation

    tgt = target(args)
    evidence = gather_evidence(tgt)
    if args.record:
        current = boot_id(args.root)
        if current == "offline":
            raise InputError(f"--record: {args.root} is not a running system (it has no "
                             "boot id), so there is no boot to record",
                             hint="give observations of that image's VMs with --observed")
        record_observation(args.root, current, [o.name for o in evidence.loaded])
        console.note(f"recorded {len(evidence.loaded)} loaded modules for boot {current}")
    try:
        index, _ = load_index(tgt)
    except KmodtrimError:
        index = None  # observing works without a module tree; matching needs one
    devices = [{"devpath": d.devpath, "modalias": d.modalias,
                "drivers": index.match_alias(d.modalias) if index is not None else []}
               for d in evidence.devices]
    doc = {
        "schema": SCHEMA,
        "root": str(args.root),
        "kernel": index.kernel if index is not None else None,
        "loaded": [o.name for o in evidence.loaded],
        "observed": [{"name": o.name, "source": o.source, "line": o.line}
                     for o in evidence.observed],
        "restored": [{"name": o.name, "source": o.source} for o in evidence.restored],
        "devices": devices,
        "filesystems": [{"type": f.fstype, "mountpoint": f.mountpoint, "source": f.source}
                        for f in evidence.filesystems],
        "root_drivers": [{"module": d.module, "mountpoint": d.mountpoint, "devpath": d.devpath}
                         for d in evidence.root_drivers],
    }
    if args.json:
        render.dump(doc, console.out)
        return 0
    out = console.out
    print(f"loaded now: {len(evidence.loaded)} modules", file=out)
    if evidence.loaded:
        print("  " + " ".join(o.name for o in evidence.loaded), file=out)
    sources: dict[str, list[str]] = {}
    for o in evidence.observed:
        sources.setdefault(o.source, []).append(o.name)
    for source, names in sources.items():
        print(f"observed ({source}): {len(names)} modules", file=out)
        print("  " + " ".join(sorted(names)), file=out)
    matched = [d for d in devices if d["drivers"]]
    print(f"devices with a modalias: {len(devices)}, matched by a module: {len(matched)}",
          file=out)
    for d in matched:
        print(f"  {d['modalias']}: {', '.join(d['drivers'])}", file=out)
    print("filesystems: " + ", ".join(sorted({f.fstype for f in evidence.filesystems})),
          file=out)
    for drv in evidence.root_drivers:
        print(f"storage driver of {drv.mountpoint}: {drv.module}", file=out)
    return 0


def index(args: argparse.Namespace, console: Console) -> int:
    from ..operations import load_index

    started = time.perf_counter()
    idx, stats = load_index(target(args), rebuild=args.rebuild)
    elapsed = time.perf_counter() - started
    aliases = sum(len(e.info.aliases) for e in idx.modules.values())
    doc = {
        "schema": SCHEMA, "kernel": idx.kernel, "module_dir": str(idx.moddir),
        "modules": len(idx.modules), "builtins": len(idx.builtins), "aliases": aliases,
        "total_bytes": idx.total_bytes(), "kernel_exports": len(idx.kernel_exports),
        "kernel_exports_source": idx.kernel_exports_source, "files": stats.files,
        "parsed": stats.parsed, "cached": stats.cached, "seconds": round(elapsed, 3),
        "parse_errors": [str(e) for e in idx.parse_errors],
    }
    if args.json:
        render.dump(doc, console.out)
    else:
        out = console.out
        print(f"kernel {idx.kernel}: {len(idx.modules)} modules "
              f"({human_bytes(idx.total_bytes())}), {len(idx.builtins)} builtins, "
              f"{aliases} aliases", file=out)
        print(f"kernel exports: {len(idx.kernel_exports)} symbols, "
              f"{idx.kernel_exports_source}", file=out)
        print(f"read {stats.parsed} files, {stats.cached} from cache, in {elapsed:.2f} s",
              file=out)
        for err in idx.parse_errors:
            console.warn(str(err))
    return 1 if idx.parse_errors else 0


def forget(args: argparse.Namespace, console: Console) -> int:
    """Stop keeping modules for having been restored (later plans may trim them again)."""
    from ..names import normalize
    from ..store import forget_restored, operation_lock

    names = {normalize(n) for n in args.names}
    with operation_lock(args.root, f"forget {' '.join(sorted(names))}"):
        known = forget_restored(args.root, names)
    for name in sorted(names):
        state = "no longer kept for being restored" if name in known else \
            "was not kept for being restored"
        print(f"{name}: {state}", file=console.out)
    return 0


def target(args: argparse.Namespace) -> Any:
    """The operations' Target of these arguments."""
    from ..operations import Target

    return Target(root=args.root, kernel=args.kernel, observed_files=tuple(args.observed),
                  policy_file=args.policy, cache_dir=args.cache_dir, symvers=args.symvers,
                  use_cache=not args.no_cache, clouds=tuple(getattr(args, "cloud", ())))
