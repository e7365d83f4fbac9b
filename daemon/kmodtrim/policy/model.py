"""The policy's settings as pydantic models (MinObservation, Policy): every key, its type,
default and allowed values, validated strictly."""

from __future__ import annotations

import difflib
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

from ..presets import DEFAULT_PRESETS, PRESETS
from ..sources.choice import DEFAULT_BUDGET_MIB, DEFAULT_KEEP, StashKeep
from .rules import _split_rule


def _check_rule(value: str) -> str:
    _split_rule(value)
    return value


def _check_preset(value: str, info: ValidationInfo) -> str:
    dropin = bool(info.context and info.context.get("dropin"))
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


class MinObservation(BaseModel):
    """How long to observe before anything may be trimmed (both must be met)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    boots: int = Field(default=3, ge=0)
    days: float = Field(default=7.0, ge=0, allow_inf_nan=False)


class StashPolicy(BaseModel):
    """Which trimmed files keep a local copy (sources/choice.py); the others come back
    from the package archive."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    keep: StashKeep = DEFAULT_KEEP
    budget_mib: int = Field(default=DEFAULT_BUDGET_MIB, ge=0)


class Policy(BaseModel):
    """The validated policy settings (main file and drop-ins merged)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    mode: Literal["auto", "manual"] = "manual"
    presets: list[Annotated[str, AfterValidator(_check_preset)]] = Field(
        default_factory=lambda: list(DEFAULT_PRESETS)
    )
    rules: list[Annotated[str, AfterValidator(_check_rule)]] = Field(default_factory=list)
    min_observation: MinObservation = Field(default_factory=MinObservation)
    firmware: Literal["trim", "keep"] = "trim"
    backend: Literal["auto", "stash", "dpkg", "rpm"] = "auto"
    remove_packages: bool = True
    initramfs: Literal["auto", "skip", "dracut", "update-initramfs", "kernel-install"] = "auto"
    # The stash compresses with zstd (level 1: ~480 MB/s a core); the only choice today, so
    # a policy naming another is refused rather than silently ignored.
    stash_compression: Literal["zstd"] = "zstd"
    stash: StashPolicy = Field(default_factory=StashPolicy)


# Models by the table they describe, to list the valid keys of an unknown key's table.
_TABLES: dict[tuple[str, ...], type[BaseModel]] = {
    (): Policy,
    ("min_observation",): MinObservation,
    ("stash",): StashPolicy,
}
