"""The policy's settings as pydantic models (MinObservation, StashPolicy, Policy): every
key, its type, default and allowed values, validated strictly.

Written against compat.py, not pydantic itself, so that it validates the same under
pydantic 1.10 and 2: tables derive from ``StrictModel``; a field's type is a ``Literal``,
``list`` or table of these, or one of compat's ``NonNegativeInt``, ``NonNegativeFloat``,
``StrictBool``, ``StrictStr`` or a ``checked_str`` (a bare ``int``, ``bool`` or ``str``
would be coerced by pydantic 1.10)."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Literal

from ..platforms import AUTO, CHOICES
from ..presets import DEFAULT_PRESETS, PRESETS
from ..sources.choice import DEFAULT_BUDGET_MIB, DEFAULT_KEEP, StashKeep
from .compat import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    StrictBool,
    StrictModel,
    checked_str,
    validation_context,
)
from .rules import _split_rule


def _check_rule(value: str) -> str:
    _split_rule(value)
    return value


def _check_preset(value: str) -> str:
    dropin = bool(validation_context().get("dropin"))
    name = value[1:] if value.startswith("-") else value
    if value.startswith("-") and not dropin:
        raise ValueError(
            f"'-{name}' removes a preset, which only a policy.d drop-in can do; in this "
            "file list exactly the presets you want"
        )
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        suggestion = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(
            f"unknown preset{suggestion}; valid presets: {', '.join(sorted(PRESETS))}"
        )
    return value


def _check_cloud(value: str) -> str:
    if value not in CHOICES:
        close = difflib.get_close_matches(value, CHOICES, n=1)
        suggestion = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown platform{suggestion}; valid: {', '.join(CHOICES)}")
    return value


if TYPE_CHECKING:
    PresetName = str
    RuleText = str
    CloudName = str
else:
    PresetName = checked_str(_check_preset)
    RuleText = checked_str(_check_rule)
    CloudName = checked_str(_check_cloud)


class MinObservation(StrictModel):
    """How long to observe before anything may be trimmed (both must be met)."""

    boots: NonNegativeInt = 3
    days: NonNegativeFloat = 7.0


class StashPolicy(StrictModel):
    """Which trimmed files keep a local copy (sources/choice.py); the others come back
    from the package archive."""

    keep: StashKeep = DEFAULT_KEEP
    budget_mib: NonNegativeInt = DEFAULT_BUDGET_MIB


class Policy(StrictModel):
    """The validated policy settings (main file and drop-ins merged)."""

    mode: Literal["auto", "manual"] = "manual"
    presets: list[PresetName] = Field(default_factory=lambda: list(DEFAULT_PRESETS))
    # Whose boot-disk and NIC drivers are kept (platforms.py): "auto" detects the running
    # platform (every platform offline or when unrecognised), "all", or platform names.
    clouds: list[CloudName] = Field(default_factory=lambda: [AUTO])
    rules: list[RuleText] = Field(default_factory=list)
    min_observation: MinObservation = Field(default_factory=MinObservation)
    firmware: Literal["trim", "keep"] = "trim"
    backend: Literal["auto", "stash", "dpkg", "rpm"] = "auto"
    remove_packages: StrictBool = True
    initramfs: Literal["auto", "skip", "dracut", "update-initramfs", "kernel-install"] = "auto"
    # The stash compresses with zstd (level 1: ~480 MB/s a core); the only choice today, so
    # a policy naming another is refused rather than silently ignored.
    stash_compression: Literal["zstd"] = "zstd"
    stash: StashPolicy = Field(default_factory=StashPolicy)


# Models by the table they describe, to list the valid keys of an unknown key's table.
_TABLES: dict[tuple[str, ...], type[StrictModel]] = {
    (): Policy,
    ("min_observation",): MinObservation,
    ("stash",): StashPolicy,
}
