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
decides which rule applies, load.py reads and merges the files, messages.py words their
errors; compat.py is the one place that meets pydantic (compat_v2.py for pydantic 2,
compat_v1.py for 1.10; vcontext.py the validation context both give their validators).
"""

from __future__ import annotations

from ..presets import PRESET_DESCRIPTIONS, PRESETS
from .load import DROPIN_DIR, MAIN_POLICY, default_policy, load_policy
from .matcher import LoadedPolicy
from .model import MinObservation, Policy
from .rules import Rule, parse_rule

__all__ = [
    "DROPIN_DIR",
    "MAIN_POLICY",
    "PRESETS",
    "PRESET_DESCRIPTIONS",
    "LoadedPolicy",
    "MinObservation",
    "Policy",
    "Rule",
    "default_policy",
    "load_policy",
    "parse_rule",
]
