"""The only writer: apply a plan, restore modules, roll back — each as a new generation.

Every operation is a *transition* from the current generation's set of removed files to a
target set, run under a write-ahead journal:

    journal → exclusions (superset) → stash copies → sync → package removal → unlink
            → restores → package reinstall → depmod → initramfs → manifest (commit)
            → exclusions (final) → GC → clear journal

Before the commit point an interrupted operation is undone on the next start (every file
removed is still in the stash, synced before its unlink); after it, it is finished. At no
point is a file only in memory: each is in the tree or in the stash with a matching hash.

With the dpkg or rpm backend, a package whose every file is trimmed (documentation aside)
is removed whole through the package manager instead of being excluded file by file: its
files, control files and header are stashed and journaled first, so a restore (or an undo)
rebuilds it locally and installs it again — offline, whatever state an interrupted dpkg or
rpm left it in. Package commands run only once the package manager's lock is free.

Set ``KMODTRIM_FAULT=STEP`` (or ``STEP:N`` for the N-th file of a per-file step) to kill
the process with SIGKILL at that step boundary, or ``STEP=enospc`` to fail there as a full
disk would; the tests use it to prove recovery.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import fsutil, salvage
from .backends.package import PackageDescription, PackageManagerBusy, is_doc, other_spelling
from .backends.stash import PutRequest, Stash
from .closure import Reason, closure_of
from .errors import (
    DamagedCopyError,
    InputError,
    PolicyViolation,
    StashError,
    StoreError,
    UnknownModuleError,
    UntrustedStateError,
)
from .index import MODULE_DIR_BASES, ModuleIndex
from .names import is_valid_kernel_version, normalize
from .observe import filesystem_module_aliases
from .planner import Evidence, Plan
from .policy import LoadedPolicy
from .records import managed_path
from .salvage import set_journal_aside
from .store import (
    Generation,
    RemovedPackage,
    StashedFile,
    clear_journal,
    current_generation,
    generation_numbers,
    journal_path,
    load_generation,
    operation_lock,
    read_journal,
    read_observations,
    record_restored,
    record_supplied,
    state_dir,
    write_generation,
    write_journal,
)

Progress = Callable[[str, int, int], None]
FAULT_STEPS = (
    "after-journal", "after-exclude", "stash", "after-stash", "before-package-remove",
    "after-package-remove", "unlink", "after-unlink", "restore", "after-restore",
    "before-package-reinstall", "after-package-reinstall", "after-depmod", "after-initramfs",
    "after-commit", "after-final-exclude",
)
# How long a package operation waits for the package manager's lock (apt, dnf or another
# dpkg/rpm) before the operation fails and is undone; deciding whether a package could be
# removed waits less, then trims it file by file instead.
PM_LOCK_TIMEOUT = 300.0
PM_CHECK_TIMEOUT = 30.0


def fault_point(step: str, n: int | None = None) -> None:
    """Kill this process if KMODTRIM_FAULT names this step (tests prove crash safety)."""
    wanted = os.environ.get("KMODTRIM_FAULT")
    if not wanted:
        return
    wanted, _, effect = wanted.partition("=")
    name, _, count = wanted.partition(":")
    if name == step and (not count or (n is not None and int(count) == n)):
        if effect == "enospc":  # the disk fills here instead
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Options:
    dry_run: bool = False
    force: bool = False
    initramfs: str = "auto"  # auto | skip | dracut | update-initramfs | kernel-install
    backend: str = "auto"  # auto | stash | dpkg | rpm
    progress: Progress | None = None
    remove_packages: bool = True  # a package whose files are all trimmed leaves whole


@dataclass(frozen=True)
class Outcome:
    """What an operation did (or, with dry_run, would do)."""

    generation: Generation | None  # None for a dry run or a no-op
    stash: tuple[str, ...]
    restore: tuple[str, ...]
    dry_run: bool
    notes: tuple[str, ...] = ()
    regen: dict[str, Any] = field(default_factory=dict)
    packages_removed: tuple[str, ...] = ()  # whole packages removed (or, dry, to remove)
    packages_reinstalled: tuple[str, ...] = ()
    damaged: tuple[str, ...] = ()  # files not put back: their stash copy is damaged

    def to_json(self) -> dict[str, Any]:
        return {
            "damaged": list(self.damaged),
            "generation": self.generation.number if self.generation else None,
            "dry_run": self.dry_run,
            "stash": list(self.stash),
            "restore": list(self.restore),
            "notes": list(self.notes),
            "regen": self.regen,
            "packages_removed": list(self.packages_removed),
            "packages_reinstalled": list(self.packages_reinstalled),
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


def _has_backend(backend: Any) -> bool:
    return backend is not None and getattr(backend, "name", "none") != "none"


def _exclusion_backends(current: Generation, backend: Any,
                        removed: Sequence[StashedFile]) -> tuple[str, ...]:
    """The package managers whose exclusions a new state with ``removed`` out of the tree
    has written: this operation's, and every earlier one's (they are rewritten too) —
    none once nothing is out any more (their exclusions are then empty)."""
    if not removed:
        return ()
    names = set(current.exclusion_backends)
    if _has_backend(backend):
        names.add(backend.name)
    return tuple(sorted(names))


def _write_all_exclusions(root: Path, backend: Any, paths: set[str],
                          recorded: Iterable[str]) -> None:
    """Make the exclusions of this operation's backend and of every backend that wrote
    some before (``recorded``) say exactly ``paths``: state a generation wrote is undone
    by the backend that wrote it, whatever the policy says now."""
    from .backends.package import backend_by_name

    _write_exclusions(backend, root, paths)
    done = {backend.name} if _has_backend(backend) else set()
    for name in sorted(set(recorded) - done):
        _write_exclusions(backend_by_name(name), root, paths)


# ---------------------------------------------------------------------------------------
# Whole packages: one whose every file is trimmed (documentation aside) leaves through the
# package manager, and comes back rebuilt from the stash when any of its files is wanted.


@dataclass(frozen=True)
class _PackagePlan:
    remove: tuple[PackageDescription, ...] = ()
    reinstall: tuple[RemovedPackage, ...] = ()
    notes: tuple[str, ...] = ()
    returned: tuple[str, ...] = ()  # removed packages installed again by someone else


def _spellings(paths: Iterable[str]) -> set[str]:
    """``paths`` under both usrmerge spellings."""
    out = set()
    for path in paths:
        out.add(path)
        alt = other_spelling(path)
        if alt is not None:
            out.add(alt)
    return out


def _split_listing(root: Path, paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """A package's listed paths as (directories, other files). A path is a directory when
    the package lists something under it or it is a real directory in the tree (a listed
    /lib on a usrmerged root is a directory to the package, a symlink in the tree)."""
    parents = {path.rsplit("/", 1)[0] for path in paths}
    dirs, files = [], []
    for path in paths:
        full = root / path.lstrip("/")
        if path in parents or (full.is_dir() and not full.is_symlink()):
            dirs.append(path)
        else:
            files.append(path)
    return dirs, files


def _is_module(path: str) -> bool:
    return "/modules/" in path and ".ko" in path.rsplit("/", 1)[-1]


def _plan_packages(root: Path, backend: Any, current: Generation, new_paths: set[str],
                   owners: dict[str, str | None], *, enabled: bool,
                   candidates: set[str] | None = None) -> _PackagePlan:
    """Which packages this transition removes whole and which it reinstalls.

    A removed package comes back when any of its files (documentation aside) is no longer
    to be out of the tree. An installed package owning a path of ``new_paths`` is removed
    when every non-directory path it lists is in ``new_paths`` (either usrmerge spelling)
    or is documentation — a kernel image package owning /boot/vmlinuz never is — and the
    package manager agrees that removing it removes nothing else. Otherwise its files are
    trimmed one by one, with a note saying why. ``candidates`` limits removals to those
    names (a rollback re-removes only what its target had removed).
    Raises CommandError when the package manager cannot be queried.
    """
    if not _has_backend(backend):
        return _PackagePlan()
    spelled = _spellings(new_paths)
    notes: list[str] = []
    # One installed again outside kmodtrim (apt/dnf) is not reinstalled (that could be a
    # downgrade): it is simply no longer recorded as removed.
    returned = tuple(p.name for p in current.packages
                     if backend.package_state(root, p.name) == "installed")
    notes += [f"package {name} was installed again meanwhile; it is no longer recorded as "
              "removed" for name in returned]
    reinstall = tuple(p for p in current.packages if p.name not in returned
                      and any(not is_doc(f.path) and f.path not in spelled for f in p.files))
    if not enabled:
        return _PackagePlan(reinstall=reinstall, notes=tuple(notes), returned=returned)
    gone = {p.name for p in current.packages} - set(returned)
    names = {pkg for path, pkg in owners.items() if pkg and path in new_paths} - gone
    if candidates is not None:
        names &= candidates
    whole: list[PackageDescription] = []
    for name in sorted(names):
        if _gone(backend.package_state(root, name)):
            continue  # not installed (any more): nothing to remove
        _dirs, files = _split_listing(root, backend.package_files(root, name))
        trimmed = [f for f in files if f in spelled]
        staying = [f for f in files if f not in spelled and not is_doc(f)]
        if trimmed and not staying:
            try:
                whole.append(backend.describe_package(root, name))
            except InputError as exc:
                notes.append(f"package {name} stays installed ({exc.message}); its files "
                             "are excluded one by one")
        elif trimmed and not any(_is_module(f) for f in staying):
            notes.append(f"package {name} stays installed: it also owns {staying[0]}"
                         + (f" and {len(staying) - 1} more file(s)" if len(staying) > 1 else "")
                         + f"; its {len(trimmed)} trimmed file(s) are excluded one by one")
    if not whole:
        return _PackagePlan(reinstall=reinstall, notes=tuple(notes), returned=returned)
    try:
        backend.wait_for_lock(root, PM_CHECK_TIMEOUT)
    except PackageManagerBusy as exc:
        notes.append(f"{backend.name} is busy ({exc.message}); package(s) "
                     f"{', '.join(d.name for d in whole)} trimmed file by file instead")
        return _PackagePlan(reinstall=reinstall, notes=tuple(notes), returned=returned)
    if backend.removal_refusal(root, [d.name for d in whole]) is not None:
        accepted = []
        for desc in whole:
            refusal = backend.removal_refusal(root, [desc.name])
            if refusal is None:
                accepted.append(desc)
            else:
                notes.append(f"package {desc.name} stays installed ({backend.name}: {refusal}); "
                             "its files are excluded one by one")
        if accepted and backend.removal_refusal(root, [d.name for d in accepted]) is not None:
            notes.append(f"packages {', '.join(d.name for d in accepted)} stay installed "
                         "(they cannot be removed together); their files are excluded one by one")
            accepted = []
        whole = accepted
    return _PackagePlan(tuple(whole), reinstall, tuple(notes), returned)


def _package_items(root: Path, remove: Sequence[PackageDescription], spelled: set[str]
                   ) -> list[PutRequest]:
    """What else must be stashed before packages leave whole: their files outside the
    trimmed set (documentation) and their control files."""
    items = []
    for desc in remove:
        _dirs, files = _split_listing(root, desc.paths)
        for path in files:
            if path not in spelled and fsutil.lexists(root, path):
                items.append(PutRequest(path, "package", None, None, desc.name))
        for name, path in sorted(desc.control.items()):
            items.append(PutRequest(path, "package-control", name, None, desc.name))
    return items


def _capture(root: Path, desc: PackageDescription, backend: Any,
             entries: dict[str, StashedFile], extra: Sequence[StashedFile]) -> RemovedPackage:
    """The record a package is rebuilt from: ``entries`` maps every trimmed path (both
    spellings) to its stash entry, ``extra`` are the entries _package_items stashed."""
    dirs, files = _split_listing(root, desc.paths)
    own = {e.path: e for e in extra if e.kind == "package" and e.package == desc.name}
    recorded, absent = [], []
    for path in files:
        entry = own.get(path) or entries.get(path)
        if entry is None:
            absent.append(path)
        else:
            recorded.append(entry if entry.path == path else replace(entry, path=path))
    modes = []
    for path in dirs:
        try:
            modes.append((path, os.stat(root / path.lstrip("/")).st_mode & 0o7777))
        except OSError:
            modes.append((path, 0o755))
    return RemovedPackage(
        name=desc.name, version=desc.version, arch=desc.arch, backend=backend.name,
        metadata=desc.metadata, files=tuple(recorded),
        control=tuple(e for e in extra
                      if e.kind == "package-control" and e.package == desc.name),
        dirs=tuple(modes), absent=tuple(absent))


def _rebuild_dir(root: Path) -> Path:
    return state_dir(root) / "rebuild"


def _rebuild(root: Path, backend: Any, packages: Sequence[RemovedPackage]) -> list[Path]:
    """Rebuild ``packages`` from the stash into archives under the state directory (so a
    restore needs no network). Raises StashError (missing blob, disk full), CommandError."""
    work = _rebuild_dir(root)
    shutil.rmtree(work, ignore_errors=True)
    stash = Stash(root)
    archives = []
    for number, package in enumerate(packages):
        base = work / str(number)
        tree, control = base / "tree", base / "control"
        try:
            tree.mkdir(parents=True)
            control.mkdir()
            for path, _mode in package.dirs:
                (tree / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
            for entry in package.files:
                stash.restore_to(entry, tree)
            for entry in package.control:
                stash.restore_to(replace(entry, path=f"/{entry.module}"), control)
            for path, mode in sorted(package.dirs, reverse=True):
                os.chmod(tree / path.lstrip("/"), mode)
        except (OSError, StashError) as exc:
            reason = exc.message if isinstance(exc, StashError) else exc.strerror or str(exc)
            raise StashError(f"cannot rebuild package {package.name}: {reason}",
                             hint=f"free space under {state_dir(root)} and try again") from None
        archives.append(backend.build_archive(package, tree, control, base))
    return archives


def _package_manager(backend: Any, removed: Sequence[RemovedPackage]) -> Any:
    """The backend that runs package operations: the configured one or — when kmodtrim
    now runs without a package manager but removed packages whole before — the package
    manager that removed them, so that bringing their files back reinstalls them."""
    if _has_backend(backend) or not removed:
        return backend
    from .backends.package import backend_by_name

    return backend_by_name(removed[0].backend)


def _run_package_op(root: Path, backend: Any, op: Callable[[], None]) -> None:
    """Run one package-manager command, never while its lock is held by someone else."""
    backend.wait_for_lock(root, PM_LOCK_TIMEOUT)
    op()


def _gone(state: str) -> bool:
    return state in ("not-installed", "config-files")


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
    to_stash: Sequence[PutRequest],
    to_restore: Sequence[StashedFile],
    *,
    action: str,
    description: str,
    options: Options,
    required: dict[str, set[str]] | None = None,
    rollback_to: int | None = None,
    keep_reasons: dict[str, str] | None = None,
    remove_packages: bool = False,
    package_candidates: set[str] | None = None,
) -> Outcome:
    stash_paths = tuple(t.path for t in to_stash)
    restore_paths = tuple(e.path for e in to_restore)
    backend = _backend(root, options.backend)
    restored = set(restore_paths)
    new_paths = {f.path for f in current.removed if f.path not in restored} | set(stash_paths)
    owners: dict[str, str | None] = {f.path: f.package for f in current.removed}
    if _has_backend(backend) and stash_paths:
        owners.update(backend.owners(root, stash_paths))
    pm = _package_manager(backend, current.packages)
    packages = _plan_packages(root, pm, current, new_paths, owners,
                              enabled=(remove_packages and options.remove_packages
                                       and _has_backend(backend)),
                              candidates=package_candidates)
    removing = tuple(d.name for d in packages.remove)
    reinstalling = tuple(p.name for p in packages.reinstall)
    changes = to_stash or to_restore or removing or reinstalling or packages.returned
    if options.dry_run or not changes:
        notes = packages.notes
        if not changes:
            notes = ("nothing to do", *notes)
        else:
            notes += tuple(f"would remove package {d.name} {d.version} whole"
                           for d in packages.remove)
            notes += tuple(f"would reinstall package {p.name} {p.version} from the stash"
                           for p in packages.reinstall)
        return Outcome(None, stash_paths, restore_paths, options.dry_run, notes,
                       packages_removed=removing, packages_reinstalled=reinstalling)
    kernels = sorted({t.kernel for t in to_stash if t.kernel}
                     | {e.kernel for e in to_restore if e.kernel})
    number = generation_numbers(root)[-1] + 1
    stash = Stash(root)
    journal: dict[str, Any] = {
        "action": action,
        "number": number,
        "from": current.number,
        "stash": [t.__dict__ for t in to_stash],
        "restore": [e.to_json() for e in to_restore],
        "kernels": kernels,
        "backend": options.backend,
        "package_backend": pm.name if _has_backend(pm) else None,
        "packages_remove": list(removing),
        "packages_reinstall": list(reinstalling),
        "phase": "moving",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_journal(root, journal)
    fault_point("after-journal")
    captured: list[RemovedPackage] = []
    damaged: list[str] = []  # restores whose stash copy is damaged or missing
    not_restored: set[str] = set()
    try:
        _write_exclusions(backend, root, {f.path for f in current.removed} | set(stash_paths))
        fault_point("after-exclude")
        spelled = _spellings(new_paths)
        extra_items = _package_items(root, packages.remove, spelled)
        items = [*to_stash, *extra_items]

        def stashed_one(i: int) -> None:
            fault_point("stash", i)
            _notify(options.progress, "stash", i, len(items))

        def describe(stashed: Sequence[StashedFile]) -> dict[str, Any]:
            # What the pack says of itself, so a lost manifest is rebuilt (salvage.py).
            if packages.remove:
                by_path: dict[str, StashedFile] = {}
                for entry in [*current.removed, *stashed[:len(to_stash)]]:
                    if entry.path in new_paths:
                        for spelling in _spellings([entry.path]):
                            by_path.setdefault(spelling, entry)
                captured[:] = [_capture(root, desc, pm, by_path, stashed[len(to_stash):])
                               for desc in packages.remove]
            return {"action": action, "created": journal["started"],
                    "packages": [p.to_json() for p in captured]}

        stashed = stash.put_many(
            [replace(item, package=item.package or owners.get(item.path)) for item in items],
            each=stashed_one, generation=number, describe=describe)
        new_entries = stashed[:len(to_stash)]  # put_many returns once they are durable
        journal["stashed_entries"] = [e.to_json() for e in new_entries]
        if captured:
            journal["packages_captured"] = [p.to_json() for p in captured]
        write_journal(root, journal)
        fault_point("after-stash")
        if removing:
            journal["packages_removing"] = True
            write_journal(root, journal)
            fault_point("before-package-remove")
            _notify(options.progress, "remove packages", 0, len(removing))
            _run_package_op(root, pm, lambda: pm.remove_packages(root, list(removing)))
            fault_point("after-package-remove")
            _notify(options.progress, "remove packages", len(removing), len(removing))
        for i, item in enumerate(to_stash, 1):
            fsutil.unlink(root, item.path)
            fault_point("unlink", i)
        fault_point("after-unlink")
        for i, entry in enumerate(to_restore, 1):
            try:
                stash.restore(entry)
            except DamagedCopyError as exc:
                # Damage is per file: the others still come back; this one stays out of
                # the tree (and in the state), named in the outcome and by status.
                damaged.append(exc.message)
                not_restored.add(entry.path)
            fault_point("restore", i)
            _notify(options.progress, "restore", i, len(to_restore))
        if to_restore:
            os.sync()
        fault_point("after-restore")
        if reinstalling:
            # The files staying trimmed stay out of the reinstalled packages.
            _write_exclusions(pm, root, new_paths)
            archives = _rebuild(root, pm, packages.reinstall)
            journal["packages_reinstalling"] = True
            write_journal(root, journal)
            fault_point("before-package-reinstall")
            _notify(options.progress, "reinstall packages", 0, len(archives))
            _run_package_op(root, pm, lambda: pm.install_archives(root, archives))
            fault_point("after-package-reinstall")
            _notify(options.progress, "reinstall packages", len(archives), len(archives))
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
            raise StashError(
                f"{action} failed and was undone: {exc.strerror or exc}; the tree is as it "
                "was and the stash space the operation took was given back",
                hint="free space (df /var/lib/kmodtrim) and try again"
                if exc.errno == errno.ENOSPC else None) from exc
        raise
    put_back = tuple(p for p in restore_paths if p not in not_restored)
    removed = [f for f in current.removed if f.path not in put_back] + new_entries
    kept_packages = [p for p in current.packages
                     if p.name not in reinstalling and p.name not in packages.returned]
    generation = Generation(
        number=number,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        action=action,
        description=description + "".join(
            f"; {verb} package{'s' if len(names) > 1 else ''} {', '.join(names)}"
            for verb, names in (("remove", removing), ("reinstall", reinstalling)) if names),
        removed=tuple(sorted(removed, key=lambda f: f.path)),
        stashed=stash_paths,
        restored=put_back,
        kernels=tuple(kernels),
        rollback_to=rollback_to,
        keep_reasons=keep_reasons or {},
        regen=regen_results,
        packages=tuple(sorted([*kept_packages, *captured], key=lambda p: p.name)),
        packages_removed=removing,
        packages_reinstalled=reinstalling,
        exclusion_backends=_exclusion_backends(current, backend, removed),
    )
    write_generation(root, generation)  # the commit point
    fault_point("after-commit")
    _finish(root, generation, backend, current.exclusion_backends)
    tool = getattr(pm, "name", "the package manager")
    notes = packages.notes + tuple(
        f"removed package {p.name} {p.version} whole ({tool}); its {len(p.files)} files are "
        "in the stash and restoring any of them reinstalls it" for p in captured
    ) + tuple(f"reinstalled package {p.name} {p.version} from the stash"
              for p in packages.reinstall)
    return Outcome(generation, stash_paths, put_back, False, notes, regen=regen_results,
                   packages_removed=removing, packages_reinstalled=reinstalling,
                   damaged=tuple(damaged))


def _finish(root: Path, generation: Generation, backend: Any,
            previous: Iterable[str] = ()) -> None:
    _write_all_exclusions(root, backend, {f.path for f in generation.removed},
                          {*generation.exclusion_backends, *previous})
    fault_point("after-final-exclude")
    shutil.rmtree(_rebuild_dir(root), ignore_errors=True)
    Stash(root).collect_garbage(generation.referenced_blobs, generation.number)
    clear_journal(root)


def _undo(root: Path, journal: dict[str, Any], current: Generation) -> None:
    """Return the tree (and the package manager) to ``current``'s state after an
    interrupted transition, sweep the temporary files it may have left, and give back
    the stash space it took."""
    stash = Stash(root)
    current_paths = {f.path for f in current.removed}
    touched = [item["path"] for item in journal.get("stash", [])] + \
        [doc["path"] for doc in journal.get("restore", [])]
    fsutil.sweep_temporaries(root, touched)
    entries = {e.path: e for e in _journal_entries(journal)}
    # Files the transition took out: put back any that is gone (their blobs were synced
    # before the unlink, so a missing file always has its copy).
    for item in journal.get("stash", []):
        if fsutil.lexists(root, item["path"]):
            continue
        entry = entries.get(item["path"])
        if entry is None:
            raise StashError(f"cannot undo: no stash copy of {item['path']}")
        stash.restore(entry)
    # Files the transition put back: take them out again (their blobs are still there).
    for doc in journal.get("restore", []):
        entry = StashedFile.from_json(doc)
        if entry.path in current_paths and fsutil.lexists(root, entry.path) \
                and stash.has_copy(entry):
            fsutil.unlink(root, entry.path)
    os.sync()
    backend = _backend(root, journal.get("backend", "auto"))
    _write_all_exclusions(root, backend, current_paths, current.exclusion_backends)
    if journal.get("package_backend"):
        from .backends.package import backend_by_name

        backend = backend_by_name(journal["package_backend"])
    _undo_packages(root, backend, journal, current)
    _restore_initramfs(root, journal)
    from . import regen

    for kernel in journal.get("kernels", []):
        if _kernel_installed(root, kernel):
            regen.run_depmod(root, kernel)
    shutil.rmtree(_rebuild_dir(root), ignore_errors=True)
    # What this transition stashed is no longer needed: a failed operation gives back
    # the space it took (its pack goes, unless older files share it).
    stash.collect_garbage(current.referenced_blobs)
    clear_journal(root)


def _undo_packages(root: Path, backend: Any, journal: dict[str, Any],
                   current: Generation) -> None:
    """Packages an interrupted transition was reinstalling go out again; packages it was
    removing come back, rebuilt from the copies it stashed before the removal started.
    Whatever state dpkg/rpm was killed in (half-installed, unpacked, …) ends consistent:
    installed as before, or not installed. With ROOT's exclusions already those of the
    state being returned to."""
    if not _has_backend(backend):
        return
    if journal.get("packages_reinstalling"):
        records = {p.name: p for p in current.packages}
        states = {name: backend.package_state(root, name)
                  for name in journal.get("packages_reinstall", [])}
        # dpkg refuses to remove a package it left half-installed, and rpm may have left
        # files of a package it had not registered yet: install it whole first.
        broken = [records[n] for n, state in states.items() if n in records and (
            not backend.partial_states or state == "half-installed")]
        if broken:
            archives = _rebuild(root, backend, broken)
            _run_package_op(root, backend, lambda: backend.install_archives(root, archives))
        reinstalled = {p.name for p in broken}
        back = [name for name, state in states.items()
                if not _gone(state) or name in reinstalled]
        if back:
            _run_package_op(root, backend, lambda: backend.remove_packages(root, back))
    if journal.get("packages_removing"):
        captured = {doc["name"]: RemovedPackage.from_json(doc)
                    for doc in journal.get("packages_captured", [])}
        gone = [captured[name] for name in journal.get("packages_remove", [])
                if name in captured and (not backend.partial_states
                                         or backend.package_state(root, name) != "installed")]
        if gone:
            archives = _rebuild(root, backend, gone)
            _run_package_op(root, backend, lambda: backend.install_archives(root, archives))


def _journal_entries(journal: dict[str, Any]) -> list[StashedFile]:
    """Stash entries the interrupted transition recorded (written to the journal after
    the copies were synced and before any original was unlinked)."""
    return [StashedFile.from_json(doc) for doc in journal.get("stashed_entries", [])]


def _check_journal(root: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` if it is a journal recovery can act on; raises StoreError naming what is
    wrong. Every path in it is checked as a state record's would be."""
    def need(key: str, kinds: tuple[type, ...]) -> Any:
        if key not in doc:
            raise StoreError(f"journal: missing field {key!r}")
        if not isinstance(doc[key], kinds) or isinstance(doc[key], bool):
            raise StoreError(f"journal: field {key!r} has the wrong type")
        return doc[key]

    need("action", (str,))
    need("number", (int,))
    need("from", (int,))
    for key in ("stash", "restore", "stashed_entries", "kernels", "packages_remove",
                "packages_reinstall", "packages_captured"):
        if not isinstance(doc.get(key, []), list):
            raise StoreError(f"journal: field {key!r} must be a list")
    for item in doc.get("stash", []):
        if not isinstance(item, dict):
            raise StoreError("journal: a stash item is not an object")
        managed_path(item.get("path"), str(item.get("kind", "module")))
    for key in ("restore", "stashed_entries"):
        for entry in doc.get(key, []):
            StashedFile.from_json(entry)
    for package in doc.get("packages_captured", []):
        RemovedPackage.from_json(package)
    for kernel in doc.get("kernels", []):
        if not isinstance(kernel, str) or not is_valid_kernel_version(kernel):
            raise StoreError(f"journal: {str(kernel)[:80]!r} is not a kernel version")
    pending = doc.get("initramfs_pending") or {}
    if not isinstance(pending, dict):
        raise StoreError("journal: field 'initramfs_pending' must be an object")
    boots = [os.path.normpath(root / d) + "/" for d in ("boot", "efi")]
    for item in pending.values():
        image = item.get("image") if isinstance(item, dict) else None
        if not isinstance(image, str) or os.path.normpath(image) != image \
                or not image.startswith(tuple(boots)):
            raise StoreError("journal: an initramfs entry is not an image in the root's "
                             "/boot or /efi")
    return doc


