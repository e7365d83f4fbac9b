"""The write-ahead journal of a transition: a typed record with named phases, saved
before each step so recovery can finish or undo whatever a crash interrupted.

On disk it is ``var/lib/kmodtrim/journal.json`` (store.py writes it atomically) with a
``version``. Version 1 (no ``version`` key, written before the journal was typed) has the
same fields and is read as it is; any other version is refused clearly. Reading checks
every field and every path as a state record's (records.py): a journal drives writes into
the tree, so nothing in it is taken on trust.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..names import is_valid_kernel_version
from ..records import KINDS, RemovedPackage, StashedFile, managed_path
from ..store import write_journal
from ..takeout import PutRequest, Source

VERSION = 2


class Phase(StrEnum):
    """Where a transition is: before its commit point it is undone, after it finished."""

    MOVING = "moving"  # exclusions, stash, package removal, unlink, restore, reinstall
    REGENERATING = "regenerating"  # depmod and the initramfs


@dataclass
class InitramfsPending:
    """An initramfs about to be swapped: its path and the sha256 of the image it
    replaces (None when there was none), so recovery can tell whether the swap happened."""

    image: str
    sha256: str | None


@dataclass
class Journal:
    """Everything recovery needs about one transition in progress."""

    action: str
    number: int  # the generation it commits
    from_generation: int  # the generation it started from (undo returns there)
    stash: list[PutRequest]  # files to take out
    restore: list[StashedFile]  # files to put back
    kernels: list[str]
    backend: str  # the backend option ("auto", "stash", "dpkg", "rpm")
    package_backend: str | None  # the package manager running package steps
    packages_remove: list[str] = field(default_factory=list)
    packages_reinstall: list[str] = field(default_factory=list)
    phase: Phase = Phase.MOVING
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    # Filled in as the transition goes:
    stashed_entries: list[StashedFile] = field(default_factory=list)  # durable copies
    packages_captured: list[RemovedPackage] = field(default_factory=list)
    packages_removing: bool = False
    packages_reinstalling: bool = False
    initramfs_pending: dict[str, InitramfsPending] = field(default_factory=dict)
    regen: dict[str, Any] = field(default_factory=dict)

    def save(self, root: Path) -> None:
        """Write it durably (raises StoreError, e.g. on a full disk)."""
        write_journal(root, self.to_json())

    def touched_paths(self) -> list[str]:
        """Every in-root path this transition may have written or removed."""
        return [t.path for t in self.stash] + [e.path for e in self.restore]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": VERSION, "action": self.action, "number": self.number,
            "from": self.from_generation,
            "stash": [_put_request_json(t) for t in self.stash],
            "restore": [e.to_json() for e in self.restore],
            "kernels": list(self.kernels), "backend": self.backend,
            "package_backend": self.package_backend,
            "packages_remove": list(self.packages_remove),
            "packages_reinstall": list(self.packages_reinstall),
            "phase": str(self.phase), "started": self.started,
            "stashed_entries": [e.to_json() for e in self.stashed_entries],
            "packages_captured": [p.to_json() for p in self.packages_captured],
            "packages_removing": self.packages_removing,
            "packages_reinstalling": self.packages_reinstalling,
            "initramfs_pending": {k: {"image": v.image, "sha256": v.sha256}
                                  for k, v in self.initramfs_pending.items()},
            "regen": dict(self.regen),
        }

    @staticmethod
    def from_json(root: Path, doc: object) -> Journal:
        """The journal in ``doc``; raises StoreError naming what is wrong."""
        if not isinstance(doc, dict):
            raise StoreError("journal: not an object")
        version = doc.get("version", 1)
        if version not in (1, VERSION):
            raise StoreError(f"journal: version {str(version)[:20]} is not one this kmodtrim "
                             "reads", hint="finish it with the kmodtrim that wrote it")

        def need(key: str, kinds: tuple[type, ...], default: object = ...) -> Any:
            if key not in doc:
                if default is ...:
                    raise StoreError(f"journal: missing field {key!r}")
                return default
            value = doc[key]
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                raise StoreError(f"journal: field {key!r} has the wrong type")
            return value

        def names(key: str) -> list[str]:
            values = need(key, (list,), [])
            if not all(isinstance(v, str) for v in values):
                raise StoreError(f"journal: field {key!r} must be a list of names")
            return list(values)

        stash = []
        for item in need("stash", (list,), []):
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise StoreError("journal: a stash item is not an object with a path")
            kind = str(item.get("kind", "module"))
            if kind not in KINDS:
                raise StoreError(f"journal: a stash item has an unknown kind {kind[:40]!r}")
            try:
                source = Source(item.get("source", "stash"))
            except ValueError:
                raise StoreError("journal: a stash item has an unknown source") from None
            stash.append(PutRequest(managed_path(item["path"], kind), kind,
                                    _opt_str(item.get("module")), _opt_str(item.get("kernel")),
                                    _opt_str(item.get("package")), source,
                                    _opt_str(item.get("version"))))
        kernels = names("kernels")
        for kernel in kernels:
            if not is_valid_kernel_version(kernel):
                raise StoreError(f"journal: {kernel[:80]!r} is not a kernel version")
        try:
            phase = Phase(need("phase", (str,), "moving"))
        except ValueError:
            raise StoreError("journal: unknown phase") from None
        return Journal(
            action=need("action", (str,)), number=need("number", (int,)),
            from_generation=need("from", (int,)), stash=stash,
            restore=[StashedFile.from_json(e) for e in need("restore", (list,), [])],
            kernels=kernels, backend=need("backend", (str,), "auto"),
            package_backend=need("package_backend", (str, type(None)), None),
            packages_remove=names("packages_remove"),
            packages_reinstall=names("packages_reinstall"), phase=phase,
            started=need("started", (str,), ""),
            stashed_entries=[StashedFile.from_json(e)
                             for e in need("stashed_entries", (list,), [])],
            packages_captured=[RemovedPackage.from_json(p)
                               for p in need("packages_captured", (list,), [])],
            packages_removing=need("packages_removing", (bool,), False),
            packages_reinstalling=need("packages_reinstalling", (bool,), False),
            initramfs_pending=_pending(root, need("initramfs_pending", (dict, type(None)), {})),
            regen=need("regen", (dict,), {}),
        )


def _put_request_json(request: PutRequest) -> dict[str, Any]:
    """A stash item; its source and version only when not the defaults (as a record's)."""
    doc = dict(request.__dict__)
    if request.source is Source.STASH:
        del doc["source"]
    else:
        doc["source"] = str(request.source)
    if request.version is None:
        del doc["version"]
    return doc


def _opt_str(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise StoreError("journal: a stash item field has the wrong type")
    return value


def _pending(root: Path, doc: dict[str, Any] | None) -> dict[str, InitramfsPending]:
    """The initramfs swaps in flight; each image must lie in the root's /boot or /efi."""
    boots = tuple(os.path.normpath(root / d) + "/" for d in ("boot", "efi"))
    out = {}
    for kernel, item in (doc or {}).items():
        image = item.get("image") if isinstance(item, dict) else None
        sha = item.get("sha256") if isinstance(item, dict) else None
        if not isinstance(image, str) or os.path.normpath(image) != image \
                or not image.startswith(boots) or not isinstance(sha, str | None):
            raise StoreError("journal: an initramfs entry is not an image in the root's "
                             "/boot or /efi")
        out[str(kernel)] = InitramfsPending(image, sha)
    return out
