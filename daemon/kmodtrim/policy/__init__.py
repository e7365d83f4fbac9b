"""The policy: ``/etc/kmodtrim/policy.toml`` plus ``policy.d/*.toml``, validated and compiled.

Files, relative to ``root`` (``/`` for the live system, else an image root):

- the main file ``etc/kmodtrim/policy.toml`` (absent: the built-in defaults), or an explicit
  file given with ``--policy`` used instead of it;
- drop-ins ``etc/kmodtrim/policy.d/*.toml`` applied after it in lexical order. In a drop-in,
  scalar keys (also those inside ``[min_observation]``) override, ``rules`` are appended,
  and ``presets`` entries are added (``"name"``) or removed (``"-name"``).

Rules are fnmatch globs (case-sensitive, ``*`` crosses ``/``); a leading ``-`` excludes.
``alias:GLOB`` matches any of a module's aliases, a glob containing ``/`` matches the path
relative to the kernel's module directory, anything else the module name. Names, name
globs and alias globs are normalised (``-`` == ``_``). Presets are expanded first, then the
user rules in file order; the last matching rule decides.

The package's files: rules.py parses one rule, model.py declares the settings, matcher.py
decides which rule applies, files.py says which files make a root's policy, load.py reads
and merges them, cache.py keeps the validated result for the next run (so that a run
whose policy files have not changed needs no pydantic), messages.py words their errors;
compat.py is the one place that meets pydantic (compat_v2.py for pydantic 2, compat_v1.py
for 1.10; vcontext.py the validation context both give their validators).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..presets import PRESET_DESCRIPTIONS, PRESETS
    from .cache import cached_policy
    from .files import DROPIN_DIR, MAIN_POLICY
    from .load import default_policy, load_policy
    from .matcher import LoadedPolicy
    from .model import MinObservation, Policy
    from .rules import Rule, parse_rule

# Each name from the module that holds it, imported when first asked for: the model
# (pydantic) loads only when a policy is validated, not when a cached one is read.
_WHERE = {
    "PRESETS": "..presets", "PRESET_DESCRIPTIONS": "..presets",
    "cached_policy": ".cache", "DROPIN_DIR": ".files", "MAIN_POLICY": ".files",
    "default_policy": ".load", "load_policy": ".load", "LoadedPolicy": ".matcher",
    "MinObservation": ".model", "Policy": ".model", "Rule": ".rules",
    "parse_rule": ".rules",
}

__all__ = [
    "DROPIN_DIR", "MAIN_POLICY", "PRESETS", "PRESET_DESCRIPTIONS", "LoadedPolicy",
    "MinObservation", "Policy", "Rule", "cached_policy", "default_policy", "load_policy",
    "parse_rule",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(where, __name__), name)