def _recover_damaged_journal(root: Path, exc: StoreError) -> str:
    """Recovery without a usable journal: the stash's own records say what the
    interrupted operation had taken out; every such file still missing from the tree (and
    not out in the last committed generation) is put back. Nothing is guessed beyond
    that: package steps of the operation are reported, not undone."""
    aside = set_journal_aside(root)
    committed = generation_numbers(root)[-1]
    stash = Stash(root)
    current = load_generation(root, committed)
    records = [r for r in stash.records() if r.generation > committed and r.manifest]
    out = {f.path for f in current.removed}
    put_back = 0
    for record in records:
        docs = (record.manifest or {}).get("files") or []
        entries = []
        for doc in docs:
            with contextlib.suppress(StoreError):
                entries.append(StashedFile.from_json(doc))
        fsutil.sweep_temporaries(root, [e.path for e in entries])
        for entry in entries:
            if entry.path not in out and not fsutil.lexists(root, entry.path):
                stash.restore(entry)
                put_back += 1
    fsutil.sweep_temporaries(root, sorted(out))
    if put_back:
        os.sync()
    from . import regen

    for kernel in {k for f in current.removed if (k := f.kernel)} | _tree_kernels(root):
        regen.run_depmod(root, kernel)
    stash.collect_garbage(current.referenced_blobs)
    return (f"the journal was damaged ({exc.message}; kept as {aside.name}): put back "
            f"{put_back} file(s) the interrupted operation had taken out, from the stash's "
            f"own records (generation {committed} stays current); if it was removing or "
            "reinstalling packages, check them with the package manager")


