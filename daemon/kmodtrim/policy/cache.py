"""The validated policy, kept for the next run (ROOT/var/cache/kmodtrim/policy.json).

Validating a policy loads pydantic and builds its models: about 0.3 s of every plan,
explain and apply, and of every restore modprobe asks for. A policy changes rarely, so
the merged, validated settings and the user rules (with their files and lines) are
written here, under a key made of every policy file's identity (device, inode, size,
mtime and ctime, the link target's too for a link), the drop-in directory's, the policy
files' names in order and kmodtrim's version. A run whose key matches reads the settings
back with plain JSON — no pydantic — and expands the presets and parses the rules as a
validated load would; any other run validates and rewrites the file.

The file is trusted only as the index cache is (store.check_trusted: no links, root's
own, not group- or world-writable): a planted cache would steer the plan. A damaged,
foreign or stale file is ignored and rewritten; failing to write it only costs speed.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .. import __version__
from ..errors import StoreError
from .files import DROPIN_DIR, PolicyFile, policy_files
from .matcher import LoadedPolicy
from .rules import expand_presets, parse_rule

if TYPE_CHECKING:
    from .model import Policy

CACHE_NAME = "policy.json"
_FORMAT = 1
_MAX_BYTES = 1 << 22  # a policy of 10,000 rules is ~1 MB


class SettingsView:
    """Validated settings read back from the cache, answering attribute access as the
    model does (nested tables too); read-only."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_data", data)

    def __getattr__(self, name: str) -> Any:
        try:
            value = self._data[name]
        except KeyError:
            raise AttributeError(name) from None
        return SettingsView(value) if isinstance(value, dict) else value

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"policy settings are read-only ({name})")

    def __repr__(self) -> str:
        return f"SettingsView({self._data!r})"


def _identity(path: Path) -> list[int]:
    try:
        st = os.lstat(path)
    except OSError:
        return [-1]
    ids = [st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    if os.path.islink(path):
        ids += _identity(Path(os.path.realpath(path)))
    return ids


def _key(root: Path, files: list[PolicyFile]) -> list[Any]:
    return [__version__, _FORMAT, _identity(root / DROPIN_DIR),
            *([f.shown, f.dropin, _identity(f.path)] for f in files)]


def _read(path: Path, key: list[Any]) -> LoadedPolicy | None:
    from ..state.files import check_trusted

    try:
        check_trusted(path.parent.parent, path)
        with open(path, "rb") as f:
            raw = f.read(_MAX_BYTES + 1)
        if len(raw) > _MAX_BYTES:
            return None
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("key") != key:
            return None
        settings = doc["settings"]
        user = [parse_rule(text, source=source, line=line) for text, source, line in doc["rules"]]
        return LoadedPolicy(settings=cast("Policy", SettingsView(settings)),
                            rules=(*expand_presets(settings["presets"]), *user),
                            sources=tuple(doc["sources"]))
    except (OSError, StoreError, ValueError, KeyError, TypeError):
        return None


def _write(path: Path, key: list[Any], loaded: LoadedPolicy) -> None:
    from ..state.files import check_trusted, make_dirs, replace_file
    from .compat import dump

    doc = {
        "key": key,
        "settings": dump(loaded.settings),
        "rules": [[r.text, r.source, r.line]
                  for r in loaded.rules[len(expand_presets(loaded.settings.presets)):]],
        "sources": list(loaded.sources),
    }
    with contextlib.suppress(OSError, StoreError):  # only speed is lost
        check_trusted(path.parent.parent, path)
        make_dirs(path.parent)  # 0755 whatever the umask: a 0777 ROOT/var is refused
        check_trusted(path.parent.parent, path)
        replace_file(path, json.dumps(doc).encode(), durable=False)


def cached_policy(root: Path, explicit: Path | None, cache_dir: Path) -> LoadedPolicy:
    """load_policy(root, explicit), from ``cache_dir`` when no policy file changed since
    it was written. Raises PolicyError as load_policy does (a broken policy is never
    cached, so it is reported on every run)."""
    files = policy_files(root, explicit, dropins=True)
    key = _key(root, files)
    path = cache_dir / CACHE_NAME
    hit = _read(path, key)
    if hit is not None:
        return hit
    from .load import load_policy

    loaded = load_policy(root, explicit)
    # Files changed while they were read would be cached under the old key: then the
    # next run simply validates again.
    if _key(root, files) == key:
        _write(path, key, loaded)
    return loaded

