"""The library calls the CLI and the daemon share: index, gather evidence, plan, explain.

No semantics live only in a shell: ``kmodtrim plan`` and the D-Bus ``Plan`` method both call
``make_plan_for``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .closure import Reason
from .errors import InputError, ModuleParseError, StashError, UnknownModuleError
from .index import (
    IndexStats,
    ModuleIndex,
    StashedModule,
    build_index,
    default_kernel,
    module_dir,
)
from .inputs import read_optional_input
from .names import normalize
from .observe import (
    ObservedName,
    merge_observed,
    read_filesystems,
    read_modaliases,
    read_observed_file,
    read_platform_facts,
    read_proc_modules,
    root_device_drivers,
)
from .planner import Evidence, Plan, inroot_moddir, inroot_path, make_plan, scan_firmware
from .platforms import choose
from .sizes import human_bytes
from .state.observations import read_observations, read_restored, read_supplied

if TYPE_CHECKING:  # the engine loads only when a change runs
    from .executor import Options, Outcome
    from .policy import LoadedPolicy
    from .records import StashedFile
    from .sources.reader import OutOfTreeReader

@dataclass(frozen=True)
class Target:
    """What a request is about: a root (``/`` or an image), a kernel, and its inputs."""

    root: Path = Path("/")
    kernel: str | None = None
    observed_files: tuple[Path, ...] = ()
    policy_file: Path | None = None
    cache_dir: Path | None = None
    symvers: Path | None = None
    use_cache: bool = True
    clouds: tuple[str, ...] = ()  # --cloud: whose drivers to keep (else the policy's)


class CurrentStash:
    """The module files of ``kernel`` that the current generation holds out of the tree (a
    StashedSource; each read, when the index has no cached row for it, from the stash or
    the package archive). Keyed by the newest manifest's number and fingerprint when the
    records need no closer look (state/glance.py), so that a warm index lists them
    without reading the manifest."""

    def __init__(self, root: Path, kernel: str) -> None:
        from .state.glance import quick_or_none

        self.root = root
        self.kernel = kernel
        self.prefix = inroot_path(module_dir(root, kernel), root) + "/"
        quick = quick_or_none(root)
        self.key: tuple[int | str, ...] | None = None if quick is None else (
            quick["generation"], *quick.get("manifest", ()), self.prefix)

    def modules(self) -> list[StashedModule]:
        from . import salvage

        prefix = self.prefix
        entries = [e for e in salvage.view(self.root).generation.removed
                   if e.kind == "module" and e.kernel == self.kernel
                   and e.path.startswith(prefix)]
        readers: list[OutOfTreeReader] = []  # made on the first read: a warm index reads none
        root = self.root

        def load(entry: StashedFile) -> bytes:
            if not readers:
                from .sources.reader import OutOfTreeReader

                readers.append(OutOfTreeReader(root, entries))
            # A damaged copy costs that module only: the index lists it as unreadable.
            try:
                return readers[0].read(entry)
            except StashError as exc:
                raise ModuleParseError(entry.path, exc.message) from None

        return [StashedModule(
            relpath=entry.path[len(prefix):], size=entry.size, sha256=entry.sha256,
            load=lambda entry=entry: load(entry),  # type: ignore[misc]
        ) for entry in entries]


def load_index(target: Target, *, rebuild: bool = False,
               save_cache: bool = True) -> tuple[ModuleIndex, IndexStats]:
    """Index the target's kernel (cached), including modules an earlier trim stashed.
    ``save_cache=False``: for a restore (see build_index).

    Raises KernelNotFoundError.
    """
    kernel = target.kernel or default_kernel(target.root)
    return build_index(
        target.root,
        kernel,
        cache_dir=target.cache_dir,
        use_cache=target.use_cache,
        rebuild=rebuild,
        symvers=target.symvers,
        stashed=CurrentStash(target.root, kernel),
        save_cache=save_cache,
    )


def gather_evidence(target: Target, clouds: Sequence[str] | None = None) -> Evidence:
    """What the root shows (loaded modules, devices, filesystems, root device chain,
    platform) plus the ``--observed`` files. On an image root most of these are simply
    empty. ``clouds``: the policy's platform choice (``--cloud`` wins); None: no platform
    set."""
    given: list[ObservedName] = []
    for path in target.observed_files:
        given.extend(read_observed_file(path))
    root = target.root
    supplied = [ObservedName(name, f"supplied earlier ({source})", None)
                for name, source in sorted(read_supplied(root).items())]
    recorded = read_observations(root)
    source = f"recorded on {len(recorded)} boot(s)"
    names = sorted({n for boot in recorded.values() for n in boot.get("modules", ())})
    # A file supplied again (or a module also recorded) names a module once, from the
    # first source: the --observed file, then what was supplied, then what was recorded.
    observed = merge_observed(given, supplied, (ObservedName(n, source, None) for n in names))
    devices = tuple(read_modaliases(root))
    platform = None if clouds is None else choose(
        target.clouds or clouds, read_platform_facts(root, (d.modalias for d in devices)))
    return Evidence(
        platform=platform,
        restored=tuple(ObservedName(name, source, None)
                       for name, source in sorted(read_restored(root).items())),
        observed=tuple(observed),
        loaded=tuple(read_proc_modules(root)),
        devices=devices,
        filesystems=tuple(read_filesystems(root)),
        root_drivers=tuple(root_device_drivers(root)),
    )


def load_target_policy(target: Target) -> LoadedPolicy:
    """The policy under the root (or the explicit file). Raises PolicyError."""
    if not target.use_cache:
        from .policy import load_policy

        return load_policy(target.root, target.policy_file)
    from .index import default_cache_dir
    from .policy.cache import cached_policy

    return cached_policy(target.root, target.policy_file,
                         target.cache_dir or default_cache_dir(target.root))


@dataclass(frozen=True)
class PlanResult:
    plan: Plan
    index: ModuleIndex
    stats: IndexStats
    evidence: Evidence
    policy: LoadedPolicy


def make_plan_for(target: Target) -> PlanResult:
    """Index, gather, load policy and plan. Raises KmodtrimError subclasses on bad input."""
    policy = load_target_policy(target)
    index, stats = load_index(target)
    evidence = gather_evidence(target, policy.settings.clouds)
    firmware = scan_firmware(target.root) if policy.settings.firmware == "trim" else None
    plan = make_plan(index, evidence, policy, firmware)
    return PlanResult(plan, index, stats, evidence, policy)


@dataclass(frozen=True)
class Explanation:
    """Why one module is kept or removed."""

    name: str
    status: str  # "kept", "removed", "builtin"
    path: str | None
    size: int
    chains: list[list[tuple[str, Reason]]] = field(default_factory=list)
    policy_rule: str | None = None  # the last policy rule matching it, if any
    aliases: tuple[str, ...] = ()
    now: str = ""  # what is true of it now: in the tree, trimmed in N, restored in M
    platforms: tuple[str, ...] | None = None  # whose platform drivers the plan keeps


    def lines(self) -> list[str]:
        """Human-readable explanation."""
        out: list[str] = []
        if self.status == "builtin":
            return [f"{self.name}: built into the kernel (nothing on disk to keep or remove)"]
        out.append(f"{self.name}: {self.status.upper()} ({self.path}, {human_bytes(self.size)})")
        if self.status == "kept":
            for i, chain in enumerate(self.chains, 1):
                head = "  because" if i == 1 else "  and"
                parts = [reason.describe() for _module, reason in chain]
                out.append(f"{head} {' ← '.join(parts)}")
        else:
            out.append("  nothing needs it: not observed loaded, no present device matches its")
            out.append("  aliases, it is not boot-critical, no kept module depends on it,")
            if self.platforms is None:
                out.append("  and no policy rule keeps it.")
            else:
                which = ", ".join(self.platforms) or "no platform"
                out.append("  no policy rule keeps it, and it is no boot-disk or NIC driver of")
                out.append(f"  the platforms kept for ({which}).")
        if self.policy_rule:
            out.append(f"  last matching policy rule: {self.policy_rule}")
        if self.now:
            out.append(f"  now: {self.now}")
        return out


def explanation_json(e: Explanation) -> dict[str, Any]:
    """The JSON document of an explanation (``kmodtrim explain --json`` and D-Bus
    ``Explain``), including the human-readable ``lines``."""
    return {
        "name": e.name,
        "status": e.status,
        "path": e.path,
        "size": e.size,
        "chains": [
            [{"module": module, "kind": r.kind, "detail": r.detail, "via": r.via,
              "text": r.describe()} for module, r in chain]
            for chain in e.chains
        ],
        "policy_rule": e.policy_rule,
        "now": e.now,
        "lines": e.lines(),
    }


def explain(result: PlanResult, name: str) -> Explanation:
    """Explain the decision about ``name`` (a module name or an alias) in ``result``.

    Raises UnknownModuleError (with close matches) when the kernel has no such module.
    """
    index, plan = result.index, result.plan
    resolved = index.resolve(name)
    module = resolved[0] if resolved else normalize(name)
    if module in index.builtins:
        return Explanation(module, "builtin", None, 0)
    entry = index.modules.get(module)
    if entry is None:
        known = list(index.modules) + list(index.builtins)
        close = difflib.get_close_matches(normalize(name), known, n=3)
        raise UnknownModuleError(
            f"kernel {index.kernel} has no module {name!r}",
            hint=f"did you mean {', '.join(close)}?" if close else None,
        )
    rule = result.policy.decide(entry.name, entry.relpath, entry.info.aliases)
    kept = module in plan.closure.kept
    path = f"{inroot_moddir(index)}/{entry.relpath}"
    return Explanation(
        platforms=None if plan.platform is None else plan.platform.names,
        now=_now_state(index.root, path, kept=kept, out=entry.stashed),
        name=module,
        status="kept" if kept else "removed",
        path=path,
        size=entry.size,
        chains=plan.closure.why(module) if kept else [],
        policy_rule=rule.describe() if rule is not None else None,
        aliases=entry.info.aliases,
    )


def _now_state(root: Path, path: str, *, kept: bool, out: bool) -> str:
    """What is true of a module file now, from the generations that moved it."""
    from .store import module_history

    moved = module_history(root, path)
    trimmed, restored = moved["trimmed_in"], moved["restored_in"]
    if out:
        when = f"trimmed in generation {trimmed}" if trimmed is not None else "trimmed"
        return f"{when}; the next apply puts it back" if kept else when
    state = "in the tree"
    if restored is not None:
        state += f" (restored in generation {restored})"
    return state if kept else f"{state}; the next apply removes it"


def kernel_event(target: Target, action: str, kernel: str, options: Options) -> Outcome:
    """A kernel was installed (``add``) or removed (``remove``) under the target's root.

    An added kernel is trimmed like the kernels before it (the observation was already
    accepted then), or — in ``mode = "auto"`` — once the minimum observation is met; in
    manual mode on a never-trimmed machine it is left as installed. A removed kernel's
    stash is forgotten. Idempotent: a second call for the same kernel changes nothing.
    """
    from .executor import Outcome, apply_plan, forget_kernel

    if action == "remove":
        return forget_kernel(target.root, kernel)
    if action != "add":
        raise InputError(f"kernel event {action!r}: expected 'add' or 'remove'")
    target = replace(target, kernel=kernel)
    result = make_plan_for(target)
    from .store import current_generation

    trimmed_before = any(f.kind == "module" and f.kernel != kernel
                         for f in current_generation(target.root).removed)
    if not trimmed_before and result.policy.settings.mode != "auto":
        return Outcome(None, (), (), options.dry_run, (
            f"kernel {kernel}: left as installed (policy mode is manual and no kernel "
            "was trimmed before)",))
    return apply_plan(target.root, result.plan, result.index, result.evidence,
                      result.policy, replace(options, force=options.force or trimmed_before))


def boot_id(root: Path) -> str:
    """This boot's id (ROOT/proc/sys/kernel/random/boot_id), or "offline" for an image."""
    try:
        data = read_optional_input(root / "proc/sys/kernel/random/boot_id", limit=4096,
                                   what="boot id", skip_unreadable=True)
        return (data or b"").decode("ascii", "replace").strip() or "offline"
    except OSError:
        return "offline"
