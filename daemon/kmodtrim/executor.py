"""The only writer: apply a plan, restore modules, roll back — each as a new generation.

Every operation is a *transition* from the current generation's set of removed files to a
target set, run under a write-ahead journal:

    journal → exclusions (superset) → stash copies → sync → unlink → restores
            → depmod → initramfs → manifest (commit) → exclusions (final) → GC → clear journal

Before the commit point an interrupted operation is undone on the next start (every file
removed is still in the stash, synced before its unlink); after it, it is finished. At no
point is a file only in memory: each is in the tree or in the stash with a matching hash.

Set ``KMODTRIM_FAULT=STEP`` (or ``STEP:N`` for the N-th file of a per-file step) to kill
the process with SIGKILL at that step boundary; the tests use it to prove recovery.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .backends.stash import Stash
from .closure import Reason, closure_of
from .errors import PolicyViolation, StashError, UnknownModuleError
from .index import MODULE_DIR_BASES, ModuleIndex
from .names import normalize
from .observe import filesystem_module_aliases
from .planner import Evidence, Plan
from .policy import LoadedPolicy
from .store import (
    Generation,
    StashedFile,
    clear_journal,
    current_generation,
    generation_numbers,
    load_generation,
    operation_lock,
    read_journal,
    read_observations,
    record_supplied,
    write_generation,
    write_journal,
)

Progress = Callable[[str, int, int], None]
FAULT_STEPS = (
    "after-journal", "after-exclude", "stash", "after-stash", "unlink", "after-unlink",
    "restore", "after-restore", "after-depmod", "after-initramfs", "after-commit",
    "after-final-exclude",
)


def fault_point(step: str, n: int | None = None) -> None:
    """Kill this process if KMODTRIM_FAULT names this step (tests prove crash safety)."""
    wanted = os.environ.get("KMODTRIM_FAULT")
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name == step and (not count or (n is not None and int(count) == n)):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class ToStash:
    path: str
    kind: str = "module"
    module: str | None = None
    kernel: str | None = None


@dataclass(frozen=True)
class Options:
    dry_run: bool = False
    force: bool = False
    initramfs: str = "auto"  # auto | skip | dracut | update-initramfs | kernel-install
    backend: str = "auto"  # auto | stash | dpkg | rpm
    progress: Progress | None = None


@dataclass(frozen=True)
class Outcome:
    """What an operation did (or, with dry_run, would do)."""

    generation: Generation | None  # None for a dry run or a no-op
    stash: tuple[str, ...]
    restore: tuple[str, ...]
    dry_run: bool
    notes: tuple[str, ...] = ()
    regen: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "generation": self.generation.number if self.generation else None,
            "dry_run": self.dry_run,
            "stash": list(self.stash),
            "restore": list(self.restore),
            "notes": list(self.notes),
            "regen": self.regen,
        }


# ---------------------------------------------------------------------------------------
# Package-manager backend (dpkg/rpm keep their view truthful; "stash" alone does nothing)


def _backend(root: Path, name: str) -> Any:
    from .backends.package import backend_by_name, detect_backend

    if name == "stash":
        return None
    return detect_backend(root) if name == "auto" else backend_by_name(name)


def _write_exclusions(backend: Any, root: Path, paths: Iterable[str]) -> None:
    if backend is None or getattr(backend, "name", "none") == "none":
        return
    backend.write_exclusions(root, set(paths))


# ---------------------------------------------------------------------------------------
# Regeneration (depmod + initramfs)


def _file_sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _regenerate(root: Path, kernels: Iterable[str], required: dict[str, set[str]],
                method: str, journal: dict[str, Any]) -> dict[str, Any]:
    """depmod, then the initramfs, for each kernel. Before an image can be swapped, the
    journal records its current hash, so recovery can tell whether the swap happened."""
    from . import regen

    results: dict[str, Any] = {}
    for kernel in sorted(set(kernels)):
        started = time.perf_counter()
        regen.run_depmod(root, kernel)
        entry: dict[str, Any] = {"depmod_seconds": round(time.perf_counter() - started, 3)}
        fault_point("after-depmod")
        detected = regen.detect_initramfs_method(root, kernel) if method == "auto" else method
        if detected != "skip":
            image = regen.initramfs_path(root, kernel, detected)
            journal.setdefault("initramfs_pending", {})[kernel] = {
                "image": str(image), "sha256": _file_sha256(image)}
            write_journal(root, journal)
            result = regen.regenerate_initramfs(
                root, kernel, required.get(kernel, set()), method)  # type: ignore[arg-type]
            entry["initramfs"] = {
                "method": result.method,
                "image": str(result.image) if result.image else None,
                "previous": str(result.previous) if result.previous else None,
                "skipped": result.skipped_reason,
                "seconds": round(result.seconds, 3),
            }
            fault_point("after-initramfs")
        results[kernel] = entry
    return results


def _restore_initramfs(root: Path, journal: dict[str, Any]) -> None:
    """Undo any initramfs swap an interrupted or failed transition made: the image goes
    back to the bytes the journal recorded (or away, if there was none)."""
    from . import regen

    for kernel, pending in (journal.get("initramfs_pending") or {}).items():
        image = Path(pending["image"])
        before = pending.get("sha256")
        if _file_sha256(image) == before:
            continue  # never swapped
        previous = regen.previous_path(image)
        if before is not None and _file_sha256(previous) != before:
            raise StashError(
                f"cannot restore the initramfs of {kernel}: {previous} is not the image "
                "it replaced",
                hint=f"regenerate it (update-initramfs -u -k {kernel} or dracut --force)",
            )
        result = regen.InitramfsResult(
            method="", image=image, previous=previous if before is not None else None,
            modules=frozenset(), seconds=0.0, skipped_reason=None,
        )
        regen.restore_previous_initramfs(root, kernel, result)


# ---------------------------------------------------------------------------------------
# The transition


def _notify(progress: Progress | None, step: str, done: int, total: int) -> None:
    if progress is not None:
        progress(step, done, total)


def _transition(
    root: Path,
    current: Generation,
    to_stash: Sequence[ToStash],
    to_restore: Sequence[StashedFile],
    *,
    action: str,
    description: str,
    options: Options,
    required: dict[str, set[str]] | None = None,
    rollback_to: int | None = None,
    keep_reasons: dict[str, str] | None = None,
) -> Outcome:
    stash_paths = tuple(t.path for t in to_stash)
    restore_paths = tuple(e.path for e in to_restore)
    if options.dry_run or (not to_stash and not to_restore):
        notes = ("nothing to do",) if not to_stash and not to_restore else ()
        return Outcome(None, stash_paths, restore_paths, options.dry_run, notes)
    kernels = sorted({t.kernel for t in to_stash if t.kernel}
                     | {e.kernel for e in to_restore if e.kernel})
    number = generation_numbers(root)[-1] + 1
    backend = _backend(root, options.backend)
    stash = Stash(root)
    journal: dict[str, Any] = {
        "action": action,
        "number": number,
        "from": current.number,
        "stash": [t.__dict__ for t in to_stash],
        "restore": [e.__dict__ for e in to_restore],
        "kernels": kernels,
        "backend": options.backend,
        "phase": "moving",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_journal(root, journal)
    fault_point("after-journal")
    try:
        _write_exclusions(backend, root, {f.path for f in current.removed} | set(stash_paths))
        fault_point("after-exclude")
        new_entries: list[StashedFile] = []
        owners: dict[str, str | None] = {}
        if backend is not None and getattr(backend, "name", "none") != "none":
            owners = backend.owners(root, stash_paths)
        def put(item: ToStash) -> StashedFile:
            return stash.put(item.path, kind=item.kind, module=item.module,
                             kernel=item.kernel, package=owners.get(item.path))

        # Hashing and compressing release the GIL: copy on every CPU, record in order.
        with ThreadPoolExecutor(max_workers=min(os.cpu_count() or 1, 8)) as pool:
            for i, entry in enumerate(pool.map(put, to_stash), 1):
                new_entries.append(entry)
                fault_point("stash", i)
                _notify(options.progress, "stash", i, len(to_stash))
        os.sync()  # every copy is durable before any original goes
        journal["stashed_entries"] = [e.__dict__ for e in new_entries]
        write_journal(root, journal)
        fault_point("after-stash")
        for i, item in enumerate(to_stash, 1):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(root / item.path.lstrip("/"))
            fault_point("unlink", i)
        fault_point("after-unlink")
        for i, entry in enumerate(to_restore, 1):
            stash.restore(entry)
            fault_point("restore", i)
            _notify(options.progress, "restore", i, len(to_restore))
        if to_restore:
            os.sync()
        fault_point("after-restore")
        journal["phase"] = "regenerating"
        write_journal(root, journal)
        regen_results: dict[str, Any] = {}
        try:
            regen_results = _regenerate(root, kernels, required or {}, options.initramfs,
                                        journal)
        except BaseException:
            journal["regen"] = regen_results
            raise
        journal["regen"] = regen_results
        write_journal(root, journal)
    except BaseException as exc:
        # Undo synchronously: the same code crash recovery runs.
        _undo(root, journal, current)
        if isinstance(exc, OSError):
            raise StashError(f"{action} failed and was undone: {exc}") from exc
        raise
    restored = set(restore_paths)
    removed = [f for f in current.removed if f.path not in restored] + new_entries
    generation = Generation(
        number=number,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        action=action,
        description=description,
        removed=tuple(sorted(removed, key=lambda f: f.path)),
        stashed=stash_paths,
        restored=restore_paths,
        kernels=tuple(kernels),
        rollback_to=rollback_to,
        keep_reasons=keep_reasons or {},
        regen=regen_results,
    )
    write_generation(root, generation)  # the commit point
    fault_point("after-commit")
    _finish(root, generation, backend)
    return Outcome(generation, stash_paths, restore_paths, False, regen=regen_results)


def _finish(root: Path, generation: Generation, backend: Any) -> None:
    _write_exclusions(backend, root, {f.path for f in generation.removed})
    fault_point("after-final-exclude")
    Stash(root).collect_garbage({f.sha256 for f in generation.removed})
    clear_journal(root)


def _undo(root: Path, journal: dict[str, Any], current: Generation) -> None:
    """Return the tree to ``current``'s state after an interrupted transition."""
    stash = Stash(root)
    current_paths = {f.path for f in current.removed}
    # Files the transition took out: put back any that is gone (their blobs were synced
    # before the unlink, so a missing file always has its copy).
    for item in journal.get("stash", []):
        full = root / item["path"].lstrip("/")
        if os.path.lexists(full):
            continue
        entry = next((e for e in _entries_for(item["path"], journal)), None)
        if entry is None:
            raise StashError(f"cannot undo: no stash copy of {item['path']}")
        stash.restore(entry)
    # Files the transition put back: take them out again (their blobs are still there).
    for doc in journal.get("restore", []):
        entry = StashedFile.from_json(doc)
        full = root / entry.path.lstrip("/")
        if entry.path in current_paths and os.path.lexists(full) and stash.has_copy(entry):
            full.unlink()
    os.sync()
    backend = _backend(root, journal.get("backend", "auto"))
    _write_exclusions(backend, root, current_paths)
    _restore_initramfs(root, journal)
    from . import regen

    for kernel in journal.get("kernels", []):
        if any((root / base / kernel).is_dir() for base in MODULE_DIR_BASES):
            regen.run_depmod(root, kernel)
    clear_journal(root)


