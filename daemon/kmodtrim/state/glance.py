"""The state at a glance: what ``status`` and ``history`` show when the records are whole,
read from the current generation's summary and the stash's pack indexes, without the
manifest (thousands of entries) and without the records' model.

``glance`` answers only when nothing needs a closer look: no interrupted operation (no
journal), no pack newer than the newest generation, a valid summary of the newest
manifest, and — with ``stash`` — every blob that summary needs found in a pack index or
a loose blob. Otherwise it returns None and the caller reads the full view
(salvage.view), which names every problem. So the quick answer and the full one never
disagree: a test compares them on whole and on damaged state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .files import check_trusted, journal_path, stash_dir
from .packfile import index_keys, is_pack, pack_generation
from .summary import BLOB_KEY_HEX, generation_numbers, read_summary, zero_summary

_KEY_BYTES = BLOB_KEY_HEX // 2


def _packs(root: Path) -> list[tuple[Path, int]] | None:
    """Every complete pack and its size; None if the stash cannot be listed as it is
    (Stash.pack_files then says why). Raises UntrustedStateError."""
    packs = stash_dir(root) / "packs"
    check_trusted(root, packs)
    try:
        names = os.listdir(packs)
    except FileNotFoundError:
        return []
    except OSError:
        return None
    out = []
    for name in names:
        if is_pack(name):
            try:
                out.append((packs / name, os.stat(packs / name).st_size))
            except OSError:
                return None
    return out


def _loose(root: Path) -> list[tuple[str, int]] | None:
    """Every loose blob's file name and size; None when they cannot all be listed."""
    objects = stash_dir(root) / "objects"
    if not os.path.isdir(objects):
        return []
    out = []
    try:
        for sub in os.listdir(objects):
            with os.scandir(objects / sub) as blobs:
                out += [(b.name, b.stat().st_size) for b in blobs]
    except OSError:
        return None
    return out


def glance(root: Path, *, whole: bool = False, stash: bool = False) -> dict[str, Any] | None:
    """The newest generation's summary (state/summary.py) when the records need no closer
    look; with ``whole``, only a summary with every key (read_summary's ``for_status``);
    with ``stash`` (which implies ``whole``) also ``stash_bytes_on_disk`` (what
    Stash.size_on_disk says), and only when every blob the generation needs is in the
    stash. None otherwise. Raises UntrustedStateError (state someone other than root
    could have written)."""
    if os.path.lexists(journal_path(root)):
        return None
    latest = generation_numbers(root)[-1]
    packs = _packs(root)
    if packs is None or any(pack_generation(p) > latest for p, _ in packs):
        return None
    summary = read_summary(root, latest, for_status=whole or stash) if latest \
        else zero_summary()
    if summary is None or not stash:
        return summary
    loose = _loose(root)
    if loose is None:
        return None
    present = set()
    try:
        for pack, _size in packs:
            keys = index_keys(pack, _KEY_BYTES)
            if keys is None:
                return None
            present |= keys
    except OSError:
        return None
    for name, _size in loose:
        try:
            present.add(bytes.fromhex(name[:BLOB_KEY_HEX]))
        except ValueError:
            continue
    needed = bytes.fromhex(summary["blobs"])
    if not all(needed[i:i + _KEY_BYTES] in present for i in range(0, len(needed), _KEY_BYTES)):
        return None
    return {**summary, "stash_bytes_on_disk": sum(s for _, s in packs) + sum(s for _, s in loose)}


def quick_or_none(root: Path, *, whole: bool = False,
                  stash: bool = False) -> dict[str, Any] | None:
    """glance, or None also for any state error (the full view then raises it)."""
    try:
        return glance(root, whole=whole, stash=stash)
    except StoreError:
        return None
