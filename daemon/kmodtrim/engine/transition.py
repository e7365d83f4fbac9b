"""A transition: from the current generation's set of removed files to a target set, as
one new generation, under a write-ahead journal:

    journal → exclusions (superset) → stash copies → package removal → unlink
            → archive fetch → restores → package reinstall → depmod → initramfs
            → manifest (commit) → exclusions (final) → on-demand modprobe.d file
            → GC → clear journal

Each file taken out comes back from its record's source (sources/): a stash copy, or the
package archive for files it serves (no local copy; sources/choice.py decides which). A
file the archive brings back is downloaded and verified before any restore writes to the
tree, so a failed download or a digest mismatch undoes the operation having written
nothing.

Before the commit point an interrupted transition is undone on the next start (every file
removed is still in the stash, synced before its unlink, or served by the archive); after
it, it is finished. At no point is a file only in memory: each is in the tree, in the
stash with a matching hash, or in the archive at its recorded package version.

Set ``KMODTRIM_FAULT=STEP`` (or ``STEP:N`` for the N-th file of a per-file step) to kill
the process with SIGKILL at that step boundary, or ``STEP=enospc`` to fail there as a full
disk would; the tests use it to prove recovery.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import fsutil
from ..backends.package import PackageBackend
from ..errors import DamagedCopyError, KmodtrimError, StashError, StoreError
from ..paths import kernel_installed
from ..records import Generation, RemovedPackage, StashedFile
from ..sources.payload import DEFAULT_DOWNLOAD, ON_DEMAND_DOWNLOAD
from ..sources.restore import Restorer, sweep
from ..state.stash import Stash
from ..store import clear_journal, generation_numbers, write_generation
from ..takeout import PutRequest, Source
from . import packages as pkg
from .exclusions import (
    exclusion_backends,
    has_package_manager,
    resolve_backend,
    write_all_exclusions,
)
from .journal import Journal, Phase
from .ondemand import write_conf
from .outcome import Bytes
from .outcome import Outcome as Outcome  # re-exported: callers import it from here
from .regenerate import regenerate, restore_initramfs

if TYPE_CHECKING:
    from ..index import ModuleIndex

log = logging.getLogger("kmodtrim.engine")

Progress = Callable[[str, int, int], None]
FAULT_STEPS = (
    "after-journal", "after-exclude", "stash", "after-stash", "before-package-remove",
    "after-package-remove", "unlink", "after-unlink", "after-fetch", "restore",
    "after-restore",
    "before-package-reinstall", "after-package-reinstall", "after-depmod", "after-initramfs",
    "after-commit", "after-final-exclude", "after-on-demand",
)


def fault_point(step: str, n: int | None = None) -> None:
    """Kill this process (or fail as a full disk would) if KMODTRIM_FAULT names this step:
    the tests prove crash safety with it."""
    wanted = os.environ.get("KMODTRIM_FAULT")
    if not wanted:
        return
    wanted, _, effect = wanted.partition("=")
    name, _, count = wanted.partition(":")
    if name == step and (not count or (n is not None and int(count) == n)):
        if effect == "enospc":
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
    # modprobe waits (restore --on-demand): the package manager's lock is waited for a few
    # seconds only, an archive download is bounded (sources/payload.ON_DEMAND_DOWNLOAD).
    on_demand: bool = False


@dataclass
class Change:
    """What a transition is asked to do (the operation decided it)."""

    action: str
    description: str
    to_stash: Sequence[PutRequest]
    to_restore: Sequence[StashedFile]
    required: dict[str, set[str]] = field(default_factory=dict)  # boot-critical per kernel
    rollback_to: int | None = None
    keep_reasons: dict[str, str] = field(default_factory=dict)
    remove_packages: bool = False
    package_candidates: set[str] | None = None
    # For the on-demand modprobe.d file (ondemand.py): an index that knows this change's
    # trimmed modules (saves building one), and the modules the policy excludes (None:
    # as the file says now: a change that reads no policy).
    index: ModuleIndex | None = None
    excluded: set[str] | None = None


class Transition:
    """One transition, its steps named as they run (see the module docstring)."""

    def __init__(self, root: Path, current: Generation, change: Change,
                 options: Options) -> None:
        self.root, self.current, self.change, self.options = root, current, change, options
        self.stash_paths = tuple(t.path for t in change.to_stash)
        self.restore_paths = tuple(e.path for e in change.to_restore)
        self.backend: PackageBackend = resolve_backend(root, options.backend)
        restored = set(self.restore_paths)
        self.new_paths = {f.path for f in current.removed
                          if f.path not in restored} | set(self.stash_paths)
        self.owners: dict[str, str | None] = {f.path: f.package for f in current.removed}
        if has_package_manager(self.backend) and self.stash_paths:
            self.owners.update(self.backend.owners(root, self.stash_paths))
        self.pm = pkg.package_manager(self.backend, current.packages)
        candidates = change.package_candidates
        # A package leaving whole is rebuilt from stash copies: not one whose trimmed files
        # the archive serves (they have none).
        from_archive = {f.package for f in current.removed if f.source is Source.ARCHIVE}
        if from_archive:
            candidates = (candidates if candidates is not None else
                          {p for p in self.owners.values() if p}) - from_archive
        self.packages = pkg.plan_packages(
            root, self.pm, current, self.new_paths, self.owners,
            enabled=(change.remove_packages and options.remove_packages
                     and has_package_manager(self.backend)),
            candidates=candidates)
        self.removing = tuple(d.name for d in self.packages.remove)
        self.reinstalling = tuple(p.name for p in self.packages.reinstall)
        if self.removing:  # a package leaving whole is rebuilt from the stash alone
            change.to_stash = [
                replace(t, source=Source.STASH) if self.owners.get(t.path) in self.removing
                else t for t in change.to_stash]
        self.kernels = sorted({t.kernel for t in change.to_stash if t.kernel}
                              | {e.kernel for e in change.to_restore if e.kernel})
        self.stash = Stash(root)
        self.restorer = Restorer(root, self.stash,
                                 ON_DEMAND_DOWNLOAD if options.on_demand else DEFAULT_DOWNLOAD)
        self.lock_wait = pkg.ON_DEMAND_LOCK_WAIT if options.on_demand else pkg.PM_LOCK_TIMEOUT
        self.stash_before = 0
        self.journal: Journal | None = None
        self.captured: list[RemovedPackage] = []
        self.new_entries: list[StashedFile] = []
        self.damaged: list[str] = []  # restores whose stash copy is damaged or missing
        self.not_restored: set[str] = set()
        self.regen_results: dict[str, Any] = {}

    @property
    def changes(self) -> bool:
        return bool(self.change.to_stash or self.change.to_restore or self.removing
                    or self.reinstalling or self.packages.returned)

    def preview(self) -> Outcome:
        """The outcome of a dry run (or of a transition with nothing to do)."""
        notes = self.packages.notes
        if not self.changes:
            notes = ("nothing to do", *notes)
        else:
            notes += tuple(f"would remove package {d.name} {d.version} whole"
                           for d in self.packages.remove)
            notes += tuple(f"would reinstall package {p.name} {p.version} from the stash"
                           for p in self.packages.reinstall)
        return Outcome(None, self.stash_paths, self.restore_paths, self.options.dry_run, notes,
                       packages_removed=self.removing, packages_reinstalled=self.reinstalling,
                       bytes=self._estimate() if self.changes else Bytes(0, 0, 0))

    def _estimate(self) -> Bytes:
        """A dry run's bytes: file sizes out and in; the stash grows at most by the local
        copies' sizes."""
        out = local = 0
        with fsutil.Walk(self.root) as walk:
            for t in self.change.to_stash:
                try:
                    fd, name = walk.parent(t.path)
                    size = os.lstat(name, dir_fd=fd).st_size
                except (OSError, StoreError):
                    continue
                out += size
                local += size if t.source is Source.STASH else 0
        return Bytes(out, sum(e.size for e in self.change.to_restore), local)

    def _progress(self, step: str, done: int, total: int) -> None:
        if self.options.progress is not None:
            self.options.progress(step, done, total)

    def _save(self) -> Journal:
        assert self.journal is not None
        self.journal.save(self.root)
        return self.journal

    # -- the steps ---------------------------------------------------------------------

    def begin(self) -> None:
        """Write the journal: from here on, recovery knows about this transition."""
        self.stash_before = self.stash.size_on_disk()
        self.journal = Journal(
            action=self.change.action, number=generation_numbers(self.root)[-1] + 1,
            from_generation=self.current.number, stash=list(self.change.to_stash),
            restore=list(self.change.to_restore), kernels=list(self.kernels),
            backend=self.options.backend,
            package_backend=self.pm.name if has_package_manager(self.pm) else None,
            packages_remove=list(self.removing), packages_reinstall=list(self.reinstalling))
        self._save()
        fault_point("after-journal")

    def exclude(self) -> None:
        """Exclusions first as a superset: nothing the package manager unpacks meanwhile
        brings back what is about to go."""
        self.backend.write_exclusions(
            self.root, {f.path for f in self.current.removed} | set(self.stash_paths))
        fault_point("after-exclude")

    def stash_files(self) -> None:
        """Copy every file that leaves (and what packages leaving whole need) into one
        durable pack that describes itself; then journal the entries."""
        journal = self._save()
        to_stash = self.change.to_stash
        spelled = pkg.spellings(self.new_paths)
        items = [*to_stash, *pkg.package_items(self.root, self.packages.remove, spelled)]

        def stashed_one(i: int) -> None:
            fault_point("stash", i)
            self._progress("stash", i, len(items))

        def describe(stashed: Sequence[StashedFile]) -> dict[str, Any]:
            # What the pack says of itself, so a lost manifest is rebuilt (salvage.py).
            if self.packages.remove:
                by_path: dict[str, StashedFile] = {}
                for entry in [*self.current.removed, *stashed[:len(to_stash)]]:
                    if entry.path in self.new_paths:
                        for spelling in pkg.spellings([entry.path]):
                            by_path.setdefault(spelling, entry)
                self.captured[:] = [
                    pkg.capture(self.root, desc, self.pm, by_path, stashed[len(to_stash):])
                    for desc in self.packages.remove]
            return {"action": journal.action, "created": journal.started,
                    "packages": [p.to_json() for p in self.captured]}

        stashed = self.stash.put_many(
            [replace(item, package=item.package or self.owners.get(item.path))
             for item in items],
            each=stashed_one, generation=journal.number, describe=describe)
        self.new_entries = stashed[:len(to_stash)]  # put_many returns once they are durable
        journal.stashed_entries = list(self.new_entries)
        journal.packages_captured = list(self.captured)
        self._save()
        fault_point("after-stash")

    def remove_packages(self) -> None:
        if not self.removing:
            return
        self._save().packages_removing = True
        self._save()
        fault_point("before-package-remove")
        self._progress("remove packages", 0, len(self.removing))
        pkg.run_package_op(self.root, self.pm,
                           lambda: self.pm.remove_packages(self.root, list(self.removing)),
                           self.lock_wait)
        fault_point("after-package-remove")
        self._progress("remove packages", len(self.removing), len(self.removing))

    def unlink(self) -> None:
        with fsutil.Walk(self.root) as walk:
            for i, item in enumerate(self.change.to_stash, 1):
                walk.unlink(item.path)
                fault_point("unlink", i)
        fault_point("after-unlink")

    def fetch(self) -> None:
        """Download and verify what the archive brings back, before anything is put back
        (raises ArchiveError naming the file: the operation is undone)."""
        self.restorer.prepare(self.change.to_restore)
        fault_point("after-fetch")

    def restore_files(self) -> None:
        """Put files back; a damaged copy costs that file only: it stays out of the tree
        (and in the state), named in the outcome and by status."""
        for i, entry in enumerate(self.change.to_restore, 1):
            try:
                self.restorer.restore(entry)
            except DamagedCopyError as exc:
                self.damaged.append(exc.message)
                self.not_restored.add(entry.path)
            fault_point("restore", i)
            self._progress("restore", i, len(self.change.to_restore))
        if self.change.to_restore:
            fsutil.make_durable(self.root, [e.path for e in self.change.to_restore])
        self.restorer.close()
        fault_point("after-restore")

    def reinstall_packages(self) -> None:
        if not self.reinstalling:
            return
        # The files staying trimmed stay out of the reinstalled packages.
        self.pm.write_exclusions(self.root, self.new_paths)
        archives = pkg.rebuild(self.root, self.pm, self.packages.reinstall)
        self._save().packages_reinstalling = True
        self._save()
        fault_point("before-package-reinstall")
        self._progress("reinstall packages", 0, len(archives))
        pkg.run_package_op(self.root, self.pm,
                           lambda: self.pm.install_archives(self.root, archives),
                           self.lock_wait)
        fault_point("after-package-reinstall")
        self._progress("reinstall packages", len(archives), len(archives))

    def regenerate(self) -> None:
        journal = self._save()
        journal.phase = Phase.REGENERATING
        self._save()
        try:
            self.regen_results = regenerate(self.root, self.kernels, self.change.required,
                                            self.options.initramfs, journal, fault_point)
        finally:
            journal.regen = self.regen_results
        self._save()

    def undo(self) -> None:
        if self.journal is not None:
            undo(self.root, self.journal, self.current)

    def failure(self, exc: BaseException) -> BaseException:
        """What to raise after an undo: a plain OSError (a full disk) says what was left."""
        if isinstance(exc, OSError):
            error = StashError(
                f"{self.change.action} failed and was undone: {exc.strerror or exc}; the "
                "tree is as it was and the stash space the operation took was given back",
                hint="free space (df /var/lib/kmodtrim) and try again"
                if exc.errno == errno.ENOSPC else None)
            error.__cause__ = exc
            return error
        return exc

    def commit(self) -> Outcome:
        """Write the new generation (the commit point), then finish."""
        journal = self._save()
        put_back = tuple(p for p in self.restore_paths if p not in self.not_restored)
        removed = [f for f in self.current.removed if f.path not in put_back] \
            + self.new_entries
        kept_packages = [p for p in self.current.packages if p.name not in self.reinstalling
                         and p.name not in self.packages.returned]
        generation = Generation(
            number=journal.number,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            action=self.change.action,
            description=self.change.description + "".join(
                f"; {verb} package{'s' if len(names) > 1 else ''} {', '.join(names)}"
                for verb, names in (("remove", self.removing),
                                    ("reinstall", self.reinstalling)) if names),
            removed=tuple(sorted(removed, key=lambda f: f.path)),
            stashed=self.stash_paths,
            restored=put_back,
            kernels=tuple(self.kernels),
            rollback_to=self.change.rollback_to,
            keep_reasons=self.change.keep_reasons,
            regen=self.regen_results,
            packages=tuple(sorted([*kept_packages, *self.captured], key=lambda p: p.name)),
            packages_removed=self.removing,
            packages_reinstalled=self.reinstalling,
            exclusion_backends=exclusion_backends(self.current, self.backend, removed),
        )
        write_generation(self.root, generation)  # the commit point
        fault_point("after-commit")
        finish(self.root, generation, self.backend, self.current.exclusion_backends,
               index=self.change.index, excluded=self.change.excluded)
        tool = self.pm.name
        restored = {e.path: e.size for e in self.change.to_restore}
        moved = Bytes(sum(e.size for e in self.new_entries),
                      sum(restored[p] for p in put_back),
                      self.stash.size_on_disk() - self.stash_before,
                      sum(int((e.get("initramfs") or {}).get("boot_growth_bytes", 0))
                          for e in self.regen_results.values()))
        notes = self.packages.notes + tuple(
            f"removed package {p.name} {p.version} whole ({tool}); its {len(p.files)} files "
            "are in the stash and restoring any of them reinstalls it" for p in self.captured
        ) + tuple(f"reinstalled package {p.name} {p.version} from the stash"
                  for p in self.packages.reinstall)
        return Outcome(generation, self.stash_paths, put_back, False, notes,
                       regen=self.regen_results, packages_removed=self.removing,
                       packages_reinstalled=self.reinstalling, damaged=tuple(self.damaged),
                       bytes=moved)


