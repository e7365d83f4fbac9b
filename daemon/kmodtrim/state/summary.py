"""Generation summaries: ``generations/N.summary.json`` beside each manifest ``N.json``.

A manifest lists every file out of the tree (thousands); its summary says in a few kB
what ``history``, ``status`` and kmodtrimd need: the history row, the files that come
back from the package archive, per kernel the trimmed module names, and the short names
of the stash blobs the generation needs (so ``status`` checks the stash without the
manifest). A summary names its manifest by size and CRC-32 and is used only for exactly
that manifest; any other is ignored and the manifest read instead.

Only the standard library and state/files.py are imported here: the quick verbs read
summaries before anything heavy loads.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StoreError, UntrustedStateError
from .files import read_json, read_state_bytes, state_dir

if TYPE_CHECKING:
    from ..records import Generation

BLOB_KEY_HEX = 16  # a blob's short name: the first 8 bytes of its sha256, in hex

# key → type, of every summary; HISTORY_KEYS are what ``history`` lists
_SUMMARY_TYPES = {"generation": int, "created": str, "action": str, "description": str,
                  "removed_files": int, "removed_bytes": int, "kernels": dict}
HISTORY_KEYS = tuple(k for k in _SUMMARY_TYPES if k != "kernels")
# written since summaries say what ``status`` needs; older summaries lack them
# (and ``others_out``, the paths out of the tree that are not module files: a plan's
# estimate needs them, and the stashed module files it has from the index)
_STATUS_TYPES = {"from_archive_files": int, "blobs": str, "others_out": list}


def generations_dir(root: Path) -> Path:
    return state_dir(root) / "generations"


def generation_numbers(root: Path) -> list[int]:
    """Recorded generation numbers (0 always exists), ascending."""
    numbers = {0}
    with contextlib.suppress(OSError):
        for name in os.listdir(generations_dir(root)):
            stem, dot, ext = name.partition(".")
            if dot and ext == "json" and stem.isdigit():
                numbers.add(int(stem))
    return sorted(numbers)


def manifest_path(root: Path, number: int) -> Path:
    return generations_dir(root) / f"{number}.json"


def summary_path(root: Path, number: int) -> Path:
    return generations_dir(root) / f"{number}.summary.json"


def fingerprint(data: bytes) -> list[int]:
    """[size, CRC-32] of a manifest's bytes: whether a summary was written for it (state
    files are trusted, so this guards against a stale summary, not a forged one; CRC-32
    keeps OpenSSL's libcrypto out of kmodtrimd, which reads summaries)."""
    import zlib

    return [len(data), zlib.crc32(data)]


def summary_of(generation: Generation) -> dict[str, Any]:
    """A generation in short: what ``history`` lists (HISTORY_KEYS); how many of its files
    come back from the package archive; the short names of the stash blobs it needs
    (sorted, concatenated); and per kernel the names of its modules out of the tree, how
    many module files and how many bytes (what kmodtrimd's self-healing and metrics
    need)."""
    kernels: dict[str, dict[str, Any]] = {}
    for f in generation.removed:
        if f.kernel:
            entry = kernels.setdefault(f.kernel, {"modules": set(), "module_files": 0,
                                                  "bytes": 0})
            if f.kind == "module":
                entry["module_files"] += 1
                if f.module:
                    entry["modules"].add(f.module)
            entry["bytes"] += f.size
    for entry in kernels.values():
        entry["modules"] = sorted(entry["modules"])
    blobs = sorted({f.sha256[:BLOB_KEY_HEX] for f in generation.removed if f.has_blob})
    return {"generation": generation.number, "created": generation.created,
            "action": generation.action, "description": generation.description,
            "removed_files": len(generation.removed),
            "removed_bytes": generation.removed_bytes, "kernels": kernels,
            "from_archive_files": sum(1 for f in generation.removed
                                      if f.link is None and not f.has_blob),
            "blobs": "".join(blobs),
            "others_out": sorted(f.path for f in generation.removed if f.kind != "module")}


def _valid_kernels(kernels: dict[str, Any]) -> bool:
    return all(isinstance(entry, dict) and isinstance(entry.get("modules"), list)
               and all(isinstance(m, str) for m in entry["modules"])
               and type(entry.get("module_files")) is int and type(entry.get("bytes")) is int
               for entry in kernels.values())


def _valid_status(summary: dict[str, Any]) -> bool:
    blobs = summary["blobs"]
    return (len(blobs) % BLOB_KEY_HEX == 0 and summary["from_archive_files"] >= 0
            and all(c in "0123456789abcdef" for c in set(blobs))
            and all(isinstance(p, str) for p in summary["others_out"]))


def read_summary(root: Path, number: int, *, for_status: bool = False) -> dict[str, Any] | None:
    """Generation ``number``'s summary (``number`` > 0), with its manifest's fingerprint
    as ``manifest``, when one was written for exactly the manifest there is and is well
    formed, else None. With ``for_status``, only a
    summary that also carries what ``status`` needs (_STATUS_TYPES). Raises StoreError
    only for state that cannot be trusted (state/files.check_trusted)."""
    try:
        summary = read_json(summary_path(root, number), root)
        data = read_state_bytes(manifest_path(root, number), root)
    except UntrustedStateError:
        raise
    except (FileNotFoundError, StoreError):
        return None
    if not (isinstance(summary, dict) and summary.get("generation") == number
            and summary.get("manifest") == fingerprint(data)
            and all(type(summary.get(key)) is kind for key, kind in _SUMMARY_TYPES.items())
            and _valid_kernels(summary["kernels"])):
        return None
    keys = [*_SUMMARY_TYPES, "manifest"]
    if all(type(summary.get(key)) is kind for key, kind in _STATUS_TYPES.items()) \
            and _valid_status(summary):
        keys += _STATUS_TYPES
    elif for_status:
        return None
    return {key: summary[key] for key in keys}


def zero_summary() -> dict[str, Any]:
    """Generation 0's summary (summary_of(records.GENERATION_ZERO), which a test checks):
    the tree as installed."""
    return {"generation": 0, "created": "", "action": "untrimmed",
            "description": "the tree as installed", "removed_files": 0, "removed_bytes": 0,
            "kernels": {}, "from_archive_files": 0, "blobs": "", "others_out": []}


def summary_document(generation: Generation, manifest: bytes) -> dict[str, Any]:
    """What write_generation stores beside ``manifest`` (generation's encoded bytes)."""
    return {"manifest": fingerprint(manifest), **summary_of(generation)}
