"""Crash recovery: finish an interrupted transition after its commit point, undo it
before; when the journal itself is damaged, put back what the stash's own records say the
operation took out (from the stash, or the archive for the files it serves); when a
manifest is lost, write the state rebuilt from the stash."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .. import fsutil, regen, salvage
from ..errors import StoreError, UntrustedStateError
from ..names import is_valid_kernel_version
from ..paths import MODULE_DIR_BASES
from ..records import StashedFile
from ..salvage import set_journal_aside
from ..sources.restore import Restorer
from ..state.stash import Stash
from ..store import (
    generation_numbers,
    journal_path,
    load_generation,
    operation_lock,
    read_journal,
)
from .exclusions import resolve_backend
from .journal import Journal
from .transition import finish, undo


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
        gone = [e for e in entries
                if e.path not in out and not fsutil.lexists(root, e.path)]
        with Restorer(root, stash) as restorer:
            restorer.prepare(gone)
            for entry in gone:
                restorer.restore(entry)
                put_back += 1
    fsutil.sweep_temporaries(root, sorted(out))
    if put_back:
        os.sync()
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
    journal: Journal | None = None
    damage: StoreError | None = None
    try:
        doc = read_journal(root)
        if doc is not None:
            journal = Journal.from_json(root, doc)
    except UntrustedStateError:
        raise  # planted, not damaged: never acted on
    except StoreError as exc:
        if not journal_path(root).exists():
            raise
        damage = exc
    state = salvage.view(root)
    if journal is None and damage is None and not state.salvaged:
        return None
    with operation_lock(root, "recovery"):
        if damage is not None:
            return _recover_damaged_journal(root, damage)
        if journal is None:
            return salvage.salvage(root)
        numbers = generation_numbers(root)
        if journal.number in numbers:
            generation = load_generation(root, journal.number)
            previous = load_generation(root, journal.from_generation).exclusion_backends \
                if journal.from_generation in numbers else ()
            finish(root, generation, resolve_backend(root, journal.backend), previous)
            return f"finished interrupted {journal.action} (generation {journal.number})"
        current = load_generation(root, journal.from_generation)
        undo(root, journal, current)
        return f"undid interrupted {journal.action} (back to generation {current.number})"
