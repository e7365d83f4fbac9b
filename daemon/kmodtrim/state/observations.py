"""What kmodtrim has seen, in ROOT/var/lib/kmodtrim/observations.json: the modules loaded
per boot (with when and how each was seen), the observations an admin supplied to a
trim, and the modules restored by hand or on demand (kept by later plans until
forgotten). Written atomically under the operation lock; read by every plan.

Only the standard library and state/files.py are imported here (``status`` reads it).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

from ..errors import StoreError, UntrustedStateError
from .files import atomic_write_json, read_json, state_dir


def _warn(message: str, *args: object) -> None:
    import logging  # only for a corrupt file

    logging.getLogger("kmodtrim.store").warning(message, *args)



def observations_path(root: Path) -> Path:
    return state_dir(root) / "observations.json"


def _check_observations(path: Path, doc: Any) -> dict[str, Any]:
    """``doc`` if it has the observations file's structure; raises StoreError."""
    def is_names(value: Any) -> bool:
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items())

    if not isinstance(doc, dict) or not isinstance(doc.get("boots"), dict):
        raise StoreError(f"{path}: unexpected structure")
    for boot in doc["boots"].values():
        if (not isinstance(boot, dict) or not isinstance(boot.get("modules"), list)
                or not all(isinstance(m, str) for m in boot["modules"])
                or not all(isinstance(boot.get(k, 0), int | float)
                           for k in ("first_seen", "last_seen"))
                or not all(_is_sighting(s) for s in _as_dict(boot.get("seen", {})))):
            raise StoreError(f"{path}: a boot record has an unexpected structure")
    for key in ("supplied", "restored"):
        if not is_names(doc.get(key, {})):
            raise StoreError(f"{path}: {key!r} is not a map of names")
    return doc


def _observations_doc(root: Path, *, for_update: bool = False) -> dict[str, Any]:
    """The whole observations file. A corrupt one is treated as empty (logged); before an
    update it is moved aside (``observations.json.corrupt-TIME``) — a reader never renames
    anything."""
    path = observations_path(root)
    try:
        return _check_observations(path, read_json(path, root))
    except FileNotFoundError:
        return {"boots": {}}
    except UntrustedStateError:
        raise  # not corrupt but planted: never read, never touched
    except StoreError as exc:
        if not for_update:
            _warn("%s; ignoring it (the next change sets it aside)", exc.message)
            return {"boots": {}}
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        _warn("%s; set aside as %s, starting from no observations", exc.message, aside)
        return {"boots": {}}


class HowSeen(StrEnum):
    """How a module was seen loaded (a boot record's ``seen`` says it per module)."""

    PROC_MODULES = "proc-modules"  # the /proc/modules snapshot at start-up or --record
    UEVENT = "uevent"  # a module's uevent while the daemon ran
    MODALIAS = "modalias"  # restored for a device's modalias (self-healing)


def _as_dict(value: Any) -> list[Any]:
    return list(value.values()) if isinstance(value, dict) else [None]


def _is_sighting(value: Any) -> bool:
    return (isinstance(value, dict) and isinstance(value.get("first"), int | float)
            and isinstance(value.get("last"), int | float)
            and isinstance(value.get("how"), list)
            and all(isinstance(h, str) for h in value["how"]))


def read_observations(root: Path) -> dict[str, dict[str, Any]]:
    """boot id → {"first_seen": epoch, "last_seen": epoch, "modules": [names]}, and since
    the fleet export, ``"seen"``: name → {"first", "last", "how": [HowSeen]} for the
    modules recorded since (older boot records lack it: their boot's times stand)."""
    boots: dict[str, dict[str, Any]] = _observations_doc(root)["boots"]
    return boots


def read_supplied(root: Path) -> dict[str, str]:
    """Module name → where it came from, for observations an admin supplied to an applied
    trim (``--observed FILE``): later kernels are trimmed with them too."""
    supplied: dict[str, str] = _observations_doc(root).get("supplied", {})
    return supplied


def read_restored(root: Path) -> dict[str, str]:
    """Module name → when and how it was restored: kept by later plans until forgotten."""
    restored: dict[str, str] = _observations_doc(root).get("restored", {})
    return restored


def _update_names(root: Path, key: str, add: dict[str, str], drop: Iterable[str] = (),
                  *, replace_existing: bool = False) -> None:
    doc = _observations_doc(root, for_update=True)
    names = doc.setdefault(key, {})
    for name, source in add.items():
        if replace_existing:
            names[name] = source
        else:
            names.setdefault(name, source)
    for name in drop:
        names.pop(name, None)
    atomic_write_json(observations_path(root), doc)


def record_supplied(root: Path, names: dict[str, str]) -> None:
    """Remember supplied observations (name → source), in addition to earlier ones."""
    _update_names(root, "supplied", names)


def record_restored(root: Path, names: dict[str, str]) -> None:
    """Remember modules restored by hand or on demand (name → how and when)."""
    _update_names(root, "restored", names, replace_existing=True)


def forget_restored(root: Path, names: set[str]) -> set[str]:
    """Stop keeping ``names`` for having been restored; returns those that were kept."""
    known = set(read_restored(root)) & names
    if known:
        _update_names(root, "restored", {}, known)
    return known


def record_observation(
    root: Path, boot_id: str, modules: list[str], now: float | None = None,
    how: HowSeen = HowSeen.PROC_MODULES,
) -> None:
    """Add modules seen loaded during boot ``boot_id`` (union with what was recorded),
    each with when (first and last) and ``how`` it was seen."""
    now = time.time() if now is None else now
    doc = _observations_doc(root, for_update=True)
    boot = doc["boots"].setdefault(boot_id, {"first_seen": now, "last_seen": now, "modules": []})
    boot["last_seen"] = now
    boot["modules"] = sorted(set(boot["modules"]) | set(modules))
    seen = boot.setdefault("seen", {})
    for name in modules:
        sighting = seen.setdefault(name, {"first": now, "last": now, "how": []})
        sighting["last"] = now
        sighting["how"] = sorted(set(sighting["how"]) | {str(how)})
    atomic_write_json(observations_path(root), doc)