def _tree_kernels(root: Path) -> set[str]:
    kernels = set()
    for base in MODULE_DIR_BASES:
        with contextlib.suppress(OSError):
            kernels |= {k for k in os.listdir(root / base)
                        if is_valid_kernel_version(k) and (root / base / k).is_dir()}
    return kernels


def recover(root: Path) -> str | None:
    """Finish or undo an interrupted operation, or rebuild state whose records were lost
    (salvage.py). Returns what was done, or None when nothing needed doing."""
    try:
        journal = read_journal(root)
        damage: StoreError | None = None
        if journal is not None:
            journal = _check_journal(root, journal)
    except UntrustedStateError:
        raise  # planted, not damaged: never acted on
    except StoreError as exc:
        if not journal_path(root).exists():
            raise
        journal, damage = None, exc
    state = salvage.view(root)
    if journal is None and damage is None and not state.salvaged:
        return None
    with operation_lock(root, "recovery"):
        if damage is not None:
            return _recover_damaged_journal(root, damage)
        if journal is None:
            return salvage.salvage(root)
        number = int(journal["number"])
        if number in generation_numbers(root):
            generation = load_generation(root, number)
            previous = load_generation(root, int(journal["from"])).exclusion_backends \
                if int(journal["from"]) in generation_numbers(root) else ()
            _finish(root, generation, _backend(root, journal.get("backend", "auto")),
                    previous)
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
        to_stash: list[PutRequest] = []
        for m in plan.remove:
            for path in m.files:
                if path not in already and fsutil.lexists(root, path):
                    to_stash.append(PutRequest(path, "module", m.name, plan.kernel))
        for fw in plan.firmware_remove:
            if fw.path not in already:
                to_stash.append(PutRequest(fw.path, "firmware", ",".join(fw.wanted_by), None))
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
            remove_packages=policy.settings.remove_packages,
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
            PutRequest(f.path, f.kind, f.module, f.kernel)
            for path, f in target_paths.items()
            if path not in current_paths and fsutil.lexists(root, path)
        ]
        return _transition(
            root, current, to_stash, to_restore,
            action="rollback",
            description=f"roll back to generation {to}",
            options=options,
            rollback_to=to,
            remove_packages=True,
            package_candidates={p.name for p in target.packages},
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
            # A package removed whole with that kernel's modules goes with it.
            packages=tuple(p for p in current.packages
                           if not any(f"/modules/{kernel}/" in f.path for f in p.files)),
            packages_removed=(), packages_reinstalled=(),
            stashed=(), restored=(), kernels=(kernel,), rollback_to=None,
            keep_reasons={}, regen={},
        )
        write_generation(root, generation)
        _finish(root, generation, _backend(root, "auto"))
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
        outcome = _transition(
            root, current, [], to_restore,
            action="restore",
            description=f"restore {', '.join(normalize(n) for n in names)}"
                        + (f" (+{len(wanted) - len(names)} dependencies)"
                           if len(wanted) > len(names) else ""),
            options=options,
        )
        if not options.dry_run:
            # A restore sticks: later plans keep these until the admin forgets them.
            when = time.strftime("%Y-%m-%d %H:%M")
            record_restored(root, {normalize(n): f"{how} on {when}" for n in names})
        return outcome