def _entries_for(path: str, journal: dict[str, Any]) -> Iterable[StashedFile]:
    """Stash entries the interrupted transition recorded for ``path`` (written to the
    journal after the copies were synced and before any original was unlinked)."""
    for doc in journal.get("stashed_entries", []):
        if doc["path"] == path:
            yield StashedFile.from_json(doc)


def recover(root: Path) -> str | None:
    """Finish or undo an interrupted operation. Returns what was done, or None."""
    journal = read_journal(root)
    if journal is None:
        return None
    with operation_lock(root, "recovery"):
        number = int(journal["number"])
        if number in generation_numbers(root):
            generation = load_generation(root, number)
            _finish(root, generation, _backend(root, journal.get("backend", "auto")))
            return f"finished interrupted {journal['action']} (generation {number})"
        current = load_generation(root, int(journal["from"]))
        _undo(root, journal, current)
        return f"undid interrupted {journal['action']} (back to generation {current.number})"


# ---------------------------------------------------------------------------------------
# Operations


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
        already = {f.path for f in current.removed}
        to_stash: list[ToStash] = []
        for m in plan.remove:
            for path in m.files:
                if path not in already and os.path.lexists(root / path.lstrip("/")):
                    to_stash.append(ToStash(path, "module", m.name, plan.kernel))
        for fw in plan.firmware_remove:
            if fw.path not in already:
                to_stash.append(ToStash(fw.path, "firmware", ",".join(fw.wanted_by), None))
        kept_names = {m.name for m in plan.keep}
        to_restore = [
            f for f in current.removed
            if (f.kind == "module" and f.kernel == plan.kernel and f.module in kept_names)
            or (f.kind == "firmware" and kept_names & set((f.module or "").split(",")))
        ]
        required = {plan.kernel: {
            m.name for m in plan.keep if any(r.kind == "boot-critical" for r in m.reasons)
        }}
        method = options.initramfs if options.initramfs != "auto" else policy.settings.initramfs
        opts = replace(options, initramfs=method)
        outcome = _transition(
            root, current, to_stash, to_restore,
            action="apply",
            description=f"trim kernel {plan.kernel}: keep {len(plan.keep)}, "
                        f"remove {len(plan.remove)} modules",
            options=opts,
            required=required,
            keep_reasons={m.name: m.reasons[0].describe() for m in plan.keep},
        )
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
                        if f.kernel is None or _kernel_installed(root, f.kernel)}
        current_paths = {f.path for f in current.removed}
        to_restore = [f for f in current.removed if f.path not in target_paths]
        to_stash = [
            ToStash(f.path, f.kind, f.module, f.kernel)
            for path, f in target_paths.items()
            if path not in current_paths and os.path.lexists(root / path.lstrip("/"))
        ]
        return _transition(
            root, current, to_stash, to_restore,
            action="rollback",
            description=f"roll back to generation {to}",
            options=options,
            rollback_to=to,
        )


