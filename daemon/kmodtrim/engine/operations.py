"""The operations that change the tree — apply a plan, roll back, restore modules, forget
a removed kernel — each decided here and run as one transition (transition.py) under the
operation lock. The executor checks its own safety rules, independently of the planner:
it refuses to remove what is loaded, boot-critical or kept by policy."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import fsutil
from ..closure import Reason, closure_of
from ..errors import PolicyViolation, UnknownModuleError
from ..index import ModuleIndex
from ..names import normalize
from ..observe import filesystem_module_aliases
from ..paths import kernel_installed
from ..store import (
    current_generation,
    generation_numbers,
    load_generation,
    operation_lock,
    read_observations,
    record_restored,
    record_supplied,
    write_generation,
)
from ..takeout import PutRequest
from . import transition
from .exclusions import resolve_backend
from .ondemand import recorded_excluded
from .transition import Change, Options, Outcome

if TYPE_CHECKING:  # restores and rollbacks (self-healing) need neither
    from ..planner import Evidence, Plan
    from ..policy import LoadedPolicy


def protected_modules(
    index: ModuleIndex, evidence: Evidence, policy: LoadedPolicy
) -> dict[str, str]:
    """Modules the executor refuses to remove whatever the plan says: loaded in the
    running kernel, boot-critical (root storage chain, mounted filesystems), or kept by a
    policy rule. Computed here independently of the planner."""
    protected: dict[str, str] = {}
    for obs in evidence.loaded:
        for name in index.resolve(obs.name):
            protected.setdefault(name, f"loaded ({obs.source})")
    for drv in evidence.root_drivers:
        protected.setdefault(drv.module, f"storage driver of {drv.mountpoint}")
    for alias, mounts in filesystem_module_aliases(evidence.filesystems).items():
        for name in index.resolve(alias):
            protected.setdefault(name, f"{mounts[0].fstype} filesystem on {mounts[0].mountpoint}")
    for entry in index.modules.values():
        rule = policy.decide(entry.name, entry.relpath, entry.info.aliases)
        if rule is not None and not rule.exclude:
            protected.setdefault(entry.name, rule.describe())
    return protected


def observation_shortfall(
    root: Path, policy: LoadedPolicy, evidence: Evidence, now: float | None = None
) -> str | None:
    """Why the minimum observation is not met, or None if it is.

    Observations given explicitly (``--observed`` files: a recording the admin vouches
    for) count as a complete observation.
    """
    if any(not o.source.startswith("recorded on") for o in evidence.observed):
        return None
    need = policy.settings.min_observation
    boots = read_observations(root)
    now = time.time() if now is None else now
    first = min((float(b.get("first_seen", now)) for b in boots.values()), default=now)
    days = (now - first) / 86400
    if len(boots) >= need.boots and days >= need.days:
        return None
    return (
        f"only {len(boots)} boot(s) over {days:.1f} day(s) observed; the policy asks for "
        f"{need.boots} boots and {need.days:g} days (min_observation)"
    )


def apply_plan(
    root: Path,
    plan: Plan,
    index: ModuleIndex,
    evidence: Evidence,
    policy: LoadedPolicy,
    options: Options,
) -> Outcome:
    """Make the kernel's tree match ``plan`` as a new generation.

    Raises PolicyViolation (protected module in the plan, failed symbol check, minimum
    observation not met without ``force``), BusyError, StashError, CommandError.
    """
    with operation_lock(root, f"apply (kernel {plan.kernel})"):
        current = current_generation(root)
        protected = protected_modules(index, evidence, policy)
        violations = [f"{m.name} ({protected[m.name]})" for m in plan.remove
                      if m.name in protected and not m.stashed]
        if violations:
            raise PolicyViolation(
                "the plan removes protected modules: " + ", ".join(violations[:10]),
                hint="re-plan; the planner must keep them",
            )
        if plan.unresolved_symbols and not options.force:
            first = plan.unresolved_symbols[0]
            raise PolicyViolation(
                f"the kept set does not load: {len(plan.unresolved_symbols)} unresolved "
                f"symbols (e.g. {first.module} needs {first.symbol})",
                hint="check the kernel's exported symbols (--symvers) or pass --force",
            )
        shortfall = observation_shortfall(root, policy, evidence)
        if shortfall and not options.force:
            raise PolicyViolation(
                f"not trimming yet: {shortfall}",
                hint="keep observing, give --observed FILE, or pass --force",
            )
        from .plansources import assign_plan_sources

        to_stash = assign_plan_sources(root, plan, index, policy,
                                       {f.path for f in current.removed},
                                       options.backend).requests
        kept_names = {m.name for m in plan.keep}
        to_restore = [
            f for f in current.removed
            if (f.kind == "module" and f.kernel == plan.kernel and f.module in kept_names)
            or (f.kind == "firmware" and kept_names & set((f.module or "").split(",")))
        ]
        required = {plan.kernel: {
            m.name for m in plan.keep if any(r.kind == "boot-critical" for r in m.reasons)
        }}
        # Modules the policy excludes get no on-demand lines (engine/ondemand.py); this
        # kernel's are decided now, other kernels' stay as the file recorded them.
        excluded = {name for name in recorded_excluded(root) if name not in index.modules}
        for m in plan.remove:
            entry = index.modules.get(m.name)
            rule = policy.decide(m.name, entry.relpath, entry.info.aliases) if entry else None
            if rule is not None and rule.exclude:
                excluded.add(m.name)
        method = options.initramfs if options.initramfs != "auto" else policy.settings.initramfs
        opts = replace(options, initramfs=method)
        outcome = transition.run(root, current, Change(
            action="apply",
            description=f"trim kernel {plan.kernel}: keep {len(plan.keep)}, "
                        f"remove {len(plan.remove)} modules",
            to_stash=to_stash, to_restore=to_restore,
            required=required,
            keep_reasons={m.name: m.reasons[0].describe() for m in plan.keep},
            remove_packages=policy.settings.remove_packages,
            index=index, excluded=excluded,
        ), opts)
        supplied = {o.name: o.source for o in evidence.observed
                    if not o.source.startswith(("recorded on", "supplied earlier"))}
        if supplied and not options.dry_run:
            # Kernels installed later are trimmed with what the admin vouched for now.
            record_supplied(root, supplied)
        return outcome


def rollback(root: Path, to: int | None, options: Options) -> Outcome:
    """Return the trees to generation ``to``'s state (default: undo the latest
    generation) as a new generation. Raises NoSuchGenerationError, BusyError, StashError."""
    with operation_lock(root, f"rollback to {to if to is not None else 'previous'}"):
        current = current_generation(root)
        if to is None:
            to = max(current.number - 1, 0)
        target = load_generation(root, to)
        # A kernel removed since then has nothing to go back to.
        target_paths = {f.path: f for f in target.removed
                        if f.kernel is None or kernel_installed(root, f.kernel)}
        current_paths = {f.path for f in current.removed}
        to_restore = [f for f in current.removed if f.path not in target_paths]
        from ..sources.decide import recheck_archive  # a rollback's only: restores skip it

        with fsutil.Walk(root) as walk:
            to_stash = recheck_archive(root, [
                PutRequest(f.path, f.kind, f.module, f.kernel, f.package, f.source, f.version)
                for path, f in target_paths.items()
                if path not in current_paths and walk.lexists(path)
            ])
        return transition.run(root, current, Change(
            action="rollback",
            description=f"roll back to generation {to}",
            to_stash=to_stash, to_restore=to_restore,
            rollback_to=to,
            remove_packages=True,
            package_candidates={p.name for p in target.packages},
        ), options)


def forget_kernel(root: Path, kernel: str) -> Outcome:
    """After a kernel's removal: drop its stashed files from the state (a new generation)
    and free their stash space. Nothing in any tree changes."""
    with operation_lock(root, f"forget kernel {kernel}"):
        current = current_generation(root)
        gone = [f for f in current.removed if f.kernel == kernel]
        if not gone or kernel_installed(root, kernel):
            note = "nothing stashed" if not gone else "kernel still installed"
            return Outcome(None, (), (), False, (f"kernel {kernel}: {note}",))
        generation = replace(
            current,
            number=generation_numbers(root)[-1] + 1,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            action="forget",
            description=f"kernel {kernel} was removed: forget its {len(gone)} stashed files",
            removed=tuple(f for f in current.removed if f.kernel != kernel),
            # A package removed whole with that kernel's modules goes with it.
            packages=tuple(p for p in current.packages
                           if not any(f"/modules/{kernel}/" in f.path for f in p.files)),
            packages_removed=(), packages_reinstalled=(),
            stashed=(), restored=(), kernels=(kernel,), rollback_to=None,
            keep_reasons={}, regen={},
        )
        write_generation(root, generation)
        transition.finish(root, generation, resolve_backend(root, "auto"))
        return Outcome(generation, (), (), False)


def restore_modules(
    root: Path, names: Sequence[str], index: ModuleIndex, options: Options,
    how: str = "restored by hand",
) -> Outcome:
    """Put modules (with their dependency closure and firmware) back from the stash as a
    new generation. ``index`` must include stashed modules (operations.load_index).

    Raises UnknownModuleError for a name the kernel does not know.
    """
    seeds: dict[str, list[Reason]] = {}
    for name in names:
        if not index.resolve(name):
            raise UnknownModuleError(f"kernel {index.kernel} has no module {name!r}")
        seeds[name] = [Reason("policy", "restore requested")]
    closure = closure_of(seeds, index)
    wanted = {n for n in closure.kept if index.modules[n].stashed}
    with operation_lock(root, f"restore {' '.join(names)}"):
        current = current_generation(root)
        to_restore = [
            f for f in current.removed
            if (f.kind == "module" and f.kernel == index.kernel and f.module in wanted)
            or (f.kind == "firmware" and wanted & set((f.module or "").split(",")))
        ]
        outcome = transition.run(root, current, Change(
            action="restore",
            description=f"restore {', '.join(normalize(n) for n in names)}"
                        + (f" (+{len(wanted) - len(names)} dependencies)"
                           if len(wanted) > len(names) else ""),
            to_stash=[], to_restore=to_restore, index=index,
        ), options)
        if not options.dry_run:
            # A restore sticks: later plans keep these until the admin forgets them.
            when = time.strftime("%Y-%m-%d %H:%M")
            record_restored(root, {normalize(n): f"{how} on {when}" for n in names})
        return outcome
