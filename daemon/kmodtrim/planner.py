"""(index, evidence, policy) → Plan: what to keep and why, what to remove and what it saves.

Pure: reads nothing but what it is given; the firmware tree (sizes and link targets) comes
in ``firmware_files``, which the caller builds with ``scan_firmware``.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .closure import Closure, Reason, ReasonKind, UnresolvedSymbol, closure_of, verify_symbols
from .index import ModuleIndex
from .observe import (
    DeviceModalias,
    MountedFilesystem,
    ObservedName,
    RootDriver,
    filesystem_module_aliases,
)
from .platforms import PlatformChoice

if TYPE_CHECKING:  # the policy (pydantic) loads only where a policy is read
    from .policy import LoadedPolicy

FIRMWARE_BASES = ("lib/firmware", "usr/lib/firmware")
_FIRMWARE_SUFFIXES = ("", ".xz", ".zst")
BOOT_MOUNTPOINTS = frozenset({"/", "/usr", "/boot", "/boot/efi", "/efi", "/var"})


@dataclass(frozen=True)
class Evidence:
    """Everything observed about the machine the plan is for."""

    observed: Sequence[ObservedName] = ()  # seen loaded (history, --observed files)
    loaded: Sequence[ObservedName] = ()  # loaded right now in the running kernel
    devices: Sequence[DeviceModalias] = ()
    filesystems: Sequence[MountedFilesystem] = ()
    root_drivers: Sequence[RootDriver] = ()
    restored: Sequence[ObservedName] = ()  # restored by hand or on demand, until forgotten
    # Whose boot-disk and NIC drivers to keep (platforms.py); None: no platform set.
    platform: PlatformChoice | None = None


@dataclass(frozen=True)
class KeptModule:
    name: str
    path: str  # in-root path, e.g. /lib/modules/KVER/kernel/…/virtio_net.ko
    size: int
    reasons: tuple[Reason, ...]
    stashed: bool = False  # trimmed earlier and now needed: applying restores it


@dataclass(frozen=True)
class RemovedModule:
    name: str
    path: str
    size: int
    files: tuple[str, ...]  # every in-root file that goes (the module and shadowed copies)
    stashed: bool = False  # already out of the tree


@dataclass(frozen=True)
class FirmwareFile:
    path: str  # in-root path
    size: int
    wanted_by: tuple[str, ...]  # removed modules that name it


@dataclass(frozen=True)
class Plan:
    """The decision for one kernel: every module is either kept (with reasons) or removed."""

    root: str
    kernel: str
    keep: tuple[KeptModule, ...]
    remove: tuple[RemovedModule, ...]
    builtin_needed: tuple[str, ...]
    firmware_remove: tuple[FirmwareFile, ...]
    unresolved_symbols: tuple[UnresolvedSymbol, ...]
    warnings: tuple[str, ...]
    kernel_exports_source: str
    closure: Closure = field(repr=False, compare=False)
    platform: PlatformChoice | None = None

    @property
    def keep_bytes(self) -> int:
        return sum(m.size for m in self.keep)

    @property
    def remove_bytes(self) -> int:
        return sum(m.size for m in self.remove)

    @property
    def total_bytes(self) -> int:
        return self.keep_bytes + self.remove_bytes

    @property
    def firmware_bytes(self) -> int:
        return sum(f.size for f in self.firmware_remove)

    def to_json(self) -> dict[str, Any]:
        """A complete, stable JSON document (keys may be added, never renamed)."""
        return {
            "root": self.root,
            "kernel": self.kernel,
            "totals": {
                "modules": len(self.keep) + len(self.remove),
                "keep_modules": len(self.keep),
                "remove_modules": len(self.remove),
                "total_bytes": self.total_bytes,
                "keep_bytes": self.keep_bytes,
                "remove_bytes": self.remove_bytes,
                "firmware_remove_files": len(self.firmware_remove),
                "firmware_remove_bytes": self.firmware_bytes,
            },
            "keep_bytes": self.keep_bytes,
            "remove_bytes": self.remove_bytes,
            "total_bytes": self.total_bytes,
            "keep": [
                {
                    "name": m.name,
                    "path": m.path,
                    "size": m.size,
                    "reasons": [reason_json(r) for r in m.reasons],
                    "stashed": m.stashed,
                }
                for m in self.keep
            ],
            "remove": [
                {"name": m.name, "path": m.path, "size": m.size, "files": list(m.files),
                 "stashed": m.stashed}
                for m in self.remove
            ],
            "builtin_needed": list(self.builtin_needed),
            "firmware_remove": [
                {"path": f.path, "size": f.size, "wanted_by": list(f.wanted_by)}
                for f in self.firmware_remove
            ],
            "unresolved_symbols": [
                {"module": u.module, "path": u.relpath, "symbol": u.symbol, "provider": u.provider}
                for u in self.unresolved_symbols
            ],
            "warnings": list(self.warnings),
            "kernel_exports_source": self.kernel_exports_source,
            "platform": None if self.platform is None else {
                "names": list(self.platform.names), "source": self.platform.source},
        }


def reason_json(reason: Reason) -> dict[str, Any]:
    return {
        "kind": reason.kind,
        "detail": reason.detail,
        "via": reason.via,
        "text": reason.describe(),
    }


def inroot_path(path: Path, root: Path) -> str:
    """``path`` (under ``root``) as seen from inside the root: ``/lib/modules/…``."""
    return "/" + path.relative_to(root).as_posix()


def inroot_moddir(index: ModuleIndex) -> str:
    """The module dir as a path inside the root, e.g. ``/lib/modules/6.1.0-56-amd64``."""
    return inroot_path(index.moddir, index.root)


def seeds_from(
    index: ModuleIndex, evidence: Evidence, policy: LoadedPolicy
) -> tuple[dict[str, list[Reason]], list[str]]:
    """Root reasons per name (module names or aliases) and warnings about the evidence."""
    seeds: dict[str, list[Reason]] = {}
    warnings: list[str] = []

    def add(name: str, reason: Reason) -> None:
        seeds.setdefault(name, []).append(reason)

    for obs in evidence.loaded:
        add(obs.name, Reason("loaded", obs.source))
    for obs in evidence.observed:
        where = f"{obs.source}:{obs.line}" if obs.line else obs.source
        if not index.resolve(obs.name):
            warnings.append(
                f"observed module {obs.name!r} ({where}) is not in kernel {index.kernel}: "
                "neither a module, a builtin nor an alias"
            )
            continue
        add(obs.name, Reason("observed", where))
    for obs in evidence.restored:
        for module in index.resolve(obs.name):
            entry = index.modules.get(module)
            rule = policy.decide(module, entry.relpath, entry.info.aliases) \
                if entry is not None else None
            if rule is None or not rule.exclude:  # a policy exclude lets a restore go
                add(module, Reason("restored", obs.source))
    for dev in evidence.devices:
        for module in index.match_alias(dev.modalias):
            add(module, Reason("hardware", f"{dev.modalias} at {dev.devpath}"))
    for alias, mounts in filesystem_module_aliases(evidence.filesystems).items():
        for fs in mounts:
            kind: ReasonKind = (
                "boot-critical" if fs.mountpoint in BOOT_MOUNTPOINTS else "observed"
            )
            for module in index.resolve(alias):
                add(module, Reason(kind, f"{fs.fstype} filesystem on {fs.mountpoint} "
                                         f"({fs.source})"))
    for drv in evidence.root_drivers:
        detail = f"storage driver of {drv.mountpoint} ({drv.devpath})"
        add(drv.module, Reason("boot-critical", detail))
    platform_rules = _platform_matchers(evidence.platform)
    for entry in index.modules.values():
        rule = policy.decide(entry.name, entry.relpath, entry.info.aliases)
        if rule is not None and not rule.exclude:
            add(entry.name, Reason("policy", rule.describe()))
        elif rule is None:  # a policy exclusion also lets a platform driver go
            platforms = _platform_of(entry.name, platform_rules)
            if platforms is not None:
                add(entry.name, Reason("platform", f"boot disk or NIC of {platforms}"))
    known_aliases = (a for e in index.modules.values() for a in e.info.aliases)
    for rule in policy.literal_rules_matching_nothing(
        list(index.modules) + list(index.builtins), known_aliases
    ):
        warnings.append(f"{rule.describe()} names no module of kernel {index.kernel}")
    return seeds, warnings


_PlatformRules = tuple[dict[str, str], list[tuple[str, str]]]


def _platform_matchers(choice: PlatformChoice | None) -> _PlatformRules:
    """The platform set's module names → the platforms they are kept for, and its globs
    (normalised, ``-`` → ``_``)."""
    names: dict[str, str] = {}
    globs: list[tuple[str, str]] = []
    for pattern, platforms in (choice.drivers() if choice is not None else {}).items():
        pattern = pattern.replace("-", "_")
        if any(c in pattern for c in "*?["):
            globs.append((pattern, platforms))
        else:
            names[pattern] = platforms
    return names, globs


def _platform_of(name: str, rules: _PlatformRules) -> str | None:
    names, globs = rules
    if name in names:
        return names[name]
    return next((p for g, p in globs if fnmatch.fnmatchcase(name, g)), None)


def make_plan(
    index: ModuleIndex,
    evidence: Evidence,
    policy: LoadedPolicy,
    firmware_files: FirmwareFiles | None = None,
) -> Plan:
    """Decide every module of ``index``. ``firmware_files`` maps in-root firmware paths to
    sizes (see scan_firmware); None means firmware is not considered."""
    seeds, warnings = seeds_from(index, evidence, policy)
    closure = closure_of(seeds, index)
    for name, reason in closure.unresolved_names:
        if reason.via is not None:
            warnings.append(f"{name!r}, wanted as {reason.describe()}, matches no module")
    base = inroot_moddir(index)
    keep: list[KeptModule] = []
    remove: list[RemovedModule] = []
    for name in sorted(index.modules):
        entry = index.modules[name]
        path = f"{base}/{entry.relpath}"
        if name in closure.kept:
            keep.append(KeptModule(name, path, entry.size, closure.kept[name], entry.stashed))
        else:
            files = (path, *(f"{base}/{p}" for p in entry.shadowed))
            remove.append(RemovedModule(name, path, entry.size, files, entry.stashed))
    unresolved = verify_symbols(closure.kept, index)
    for problem in unresolved:
        warnings.append(
            f"kept module {problem.module} needs unknown symbol {problem.symbol}"
            + (f" (exported by {problem.provider}, not kept)" if problem.provider else "")
        )
    firmware: list[FirmwareFile] = []
    if firmware_files is not None and policy.settings.firmware == "trim":
        firmware = firmware_to_remove(
            index, [m.name for m in keep], [m.name for m in remove], firmware_files
        )
    return Plan(
        root=str(index.root),
        kernel=index.kernel,
        keep=tuple(keep),
        remove=tuple(remove),
        builtin_needed=tuple(sorted(closure.builtin_needed)),
        firmware_remove=tuple(firmware),
        unresolved_symbols=tuple(unresolved),
        warnings=tuple(dict.fromkeys(warnings)),
        kernel_exports_source=index.kernel_exports_source,
        closure=closure,
        platform=evidence.platform,
    )


# ---------------------------------------------------------------------------------------
# Firmware


FirmwareFiles = Mapping[str, "int | str"]


def scan_firmware(root: Path) -> dict[str, int | str]:
    """Every firmware file and symlink under ROOT/lib/firmware and ROOT/usr/lib/firmware,
    as in-root path → size, or, for a symlink, the in-root path it points to (read here,
    so the planner decides on data alone). On a usrmerged root (``lib`` or ``lib/firmware``
    a link) the files are listed once, under /usr/lib/firmware."""
    files: dict[str, int | str] = {}
    for base in FIRMWARE_BASES:
        top = root / base
        if not top.is_dir() or (base == "lib/firmware" and (
                top.is_symlink() or (root / "lib").is_symlink())):
            continue
        for directory, _dirs, names in os.walk(top):
            rel_dir = "/" + os.path.relpath(directory, root)
            for name in names:
                full = os.path.join(directory, name)
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                path = f"{rel_dir}/{name}"
                if not stat.S_ISLNK(st.st_mode):
                    files[path] = st.st_size
                    continue
                try:
                    target = os.readlink(full)
                except OSError:
                    continue
                files[path] = os.path.normpath(
                    target if target.startswith("/")
                    else os.path.join(os.path.dirname(path), target))
    return files


def _firmware_prefixes(kernel: str) -> tuple[str, ...]:
    """The kernel's firmware search path, as in-root directory prefixes, in order."""
    return tuple(f"/{base}/{sub}" for base in FIRMWARE_BASES
                 for sub in ("updates/" + kernel + "/", "updates/", kernel + "/", ""))


