"""The state as it really is, even when its records are damaged.

A generation manifest says which files are out of the tree; the journal says what an
operation in progress was doing. Either can be lost (a crash of the disk, an admin's rm, a
bad edit). The stash describes itself (each pack names its generation and every file it
holds), so kmodtrim never concludes "nothing is trimmed" from a missing record:

- ``view`` is what every reader uses: the latest manifest, plus what an interrupted
  operation took out, or — when the latest manifest is damaged or a pack is newer than
  it — the state rebuilt from the packs and the tree. It writes nothing.
- ``salvage`` (under the operation lock, from recovery) writes the rebuilt state as a new
  generation, moving the damaged manifest aside, never deleting it.

A file counts as out of the tree when a record describes it, it is absent from the tree,
and (unless it is a link) the stash still holds its bytes: a blob garbage-collected long
ago belonged to a state that is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import fsutil
from .errors import StoreError, UntrustedStateError
from .records import MODULE_TREES, Generation, RemovedPackage, StashedFile
from .state.stash import PackRecord, Stash
from .store import (
    GENERATION_ZERO,
    generation_numbers,
    generations_dir,
    journal_path,
    load_generation,
    read_journal,
    write_generation,
)

log = logging.getLogger("kmodtrim.salvage")


@dataclass(frozen=True)
class StateView:
    """The effective state and what is wrong with its records (empty when nothing is)."""

    generation: Generation
    problems: tuple[str, ...] = ()
    interrupted: str | None = None  # the interrupted operation, when a journal is pending
    salvaged: bool = False  # rebuilt from the stash: ``salvage`` would write it


def _latest_readable(root: Path, numbers: list[int]) -> tuple[Generation, list[str]]:
    """The newest generation whose manifest loads, and the problems of newer ones."""
    problems: list[str] = []
    for number in reversed(numbers):
        try:
            return load_generation(root, number), problems
        except StoreError as exc:
            problems.append(exc.message)
    return GENERATION_ZERO, problems


def view(root: Path) -> StateView:
    """The state kmodtrim acts on, read-only. Raises StoreError only for state that
    cannot be trusted at all (wrong owner or mode: see store.check_trusted)."""
    numbers = generation_numbers(root)
    base, problems = _latest_readable(root, numbers)
    interrupted: str | None = None
    try:
        journal = read_journal(root)
    except UntrustedStateError:
        raise
    except StoreError as exc:
        journal = None
        problems.append(f"the journal of an interrupted operation is damaged ({exc.message})")
    stash = Stash(root)
    newest_pack = stash.newest_pack_generation()
    if journal is not None:
        interrupted = f"{journal.get('action', 'operation')} (generation {journal.get('number')})"
        entries = _journal_entries(journal)
        out = [e for e in entries if not fsutil.lexists(root, e.path)]
        if out:
            known = {f.path for f in base.removed}
            extra = tuple(e for e in out if e.path not in known)
            base = replace(base, removed=tuple(sorted((*base.removed, *extra),
                                                      key=lambda f: f.path)))
        return StateView(base, tuple(problems), interrupted)
    if not problems and newest_pack <= numbers[-1]:
        return StateView(base)
    if newest_pack > numbers[-1]:
        problems.append(f"the stash holds files of generation {newest_pack}, whose manifest "
                        f"is missing (the newest is {numbers[-1]})")
    rebuilt = rebuild(root, base, stash.records(), stash)
    number = max(numbers[-1], newest_pack) + 1
    generation = replace(
        rebuilt, number=number, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        action="salvage",
        description=f"rebuilt from the stash's own records ({len(rebuilt.removed)} files "
                    "out of the tree)",
        stashed=(), restored=(), kernels=(), rollback_to=None, regen={},
        packages_removed=(), packages_reinstalled=())
    return StateView(generation, tuple(problems), None, salvaged=True)


def _journal_entries(journal: dict[str, Any]) -> list[StashedFile]:
    """The stash entries an interrupted operation recorded (skipping invalid ones)."""
    out = []
    for doc in journal.get("stashed_entries") or ():
        with contextlib.suppress(StoreError):
            out.append(StashedFile.from_json(doc))
    return out


def _kernel_of(entry: StashedFile) -> str | None:
    for tree in MODULE_TREES:
        if entry.path.startswith(tree):
            return entry.path[len(tree):].split("/", 1)[0]
    return None


def rebuild(root: Path, base: Generation, records: list[PackRecord],
            stash: Stash) -> Generation:
    """The state the tree and the stash show: ``base``'s files out of the tree, plus every
    file a pack describes that is absent from the tree and still has its bytes in the
    stash. Later packs win for a path."""
    by_path: dict[str, StashedFile] = {f.path: f for f in base.removed}
    packages: dict[str, RemovedPackage] = {p.name: p for p in base.packages}
    for record in records:
        manifest = record.manifest or {}
        for doc in manifest.get("files") or ():
            try:
                entry = StashedFile.from_json(doc)
            except StoreError:
                continue
            if entry.kind in ("module", "firmware"):
                by_path[entry.path] = entry
        for doc in manifest.get("packages") or ():
            with contextlib.suppress(StoreError):
                package = RemovedPackage.from_json(doc)
                packages[package.name] = package
    removed = []
    for entry in by_path.values():
        if fsutil.lexists(root, entry.path) or not stash.has_copy(entry):
            continue
        kernel = _kernel_of(entry)
        if kernel is not None and not any(
                (root / tree.strip("/") / kernel).is_dir() for tree in MODULE_TREES):
            continue  # that kernel was removed since
        removed.append(entry)
    paths = {e.path for e in removed}
    kept_packages = tuple(sorted(
        (p for p in packages.values() if any(f.path in paths for f in p.files)),
        key=lambda p: p.name))
    return replace(base, removed=tuple(sorted(removed, key=lambda f: f.path)),
                   packages=kept_packages)


def salvage(root: Path) -> str | None:
    """Write the rebuilt state as a new generation if the records are damaged or lost
    (call under the operation lock, with no journal pending). Damaged manifests are moved
    aside as ``N.json.damaged``. Returns what was done, or None."""
    state = view(root)
    if not state.salvaged:
        return None
    directory = generations_dir(root)
    for number in generation_numbers(root):
        if number <= 0:
            continue
        try:
            load_generation(root, number)
        except StoreError:
            path = directory / f"{number}.json"
            with contextlib.suppress(OSError):
                os.replace(path, path.with_name(f"{path.name}.damaged"))
    write_generation(root, state.generation)
    message = (f"rebuilt the state from the stash's own records as generation "
               f"{state.generation.number} ({len(state.generation.removed)} files out of the "
               f"tree): {'; '.join(state.problems)}")
    log.warning("%s", message)
    return message


def set_journal_aside(root: Path) -> Path:
    """Move a damaged journal aside (``journal.json.damaged``) and return where."""
    path = journal_path(root)
    aside = path.with_name(f"{path.name}.damaged")
    os.replace(path, aside)
    return aside