def run(root: Path, current: Generation, change: Change, options: Options) -> Outcome:
    """Run ``change`` from ``current`` as a new generation (call under the operation
    lock). Raises StashError, CommandError, StoreError; the tree is then as it was."""
    tx = Transition(root, current, change, options)
    if options.dry_run or not tx.changes:
        return tx.preview()
    tx.begin()
    try:
        tx.exclude()
        tx.stash_files()
        tx.remove_packages()
        tx.unlink()
        tx.fetch()
        tx.restore_files()
        tx.reinstall_packages()
        tx.regenerate()
    except BaseException as exc:
        tx.undo()  # synchronously: the same code crash recovery runs
        raise tx.failure(exc) from None
    return tx.commit()


def finish(root: Path, generation: Generation, backend: PackageBackend,
           previous: Iterable[str] = (), *, index: ModuleIndex | None = None,
           excluded: set[str] | None = None) -> None:
    """After the commit point: final exclusions, the on-demand modprobe.d file, garbage
    collection, journal cleared."""
    write_all_exclusions(root, backend, {f.path for f in generation.removed},
                         {*generation.exclusion_backends, *previous})
    fault_point("after-final-exclude")
    try:
        write_conf(root, generation, {index.kernel: index} if index is not None else None,
                   excluded)
    except (OSError, KmodtrimError) as exc:
        # The change is committed; the on-demand file is a convenience on top of it. A
        # root whose /etc cannot be written must not turn every later recovery into the
        # same failure: say so, and let the next change write the file.
        message = exc.message if isinstance(exc, KmodtrimError) else str(exc)
        log.warning("on-demand restore configuration not written: %s", message)
    fault_point("after-on-demand")
    shutil.rmtree(pkg.rebuild_dir(root), ignore_errors=True)
    sweep(root)
    Stash(root).collect_garbage(generation.referenced_blobs, generation.number)
    clear_journal(root)


