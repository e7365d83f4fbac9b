"""Error messages for a policy file: each validation error as one line naming the file,
line and key, the bad value and what is allowed; keys and array items located in the TOML
text (best effort)."""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..inputs import MAX_QUOTED_CHARS
from .compat import field_names
from .model import _TABLES, Policy

if TYPE_CHECKING:
    from .compat import ErrorDetail


def _format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float | list):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _describe_error(err: ErrorDetail, path: Path, text: str) -> tuple[int | None, str]:
    """(line, one-line message) for one validation error in the file at ``path``. Every
    error the model can raise is worded here, not by pydantic, so the message is the same
    under pydantic 1.10 and 2."""
    loc: tuple[int | str, ...] = tuple(err["loc"])
    key = _format_loc(loc)
    line = _key_line(text, loc)
    where = f"{path}:{line}" if line else str(path)
    kind: str = err["type"]
    ctx = err["ctx"]
    if kind == "extra_forbidden":
        table = tuple(str(p) for p in loc[:-1])
        model = _TABLES.get(table, Policy)
        valid = sorted(field_names(model))
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        suggestion = f" (did you mean '{close[0]}'?)" if close else ""
        scope = f"in [{'.'.join(table)}]" if table else "at the top level"
        return line, (
            f"{where}: unknown key '{key}'{suggestion}; valid keys {scope}: {', '.join(valid)}"
        )
    if kind == "literal_error":
        explanation = f"allowed values are {ctx.get('expected', '')}"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        explanation = "must be a whole number (e.g. 3)"
    elif kind in ("float_type", "float_parsing"):
        explanation = "must be a number (e.g. 7 or 7.5)"
    elif kind == "finite_number":
        explanation = "must be a finite number"
    elif kind == "greater_than_equal":
        bound = ctx.get("ge")
        explanation = f"must be >= {bound:g}" if isinstance(bound, int | float) else (
            f"must be >= {bound}"
        )
    elif kind == "bool_type":
        explanation = "must be true or false"
    elif kind == "list_type":
        explanation = 'must be a list of strings, e.g. ["a", "b"]'
    elif kind == "string_type":
        explanation = "must be a string"
    elif kind in ("model_type", "dict_type"):
        table = tuple(str(p) for p in loc)
        fields = ", ".join(field_names(_TABLES[table])) if table in _TABLES else ""
        explanation = f"must be a table ([{key}]) with keys {fields}".rstrip()
    elif kind == "value_error":
        explanation = str(ctx.get("error", err["msg"]))
    else:
        explanation = str(err["msg"])
    value = _toml_value(err["input"])
    if len(value) > MAX_QUOTED_CHARS:  # a huge value is not echoed whole
        value = value[:MAX_QUOTED_CHARS] + "…"
    return line, f"{where}: {key} = {value}: {explanation}"


# -- locating keys and array items in TOML text (best effort, for messages) --------------

_TABLE_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\s*(?:#.*)?$")


def _key_line(text: str, loc: Sequence[int | str]) -> int | None:
    """The line where ``loc`` (e.g. ("min_observation", "boots") or ("rules", 2)) is
    written, or None when it cannot be told."""
    if loc and isinstance(loc[-1], int):
        keys = [str(p) for p in loc[:-1]]
        if len(keys) == 1:
            items = _array_item_lines(text, keys[0])
            index = loc[-1]
            if index < len(items):
                return items[index][0]
        loc = loc[:-1]
    keys = [str(p) for p in loc]
    if not keys:
        return None
    table: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        header = _TABLE_HEADER.match(line)
        if header and not line.lstrip().startswith("[["):
            table = [k.strip().strip("\"'") for k in header.group(1).split(".")]
            if table == keys:
                return number
            continue
        m = re.match(r"^\s*([A-Za-z0-9_.\-\"']+)\s*=", line)
        if m:
            full = table + [k.strip("\"'") for k in m.group(1).split(".")]
            if full[: len(keys)] == keys:
                return number
    return None


_STRING_OR_TOKEN = re.compile(r"\"(?:[^\"\\\n]|\\.)*\"|'[^'\n]*'")


def _array_item_lines(text: str, key: str) -> list[tuple[int, object]]:
    """(line, value) of each item of the top-level array ``key = [...]`` in order; the
    value is the decoded string, or None for a non-string item. Stops early at anything
    it does not understand (nested arrays, multi-line strings)."""
    m = re.search(rf"^[ \t]*[\"']?{re.escape(key)}[\"']?[ \t]*=[ \t]*\[", text, re.MULTILINE)
    if m is None:
        return []
    items: list[tuple[int, object]] = []
    pos = m.end()
    line = text.count("\n", 0, pos) + 1
    n = len(text)
    while pos < n:
        c = text[pos]
        if c == "\n":
            line += 1
            pos += 1
        elif c in " \t\r,":
            pos += 1
        elif c == "#":
            end = text.find("\n", pos)
            pos = n if end < 0 else end
        elif c == "]":
            break
        elif c in "\"'":
            if text.startswith(c * 3, pos):
                break
            s = _STRING_OR_TOKEN.match(text, pos)
            if s is None:
                break
            try:
                value = tomllib.loads("v = " + s.group(0))["v"]
            except tomllib.TOMLDecodeError:
                break
            items.append((line, value))
            pos = s.end()
        elif c in "[{":
            break
        else:
            token = re.compile(r"[^\s,\]#]+").match(text, pos)
            if token is None:  # pragma: no cover - c is not a separator
                break
            items.append((line, None))
            pos = token.end()
    return items
