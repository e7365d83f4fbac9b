"""The generations as ``history`` lists them and kmodtrimd reports them: each from its
summary (state/summary.py) when that is valid, else from its manifest (store.py, loaded
only then: whole records need neither the manifest nor the records' model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .summary import (
    _SUMMARY_TYPES,
    HISTORY_KEYS,
    generation_numbers,
    read_summary,
    summary_of,
    zero_summary,
)


def generation_summary(root: Path, number: int) -> dict[str, Any]:
    """summary_of(generation ``number``): from its summary file when that is valid
    (read_summary), else from the manifest. Raises NoSuchGenerationError, StoreError."""
    summary = read_summary(root, number) if number > 0 else zero_summary()
    if summary is not None:
        return {key: summary[key] for key in _SUMMARY_TYPES}
    from ..store import load_generation  # a manifest: the records' model is needed

    return {key: value for key, value in summary_of(load_generation(root, number)).items()
            if key in _SUMMARY_TYPES}


def generation_rows(root: Path) -> list[dict[str, Any]]:
    """Every generation as ``history`` lists it, oldest first (the last is current)."""
    rows = [generation_summary(root, n) for n in generation_numbers(root)]
    current = rows[-1]["generation"]
    return [{**{key: row[key] for key in HISTORY_KEYS}, "current": row["generation"] == current}
            for row in rows]
