"""Loading the policy: the main file (or ``--policy``), then the drop-ins in lexical order,
each read, parsed as TOML, validated on top of the earlier ones and merged; rules keep the
file and line they were written on."""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import PolicyError
from ..inputs import MAX_CONFIG_BYTES, is_masked, read_input
from .compat import ValidationError, dump, error_list, validate
from .files import PolicyFile, policy_files
from .matcher import LoadedPolicy
from .messages import _array_item_lines, _describe_error
from .model import Policy
from .rules import _HINT, Rule, expand_presets, parse_rule


def _build(settings: Policy, user_rules: Sequence[Rule], sources: Sequence[str]) -> LoadedPolicy:
    rules = expand_presets(settings.presets) + list(user_rules)
    return LoadedPolicy(settings=settings, rules=tuple(rules), sources=tuple(sources))


@functools.cache
def default_policy() -> LoadedPolicy:
    """The built-in defaults (what an absent policy file means)."""
    return _build(Policy(), (), ())


def load_policy(root: Path, explicit: Path | None = None, *, dropins: bool = True) -> LoadedPolicy:
    """Load ROOT/etc/kmodtrim/policy.toml (or ``explicit`` instead), then, unless
    ``dropins`` is False, ROOT/etc/kmodtrim/policy.d/*.toml in lexical order.

    Raises ``PolicyError`` naming the file (and line and key where known) for an
    unreadable file, a TOML syntax error, an unknown key, a bad value or an unknown
    preset. An explicit file must exist; a missing main file means the defaults.
    """
    files = policy_files(root, explicit, dropins)

    merged: dict[str, Any] = dump(Policy())
    user_rules: list[Rule] = []
    for f in files:
        # The main file or a drop-in symlinked to /dev/null is masked: read as empty.
        text = "" if f.path != explicit and is_masked(f.path) else _read_text(f.path)
        data = _parse_toml(text, f.path)
        validated = _validate(data, merged, f, text)
        for key, value in data.items():
            if key == "rules":
                lines = _array_item_lines(text, "rules")
                for i, rule_text in enumerate(validated.rules):
                    line = lines[i][0] if i < len(lines) and lines[i][1] == rule_text else None
                    user_rules.append(parse_rule(rule_text, source=f.shown, line=line))
            elif key == "presets":
                merged["presets"] = _merge_presets(merged["presets"], value, f.dropin)
            else:
                merged[key] = dump(validated)[key]
    merged["rules"] = [r.text for r in user_rules]
    settings = validate(Policy, merged)
    return _build(settings, user_rules, [f.shown for f in files])


def _read_text(path: Path) -> str:
    """A policy file's text. Raises PolicyError for a missing, unreadable or non-UTF-8
    file, one that is not a regular file (never opened), or one over MAX_CONFIG_BYTES."""
    raw = read_input(path, limit=MAX_CONFIG_BYTES, what="policy file", error=PolicyError,
                     hint="Check that the file exists and is a readable regular file.")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise PolicyError(f"{path}:{line}: not UTF-8 text", hint=_HINT) from None


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


# No policy key nests deeper than 2 (a table holding arrays); deeper data is refused
# before validation, whose error messages walk it recursively.
_MAX_NESTING = 16


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    """The TOML document in ``text``. Raises PolicyError for a syntax error and for
    arrays or tables nested deeper than _MAX_NESTING (tomllib recurses once per level:
    thousands of levels exhaust the recursion limit)."""
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise PolicyError(
            f"{path}: TOML nested too deeply to parse (more than {_MAX_NESTING} levels); "
            "a policy nests at most 2", hint=_HINT,
        ) from None
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        m = _TOML_POSITION.search(message)
        if m:
            where = f"{path}:{m.group(1)}:{m.group(2)}"
            message = message[: m.start()]
        elif message.endswith("(at end of document)"):
            where = f"{path}:{text.count(chr(10)) + 1}"
            message = message.removesuffix("(at end of document)").rstrip()
        else:
            where = str(path)
        raise PolicyError(f"{where}: TOML syntax error: {message}", hint=_HINT) from None
    if _nesting(data) > _MAX_NESTING:
        raise PolicyError(
            f"{path}: TOML nested more than {_MAX_NESTING} levels deep; a policy nests "
            "at most 2", hint=_HINT,
        )
    return data


def _nesting(data: object) -> int:
    """How deep tables and arrays nest in parsed TOML (walked without recursion)."""
    deepest = 0
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Iterable[object] = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > _MAX_NESTING:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _overlay(base: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` over ``base``: tables merge key by key, everything else replaces."""
    out = dict(base)
    for key, value in data.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = _overlay(old, value)
        else:
            out[key] = value
    return out


def _validate(
    data: Mapping[str, Any], merged: Mapping[str, Any], f: PolicyFile, text: str
) -> Policy:
    """Validate this file's keys on top of what earlier files gave. Lists replace (rather
    than append) here so that an error's list index is the index in this file; since
    ``merged`` is already valid, every error is this file's."""
    given = _overlay(merged, data)
    try:
        return validate(Policy, given, context={"dropin": f.dropin})
    except ValidationError as e:
        described = [_describe_error(err, f.path, text) for err in error_list(e, given)]
        # In file order, so the message reads top to bottom like the file.
        described.sort(key=lambda d: d[0] if d[0] is not None else 1 << 30)
        raise PolicyError("\n".join(message for _, message in described), hint=_HINT) from None


def _merge_presets(current: Sequence[str], given: Sequence[str], dropin: bool) -> list[str]:
    if not dropin:
        result: list[str] = []
    else:
        result = list(current)
    for entry in given:
        if entry.startswith("-"):
            if entry[1:] in result:
                result.remove(entry[1:])
        elif entry not in result:
            result.append(entry)
    return result