def undo(root: Path, journal: Journal, current: Generation) -> None:
    """Return the tree (and the package manager) to ``current``'s state after an
    interrupted transition, sweep the temporary files it may have left, and give back
    the stash space it took."""
    from .. import regen

    stash = Stash(root)
    current_paths = {f.path for f in current.removed}
    fsutil.sweep_temporaries(root, journal.touched_paths())
    sweep(root)
    entries = {e.path: e for e in journal.stashed_entries}
    # Files the transition took out: put back any that is gone (their blobs were synced
    # before the unlink, or the archive serves them, so a missing file always has a
    # source).
    gone: list[StashedFile] = []
    for item in journal.stash:
        if fsutil.lexists(root, item.path):
            continue
        entry = entries.get(item.path)
        if entry is None:
            raise StashError(f"cannot undo: no stash copy of {item.path}")
        gone.append(entry)
    with Restorer(root, stash) as restorer:
        restorer.prepare(gone)
        for entry in gone:
            restorer.restore(entry)
    # Files the transition put back: take them out again (their blobs are still there).
    for entry in journal.restore:
        if entry.path in current_paths and fsutil.lexists(root, entry.path) \
                and stash.has_copy(entry):
            fsutil.unlink(root, entry.path)
    os.sync()
    backend = resolve_backend(root, journal.backend)
    write_all_exclusions(root, backend, current_paths, current.exclusion_backends)
    if journal.package_backend:
        backend = resolve_backend(root, journal.package_backend)
    pkg.undo_packages(root, backend, journal, current)
    restore_initramfs(root, journal)
    for kernel in journal.kernels:
        if kernel_installed(root, kernel):
            regen.run_depmod(root, kernel)
    shutil.rmtree(pkg.rebuild_dir(root), ignore_errors=True)
    # What this transition stashed is no longer needed: a failed operation gives back
    # the space it took (its pack goes, unless older files share it).
    stash.collect_garbage(current.referenced_blobs)
    clear_journal(root)