def _firmware_matches(
    wanted: str, kernel: str, firmware_files: FirmwareFiles,
    by_suffix: Mapping[str, list[str]]
) -> list[str]:
    """In-root firmware paths a request for ``wanted`` could load (search path, compressed
    variants, globs in modinfo)."""
    found: list[str] = []
    if not firmware_files:
        return found
    if any(ch in wanted for ch in "*?["):
        for prefix in _firmware_prefixes(kernel):
            found.extend(
                p for p in by_suffix.get(prefix, ())
                if fnmatch.fnmatchcase(p[len(prefix):], wanted)
                or fnmatch.fnmatchcase(p[len(prefix):], wanted + ".xz")
                or fnmatch.fnmatchcase(p[len(prefix):], wanted + ".zst")
            )
        return found
    for prefix in _firmware_prefixes(kernel):
        for suffix in _FIRMWARE_SUFFIXES:
            candidate = prefix + wanted + suffix
            if candidate in firmware_files:
                found.append(candidate)
    return found


def firmware_to_remove(
    index: ModuleIndex,
    kept: Iterable[str],
    removed: Iterable[str],
    firmware_files: FirmwareFiles,
) -> list[FirmwareFile]:
    """Firmware named only by removed modules. Everything a kept module may request —
    including symlink targets — stays."""
    if not firmware_files:
        return []  # nothing to remove, and nothing to look up for each module
    prefixes = _firmware_prefixes(index.kernel)
    by_prefix: dict[str, list[str]] = {}
    for path in firmware_files:
        for prefix in prefixes:
            if path.startswith(prefix):
                by_prefix.setdefault(prefix, []).append(path)

    def closure_of_paths(paths: Iterable[str]) -> set[str]:
        # A requested path plus every link target it leads to.
        result: set[str] = set()
        stack = list(paths)
        while stack:
            path = stack.pop()
            if path in result:
                continue
            result.add(path)
            target = firmware_files.get(path)
            if isinstance(target, str):
                stack.append(target)
        return result

    def requested_by(names: Iterable[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for name in names:
            entry = index.modules.get(name)
            if entry is None:
                continue
            for wanted in entry.info.firmware:
                for path in closure_of_paths(
                    _firmware_matches(wanted, index.kernel, firmware_files, by_prefix)
                ):
                    out.setdefault(path, set()).add(name)
        return out

    protected = requested_by(kept)
    candidates = requested_by(removed)
    # A link nobody requests but that stays must not be left dangling: keep its targets.
    changed = True
    while changed:
        changed = False
        for path, size in firmware_files.items():
            if not isinstance(size, str) or (path in candidates and path not in protected):
                continue
            for target in closure_of_paths([path]) - {path}:
                if target in candidates and target not in protected:
                    protected[target] = {"(symlink " + path + ")"}
                    changed = True
    result = []
    for path in sorted(candidates):
        if path in protected or path not in firmware_files:
            continue
        size = firmware_files[path]
        result.append(FirmwareFile(path, size if isinstance(size, int) else 0,
                                   tuple(sorted(candidates[path]))))
    return result
