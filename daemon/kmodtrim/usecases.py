"""What both faces call: the documents of the read verbs (status, history, show, explain)
and the change operations (trim, rollback, restore, kernel event) with recovery, planning,
applying and the outcome document in one place. The CLI renders these documents
(cli/render.py) whether it computed them itself or kmodtrimd did.

Every document carries ``"schema": SCHEMA`` and uses one key per concept in every verb:
``generation`` for a generation's number, ``removed_files`` / ``removed_bytes`` for what
is out of the tree, ``taken_out`` / ``put_back`` for the paths an operation moved.
Heavy modules (the index, the policy, the planner, the engine) are imported only by the
use cases that need them, so ``status`` and ``history`` answer quickly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .documents import SCHEMA
from .errors import KmodtrimError
from .paths import default_kernel, is_live_root
from .state.glance import quick_or_none
from .state.history import generation_rows
from .state.observations import read_observations, read_restored
from .state.summary import generation_numbers

if TYPE_CHECKING:
    from .engine.transition import Options, Outcome
    from .index import ModuleIndex
    from .operations import PlanResult, Target
    from .records import Generation

Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------
# Read verbs


def _declared(root: Path, explicit: Path | None) -> dict[str, Any]:
    """The policy's mode and minimum observation as the files say (no validation: status
    must answer even when the policy is broken; plan says what is wrong with it)."""
    found: dict[str, Any] = {"mode": "manual", "boots": 3, "days": 7.0}
    files = [explicit] if explicit is not None else [root / "etc/kmodtrim/policy.toml"]
    dropins = root / "etc/kmodtrim/policy.d"
    if explicit is None and dropins.is_dir():
        files += sorted(p for p in dropins.iterdir() if p.suffix == ".toml")
    for path in files:
        try:
            with open(path, "rb") as f:
                text = f.read(1 << 20).decode("utf-8")
            import tomllib  # only when there is a policy file to read

            doc = tomllib.loads(text)
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            continue
        if isinstance(doc.get("mode"), str):
            found["mode"] = doc["mode"]
        need = doc.get("min_observation")
        if isinstance(need, dict):
            for key in ("boots", "days"):
                if isinstance(need.get(key), int | float):
                    found[key] = need[key]
    return found


def _daemon_running(root: Path) -> bool | None:
    """Whether kmodtrimd runs (None: unknowable for an image root)."""
    if not is_live_root(root):
        return None
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read(4096)
            except OSError:
                continue
            args = cmdline.split(b"\0")
            if not any(a.endswith(b"kmodtrimd") or a == b"kmodtrim.daemon" for a in args):
                continue
            # One serving an image root (--root DIR) is not this system's daemon.
            served = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == b"--root"),
                          b"/")
            if served in (b"/", b""):
                return True
    return False


def _boot_kept(root: Path) -> int:
    from .paths import kept_previous_images

    return sum(p.stat().st_size for p in kept_previous_images(root))


def status(root: Path, *, kernel: str | None = None, policy: Path | None = None,
           verify: bool = False) -> dict[str, Any]:
    """The ``status`` document. Raises StoreError for untrusted state. Whole records
    are read at a glance (state/glance.py); anything else from the full view."""
    quick = None if verify else quick_or_none(root, stash=True)
    records = _records_status(root, verify) if quick is None else {
        "generation": quick["generation"], "description": quick["description"],
        "removed_files": quick["removed_files"], "removed_bytes": quick["removed_bytes"],
        "stash_bytes_on_disk": quick["stash_bytes_on_disk"],
        "from_archive_files": quick["from_archive_files"], "interrupted_operation": False,
        "pending": None, "problems": [], "damaged": []}
    boots = read_observations(root)
    declared = _declared(root, policy)
    now = time.time()
    first = min((float(b.get("first_seen", now)) for b in boots.values()), default=now)
    days = round((now - first) / 86400, 1)
    try:
        shown_kernel: str | None = kernel or default_kernel(root)
    except KmodtrimError:
        shown_kernel = None
    boot_kept = _boot_kept(root)
    return {
        "schema": SCHEMA,
        "root": str(root),
        "kernel": shown_kernel,
        "mode": declared["mode"],
        "daemon_running": _daemon_running(root),
        "generation": records["generation"],
        "description": records["description"],
        "removed_files": records["removed_files"],
        "removed_bytes": records["removed_bytes"],
        "stash_bytes_on_disk": records["stash_bytes_on_disk"],
        "boot_kept_bytes": boot_kept,
        "net_freed_bytes": records["removed_bytes"] - records["stash_bytes_on_disk"]
        - boot_kept,
        "from_archive_files": records["from_archive_files"],
        "observation": {"boots": len(boots), "days": days, "boots_needed": declared["boots"],
                        "days_needed": declared["days"],
                        "met": len(boots) >= declared["boots"] and days >= declared["days"]},
        "restored_modules": sorted(read_restored(root)),
        "interrupted_operation": records["interrupted_operation"],
        "pending": records["pending"],
        "problems": records["problems"],
        "damaged": records["damaged"],
        "verified": verify,
    }


def _records_status(root: Path, verify: bool) -> dict[str, Any]:
    """What ``status`` says of the records, from the full view: every problem named,
    every missing (or, with ``verify``, damaged) stash copy listed."""
    from . import salvage
    from .state.stash import Stash
    from .takeout import Source

    state = salvage.view(root)
    g = state.generation
    stash = Stash(root)
    if verify:
        damaged = [why for _entry, why in stash.verify(g.removed)] + _unserved(root, g)
    else:
        damaged = [f"stash copy of {f.path} is missing" for f in stash.missing_copies(g.removed)]
    if state.interrupted:
        pending: str | None = (f"an interrupted {state.interrupted}: the tree is part-way; the "
                               "next change command (apply, rollback, restore) first finishes "
                               "or undoes it")
    elif state.salvaged:
        pending = (f"the state was rebuilt from the stash's own records as generation "
                   f"{g.number}; the next change command writes it")
    else:
        pending = None
    return {"generation": g.number, "description": g.description,
            "removed_files": len(g.removed), "removed_bytes": g.removed_bytes,
            "stash_bytes_on_disk": stash.size_on_disk(),
            "from_archive_files": sum(1 for f in g.removed if f.source is Source.ARCHIVE),
            "interrupted_operation": state.interrupted is not None, "pending": pending,
            "problems": list(state.problems), "damaged": damaged}


def _unserved(root: Path, g: Generation) -> list[str]:
    """For ``status --verify``: files out of the tree whose package version the archive
    no longer serves (they have no local copy, so nothing could restore them)."""
    from .sources.archive import Origin, served
    from .takeout import Source

    by_origin: dict[Origin, list[str]] = {}
    for f in g.removed:
        if f.source is Source.ARCHIVE and f.package and f.version:
            by_origin.setdefault(Origin(f.package, f.version), []).append(f.path)
    serving = served(root, by_origin) if by_origin else set()
    return [f"{paths[0]} (and {len(paths) - 1} more) come back from the archive, which no "
            f"longer serves {origin}" if len(paths) > 1 else
            f"{paths[0]} comes back from the archive, which no longer serves {origin}"
            for origin, paths in sorted(by_origin.items(), key=lambda i: str(i[0]))
            if origin not in serving]


def history(root: Path) -> dict[str, Any]:
    """The ``history`` document: every generation, oldest first."""
    return {"schema": SCHEMA, "generations": generation_rows(root)}


def show(root: Path, number: int) -> dict[str, Any]:
    """The ``show`` document: what generation ``number`` took out and put back, by module,
    firmware and package. Raises NoSuchGenerationError, StoreError."""
    from .store import load_generation

    g = load_generation(root, number)
    by_path = {f.path: f for f in g.removed}
    if number > 0:
        with_previous = {f.path: f for n in generation_numbers(root) if n < number
                         for f in load_generation(root, n).removed}
    else:
        with_previous = {}

    def describe(paths: tuple[str, ...], known: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for path in paths:
            entry = known.get(path) or with_previous.get(path)
            out.append({"path": path, "kind": entry.kind if entry else None,
                        "module": entry.module if entry else None,
                        "size": entry.size if entry else None})
        return out

    return {
        "schema": SCHEMA, "generation": g.number, "created": g.created, "action": g.action,
        "description": g.description, "rollback_to": g.rollback_to,
        "removed_files": len(g.removed), "removed_bytes": g.removed_bytes,
        "taken_out": describe(g.stashed, by_path), "put_back": describe(g.restored, {}),
        "packages_out": [{"name": p.name, "version": p.version, "files": len(p.files)}
                         for p in g.packages],
        "packages_removed": list(g.packages_removed),
        "packages_reinstalled": list(g.packages_reinstalled),
        "kernels": list(g.kernels), "regen": dict(g.regen),
    }


def explain_document(result: PlanResult, name: str) -> dict[str, Any]:
    """The ``explain`` document of ``name`` (a module or an alias) in ``result``, with
    whether modprobe brings it back (``on_demand``, from kmodtrim's modprobe.d file, the
    policy and the restored record; ondemand.explain_on_demand decides). Raises
    UnknownModuleError."""
    from dataclasses import replace

    from .engine.ondemand import current_text
    from .ondemand import OnDemandFacts, explain_on_demand, lines_for
    from .operations import explain, explanation_json

    e = explain(result, name)
    entry = result.index.modules.get(e.name)
    on_demand = None
    if entry is not None:
        rule = result.policy.decide(entry.name, entry.relpath, entry.info.aliases)
        installed, alias_lines = lines_for(current_text(result.index.root) or "", e.name)
        on_demand = explain_on_demand(OnDemandFacts(
            name=e.name, out=entry.stashed, removed_by_plan=e.status == "removed",
            excluded=rule is not None and rule.exclude, installed=installed,
            alias_lines=alias_lines, aliases=tuple(entry.info.aliases),
            record=read_restored(result.index.root).get(e.name)))
        if on_demand is not None:
            e = replace(e, now=f"{e.now}; {on_demand['text']}" if e.now
                        else str(on_demand["text"]))
    return {**explanation_json(e), "on_demand": on_demand}


def plan_document(result: PlanResult, root: Path) -> dict[str, Any]:
    """The ``plan`` document: the plan, and where the files it takes out come back from
    under the policy's ``[stash]`` settings, with the bytes a trim frees net of the stash
    (at least: the stash compresses what is not compressed already)."""
    from .engine.plansources import assign_plan_sources

    assigned = assign_plan_sources(root, result.plan, result.index, result.policy,
                                   _paths_out(root, result.index))
    out = assigned.local_bytes + assigned.archive_bytes
    stash = result.policy.settings.stash
    return {"schema": SCHEMA, **result.plan.to_json(), "sources": {
        "keep": stash.keep, "budget_mib": stash.budget_mib,
        "local_files": len(assigned.requests) - assigned.archive_files,
        "local_bytes": assigned.local_bytes,
        "archive_files": assigned.archive_files, "archive_bytes": assigned.archive_bytes,
        "tree_bytes_out": out, "net_freed_bytes": out - assigned.local_bytes}}


def _paths_out(root: Path, index: ModuleIndex) -> set[str]:
    """The in-root paths the current generation holds out of the tree, as far as a plan of
    ``index``'s kernel can tell: its stashed module files (which the index lists) and the
    other files out (which the summary lists), when the records need no closer look;
    else every path out, from the full view."""
    quick = quick_or_none(root, whole=True)
    if quick is None:
        from . import salvage

        return {f.path for f in salvage.view(root).generation.removed}
    from .planner import inroot_moddir

    prefix = inroot_moddir(index) + "/"
    return {prefix + relpath for relpath in index.stashed_relpaths} | set(quick["others_out"])


# ---------------------------------------------------------------------------------------
# Change verbs (each recovers first, then runs one operation)


def outcome_document(outcome: Outcome, root: Path) -> dict[str, Any]:
    """The document every change verb answers with, whichever face ran it."""
    from .state.stash import Stash

    doc = outcome.to_json()
    doc["taken_out"] = doc.pop("stash")
    doc["put_back"] = doc.pop("restore")
    g = outcome.generation
    doc.update({
        "schema": SCHEMA,
        "description": g.description if g else None,
        "removed_files": len(g.removed) if g else None,
        "removed_bytes": g.removed_bytes if g else None,
        "stash_bytes_on_disk": Stash(root).size_on_disk(),
    })
    return doc


def recover(root: Path, options: Options | None = None) -> str | None:
    """Finish or undo an interrupted operation (or write rebuilt state). Returns what was
    done, or None. A dry run (``options.dry_run``) changes nothing, so it recovers nothing
    either: it answers from the state as recovery will leave it."""
    if options is not None and options.dry_run:
        return None
    from .executor import recover as engine_recover

    return engine_recover(root)


def plan_for_trim(target: Target) -> PlanResult:
    """Recover, then plan the target's kernel: what a trim would apply (the faces show it
    and ask before ``apply_trim``). Raises PolicyViolation, KmodtrimError on bad input."""
    from .operations import make_plan_for

    recover(target.root)
    return make_plan_for(target)


def apply_trim(result: PlanResult, root: Path, options: Options) -> dict[str, Any]:
    """Apply a plan ``plan_for_trim`` made (or the CLI's dry-run plan); the outcome
    document. Raises BusyError, Canceled, KmodtrimError."""
    from .executor import apply_plan

    outcome = apply_plan(root, result.plan, result.index, result.evidence, result.policy,
                         options)
    return outcome_document(outcome, root)


def trim(target: Target, options: Options) -> dict[str, Any]:
    """Plan and apply for the target's kernel. Raises PolicyViolation, BusyError, …"""
    return apply_trim(plan_for_trim(target), target.root, options)


def rollback(root: Path, to: int | None, options: Options) -> dict[str, Any]:
    from .executor import rollback as engine_rollback

    recover(root, options)
    return outcome_document(engine_rollback(root, to, options), root)


def restore(target: Target, names: list[str], options: Options,
            how: str = "restored by hand", index: ModuleIndex | None = None) -> dict[str, Any]:
    """Bring ``names`` back with their closure. ``index``: the target's, when the caller
    has it already (recovery that changed the tree makes it index again)."""
    from .executor import restore_modules
    from .operations import load_index

    if recover(target.root, options) or index is None:
        index, _ = load_index(target, save_cache=False)  # the restore changes the tree
    return outcome_document(restore_modules(target.root, names, index, options, how),
                            target.root)


def kernel_event(target: Target, action: str, kernel: str, options: Options) -> dict[str, Any]:
    from .operations import kernel_event as operations_kernel_event

    recover(target.root, options)
    return outcome_document(operations_kernel_event(target, action, kernel, options),
                            target.root)
