"""The verbs that change the tree: apply, rollback, restore, kernel-event. Each finishes or
undoes an interrupted operation first (a dry run only says it would), shows one summary
line and asks before it changes anything (naming its target), and prints the outcome
document through the one renderer, whether it ran here or in kmodtrimd."""

from __future__ import annotations

import argparse
from typing import Any

from ..documents import SCHEMA
from . import remote, render
from .term import Console


def _recover(args: argparse.Namespace, console: Console) -> None:
    from .. import usecases
    from .read import warn_state

    if getattr(args, "dry_run", False):
        if warn_state(args, console):
            console.warn("--dry-run: that recovery is not done now; what follows is from "
                         "the state as it will be after it")
        return
    done = usecases.recover(args.root)
    if done:
        console.note(done)


def _options(args: argparse.Namespace, console: Console, default_backend: str) -> Any:
    from ..executor import Options

    return Options(dry_run=args.dry_run, force=getattr(args, "force", False),
                   initramfs=args.initramfs, backend=args.backend or default_backend,
                   progress=console.progress)


def _finish(doc: dict[str, Any], args: argparse.Namespace, console: Console) -> int:
    if args.json:
        render.dump(doc, console.out)
    else:
        for warning in render.outcome(doc, console.out, quiet=console.quiet):
            console.warn(warning)
    return 1 if doc.get("damaged") else 0


def _declined(console: Console) -> int:
    print("nothing changed", file=console.out)
    return 1


def apply(args: argparse.Namespace, console: Console) -> int:
    from .. import usecases
    from .read import target

    if remote.via_daemon(args):
        bus = remote.client()
        doc = bus.plan(remote.options(args, "Plan"))
        if not args.json:
            for warning in render.plan(doc, console.out, False):
                console.warn(warning)
            print(file=console.out)
        if not console.confirm(render.plan_summary(doc) + "?", yes=args.yes,
                               dry_run=args.dry_run):
            return _declined(console)
        outcome = bus.trim(remote.options(args, "Trim"), console.fraction)
        return _finish(remote.complete_outcome(outcome), args, console)
    from ..operations import make_plan_for

    _recover(args, console)
    result = make_plan_for(target(args))
    doc = usecases.plan_document(result, args.root)
    if not args.json:
        for warning in render.plan(doc, console.out, False):
            console.warn(warning)
        print(file=console.out)
    if not console.confirm(render.plan_summary(doc) + "?", yes=args.yes, dry_run=args.dry_run):
        return _declined(console)
    return _finish(usecases.apply_trim(result, args.root,
                                       _options(args, console, result.policy.settings.backend)),
                   args, console)


def _rollback_question(args: argparse.Namespace) -> str:
    """'roll back to generation 1 (apply, 2026-12-01T11:06)?' — naming the target."""
    from ..store import current_generation, load_generation

    to = args.generation
    if to is None:
        current = current_generation(args.root)
        to = max(current.number - 1, 0)
    target_generation = load_generation(args.root, to)  # fail early on a bad number
    when = f"{target_generation.action}, {target_generation.created}" if to else "as installed"
    return (f"roll back to generation {to} ({when}): {len(target_generation.removed)} files "
            "out of the tree afterwards?")


def rollback(args: argparse.Namespace, console: Console) -> int:
    from .. import usecases

    if remote.via_daemon(args):  # the daemon recovers, as for every verb it runs
        if not console.confirm(_rollback_question(args), yes=args.yes, dry_run=args.dry_run):
            return _declined(console)
        doc = remote.client().rollback(args.generation, remote.options(args, "Rollback"),
                                       console.fraction)
        return _finish(remote.complete_outcome(doc), args, console)
    _recover(args, console)
    if not console.confirm(_rollback_question(args), yes=args.yes, dry_run=args.dry_run):
        return _declined(console)
    return _finish(usecases.rollback(args.root, args.generation,
                                     _options(args, console, "auto")), args, console)


def restore(args: argparse.Namespace, console: Console) -> int:
    if args.on_demand:  # modprobe's install line (kmodtrim/ondemand.py)
        from .ondemand import restore_on_demand

        return restore_on_demand(args, console)
    from .. import usecases
    from ..names import normalize
    from .read import target

    names = ", ".join(normalize(n) for n in args.names)
    question = f"restore {names} (with the modules they need) into the tree?"
    if remote.via_daemon(args):
        if not console.confirm(question, yes=args.yes, dry_run=args.dry_run):
            return _declined(console)
        doc = remote.client().restore(args.names, remote.options(args, "Restore"),
                                      console.fraction)
        return _finish(remote.complete_outcome(doc), args, console)
    _recover(args, console)
    if not console.confirm(question, yes=args.yes, dry_run=args.dry_run):
        return _declined(console)
    return _finish(usecases.restore(target(args), list(args.names),
                                    _options(args, console, "auto")), args, console)


def kernel_event(args: argparse.Namespace, console: Console) -> int:
    """A kernel was installed or removed. With kmodtrimd serving this root the event is
    handed to it and this returns at once (the daemon handles it after the package
    manager's transaction, which is running the hook that called us); without a daemon
    (image builds) it runs here."""
    from .. import usecases
    from .read import target

    if remote.via_daemon(args):
        pending = remote.client().kernel_event(args.action, args.kver,
                                               remote.options(args, "KernelEvent"))
        if args.json:
            render.dump({"schema": SCHEMA, "queued": True, "action": args.action,
                         "kernel": args.kver, "pending": pending}, console.out)
        else:
            what = "trims" if args.action == "add" else "forgets the stash of"
            print(f"kmodtrimd {what} kernel {args.kver} once the package manager has "
                  f"finished ({pending} kernel event(s) queued)", file=console.out)
        return 0
    from ..operations import load_target_policy

    _recover(args, console)
    tgt = target(args)
    policy = load_target_policy(tgt)
    return _finish(usecases.kernel_event(tgt, args.action, args.kver,
                                         _options(args, console, policy.settings.backend)),
                   args, console)
