"""A LoadedPolicy made in memory: from rule strings, or from policy TOML text.

It is composed as ``load_policy`` composes one (the presets' rules in order, then the
user rules in order; the last matching rule decides), without a file: the loader only
reads paths (tests/unit/test_policy_rules.py checks the two agree on the same text).
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from typing import Literal

from kmodtrim.policy import LoadedPolicy, Policy, parse_rule
from kmodtrim.presets import PRESETS

SOURCE = "/etc/kmodtrim/policy.toml"


def policy_of(
    *rules: str,
    presets: Sequence[str] = (),
    firmware: Literal["trim", "keep"] = "trim",
) -> LoadedPolicy:
    """A policy with these user rules and presets (none by default, unlike the shipped
    defaults, so a test sees only what it wrote)."""
    return _compose(Policy(presets=list(presets), rules=list(rules), firmware=firmware))


def policy_from_toml(text: str) -> LoadedPolicy:
    """The policy a main policy file with this text gives (no drop-ins). Raises
    pydantic's ValidationError for an invalid value (the loader words it as PolicyError)."""
    return _compose(Policy.model_validate(tomllib.loads(text)))


def _compose(settings: Policy) -> LoadedPolicy:
    preset_rules = [parse_rule(text, source=f"preset:{name}")
                    for name in settings.presets for text in PRESETS[name]]
    user_rules = [parse_rule(text, source=SOURCE) for text in settings.rules]
    return LoadedPolicy(settings=settings, rules=(*preset_rules, *user_rules),
                        sources=(SOURCE,))
