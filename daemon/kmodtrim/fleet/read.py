"""Reading the fleet's files: a merge's inputs (exports or osquery result logs) and a
merge document, each bounded as every input is (inputs.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..inputs import MAX_OBSERVATION_BYTES, read_input
from .osquery import parse_osquery_log
from .sources import FleetInputError, HostObservation, host_of_export

# An osquery result log of a big fleet is bigger than one host's observations.
MAX_FLEET_INPUT_BYTES = 16 * MAX_OBSERVATION_BYTES


def _text(path: Path, what: str) -> str:
    data = read_input(path, limit=MAX_FLEET_INPUT_BYTES, what=what, error=FleetInputError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FleetInputError(f"{path}: not UTF-8 text (byte {exc.start}): not {what}") \
            from None


def parse_merge_input(text: str, origin: str) -> list[HostObservation]:
    """The hosts in one merge input: an export document, or osquery result lines.

    Raises FleetInputError naming ``origin`` (and the line) for anything else.
    """
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise FleetInputError(f"{origin}: empty: neither an observation export nor an "
                              "osquery result log")
    try:
        doc = json.loads(stripped)
    except json.JSONDecodeError:
        doc = None  # several JSON lines: an osquery result log
    if isinstance(doc, dict) and "kind" in doc:
        return [host_of_export(doc, origin)]
    return parse_osquery_log(stripped, origin)


def read_merge_inputs(paths: list[Path]) -> list[HostObservation]:
    """Every host in the files ``paths``. Raises FleetInputError naming the file."""
    hosts: list[HostObservation] = []
    for path in paths:
        hosts.extend(parse_merge_input(
            _text(path, "an observation export or osquery result log"), str(path)))
    return hosts


def read_merge_document(path: Path) -> Any:
    """The JSON document in ``path`` (checked by formats.keep_of). Raises InputError."""
    text = _text(path, "a fleet merge document")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not a JSON document: {exc.msg}",
                         hint="give what 'kmodtrim fleet merge' wrote") from None