def _kernel_installed(root: Path, kernel: str) -> bool:
    return any((root / base / kernel).is_dir() for base in MODULE_DIR_BASES)


def forget_kernel(root: Path, kernel: str) -> Outcome:
    """After a kernel's removal: drop its stashed files from the state (a new generation)
    and free their stash space. Nothing in any tree changes."""
    with operation_lock(root, f"forget kernel {kernel}"):
        current = current_generation(root)
        gone = [f for f in current.removed if f.kernel == kernel]
        if not gone or _kernel_installed(root, kernel):
            note = "nothing stashed" if not gone else "kernel still installed"
            return Outcome(None, (), (), False, (f"kernel {kernel}: {note}",))
        generation = replace(
            current,
            number=generation_numbers(root)[-1] + 1,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            action="forget",
            description=f"kernel {kernel} was removed: forget its {len(gone)} stashed files",
            removed=tuple(f for f in current.removed if f.kernel != kernel),
            stashed=(), restored=(), kernels=(kernel,), rollback_to=None,
            keep_reasons={}, regen={},
        )
        write_generation(root, generation)
        _finish(root, generation, _backend(root, "auto"))
        return Outcome(generation, (), (), False)


def restore_modules(
    root: Path, names: Sequence[str], index: ModuleIndex, options: Options
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
        return _transition(
            root, current, [], to_restore,
            action="restore",
            description=f"restore {', '.join(normalize(n) for n in names)}"
                        + (f" (+{len(wanted) - len(names)} dependencies)"
                           if len(wanted) > len(names) else ""),
            options=options,
        )
