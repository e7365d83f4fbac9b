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
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
)

from .errors import PolicyError
from .inputs import MAX_CONFIG_BYTES, MAX_QUOTED_CHARS, is_masked, quote_input, read_input
from .names import module_name_from_path, normalize
from .presets import DEFAULT_PRESETS, PRESET_DESCRIPTIONS, PRESETS

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

MAIN_POLICY = "etc/kmodtrim/policy.toml"
DROPIN_DIR = "etc/kmodtrim/policy.d"

_GLOB_CHARS = re.compile(r"[*?\[]")
_ALIAS_PREFIX = "alias:"
_HINT = (
    "Fix the file; every key and its allowed values are documented in the comments of "
    "the default /etc/kmodtrim/policy.toml shipped with kmodtrim."
)

RuleKind = Literal["name", "path", "alias"]


# -- rule syntax -------------------------------------------------------------------------


def _normalize_glob(pattern: str) -> str:
    """``-`` → ``_`` like module names, except inside ``[...]`` where ``-`` is a range."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "[":
            # Same bracket rules as fnmatch: "[!" and a leading "]" belong to the set; an
            # unterminated "[" is a literal character.
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j < n:
                out.append(pattern[i : j + 1])
                i = j + 1
                continue
            out.append("[")
        else:
            out.append("_" if c == "-" else c)
        i += 1
    return "".join(out)


def _split_rule(text: str) -> tuple[bool, RuleKind, str]:
    """(exclude, kind, normalised pattern) of a rule string; ValueError says what is wrong."""
    if not isinstance(text, str):  # pragma: no cover - pydantic checks the type first
        raise ValueError("a rule must be a string")
    exclude = text.startswith("-")
    body = text[1:] if exclude else text
    kind: RuleKind
    if body.startswith(_ALIAS_PREFIX):
        # Checked before "/": alias strings may contain "/" (e.g. "devname:net/tun").
        kind, pattern = "alias", _normalize_glob(body[len(_ALIAS_PREFIX) :])
    elif "/" in body:
        # Paths are matched as files are named (dm-mod.ko), so they are not normalised.
        kind, pattern = "path", body
    else:
        kind, pattern = "name", _normalize_glob(body)
    if not pattern:
        raise ValueError(
            "empty rule; write a module name or glob ('virtio_*'), 'alias:GLOB', or a "
            "path glob ('kernel/drivers/net/*'), with a leading '-' to exclude"
        )
    if body.startswith("-"):
        raise ValueError("a rule may start with only one '-' (the exclude marker)")
    if any(c.isspace() for c in pattern):
        raise ValueError("a rule must not contain whitespace; write one rule per string")
    if kind == "path" and pattern.startswith("/"):
        raise ValueError(
            "a path rule is relative to the kernel's module directory, e.g. "
            "'kernel/drivers/net/*', not an absolute path"
        )
    return exclude, kind, pattern


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def _is_glob(pattern: str) -> bool:
    return bool(_GLOB_CHARS.search(pattern))


@dataclass(frozen=True, slots=True)
class Rule:
    """One keep (or, with ``exclude``, don't-keep) rule, from a preset or a policy file.

    ``pattern`` is the glob as matched: without the leading ``-`` or ``alias:``, and
    normalised for name and alias rules. ``source`` is the in-root file path
    (``/etc/kmodtrim/policy.toml``) or ``preset:NAME``; ``line`` the 1-based line of the
    rule string in that file (None for presets, or when it could not be located).
    ``text`` is the rule as written.
    """

    pattern: str
    exclude: bool
    kind: RuleKind
    source: str
    line: int | None = None
    text: str = ""

    @property
    def from_preset(self) -> bool:
        """True for rules expanded from a preset (not written by the administrator)."""
        return self.source.startswith("preset:")

    @property
    def is_glob(self) -> bool:
        """True if the pattern has glob characters (``*``, ``?``, ``[``)."""
        return _is_glob(self.pattern)

    def matches(self, name: str, relpath: str, aliases: Iterable[str] = ()) -> bool:
        """Does this rule match the module ``name`` at ``relpath`` (relative to the
        module directory) with these ``aliases``? Names and aliases are normalised."""
        regex = _compiled(self.pattern)
        if self.kind == "name":
            return regex.match(normalize(name)) is not None
        if self.kind == "path":
            return regex.match(relpath) is not None
        return any(regex.match(normalize(a)) is not None for a in aliases)

    def written(self) -> str:
        """The rule as written in its source."""
        if self.text:
            return self.text
        prefix = _ALIAS_PREFIX if self.kind == "alias" else ""
        return ("-" if self.exclude else "") + prefix + self.pattern

    def describe(self) -> str:
        """Where the rule comes from, for ``explain`` and warnings, e.g.
        ``policy rule 'virtio*' (/etc/kmodtrim/policy.toml:12)``."""
        if self.from_preset:
            return f"preset {self.source.removeprefix('preset:')} ({self.written()!r})"
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"policy rule {self.written()!r} ({where})"


def parse_rule(text: str, *, source: str, line: int | None = None) -> Rule:
    """Parse one rule string. Raises ``PolicyError`` if it is not a valid rule."""
    try:
        exclude, kind, pattern = _split_rule(text)
    except ValueError as e:
        where = source if line is None else f"{source}:{line}"
        raise PolicyError(f"{where}: rule {quote_input(text)}: {e}", hint=_HINT) from None
    return Rule(pattern=pattern, exclude=exclude, kind=kind, source=source, line=line, text=text)


# -- the model ---------------------------------------------------------------------------


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


# Models by the table they describe, to list the valid keys of an unknown key's table.
_TABLES: dict[tuple[str, ...], type[BaseModel]] = {
    (): Policy,
    ("min_observation",): MinObservation,
}


# -- matching ----------------------------------------------------------------------------


def _literal_runs(pattern: str) -> list[str]:
    """The literal runs of an fnmatch pattern between its wildcards (``*``, ``?`` and
    ``[...]`` sets, parsed as fnmatch does: an unterminated ``[`` is literal). One run
    means no wildcard; the first run is the prefix every match starts with, the last
    the suffix every match ends with: ``"a*b?c"`` → ``["a", "b", "c"]``."""
    runs: list[list[str]] = [[]]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c in "*?":
            runs.append([])
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                runs[-1].append(c)
            else:
                runs.append([])
                i = j + 1
        else:
            runs[-1].append(c)
    return ["".join(run) for run in runs]


# (rule index, pattern) in descending index order
_Bucket = list[tuple[int, str]]


class _KindMatcher:
    """All rules of one kind, arranged so that finding the last rule matching a subject
    costs about the subject's length rather than the number of rules (one regex of 10,000
    alternatives tries every one of them on every subject).

    Literal patterns are a dict. Each glob goes into one bucket, keyed by a literal part
    that every match contains: its literal prefix or suffix, whichever is longer
    (``virtio_`` of ``virtio_*``, ``_wmi`` of ``*_wmi``), else its longest literal run
    (``usb`` of ``*usb*``), else (``*``, ``?*``) the catch-all bucket. A subject looks up
    only the buckets named by its own prefixes, suffixes and substrings of the key lengths
    in use, and tries their patterns from the highest rule index down, skipping those
    below the best match so far: the result is the last matching rule.
    """

    __slots__ = ("infix", "lengths", "literals", "prefix", "regex", "suffix", "wild")

    def __init__(self, indexed: Sequence[tuple[int, str]]) -> None:
        self.literals: dict[str, int] = {}
        self.prefix: dict[str, _Bucket] = {}
        self.suffix: dict[str, _Bucket] = {}
        self.infix: dict[str, _Bucket] = {}
        self.wild: _Bucket = []
        self.regex: dict[str, Callable[[str], re.Match[str] | None]] = {}
        latest: dict[str, int] = {}
        for index, pattern in indexed:
            latest[pattern] = index  # a repeated pattern can only win at its last index
        for pattern, index in sorted(latest.items(), key=lambda item: -item[1]):
            runs = _literal_runs(pattern)
            if len(runs) == 1:
                self.literals[pattern] = index
                continue
            first, last = runs[0], runs[-1]
            if first or last:
                table, key = (self.prefix, first) if len(first) >= len(last) else (
                    self.suffix, last)
                table.setdefault(key, []).append((index, pattern))
            elif longest := max(runs, key=len):
                self.infix.setdefault(longest, []).append((index, pattern))
            else:
                self.wild.append((index, pattern))
        self.lengths = [sorted({len(key) for key in table})
                        for table in (self.prefix, self.suffix, self.infix)]

    def best(self, subject: str) -> int:
        """The highest index of a pattern matching all of ``subject``, or -1."""
        found = self.literals.get(subject, -1)
        n = len(subject)
        prefix_lengths, suffix_lengths, infix_lengths = self.lengths
        for length in prefix_lengths:
            if length > n:
                break
            bucket = self.prefix.get(subject[:length])
            if bucket is not None:
                found = self._try(bucket, subject, found)
        for length in suffix_lengths:
            if length > n:
                break
            bucket = self.suffix.get(subject[n - length :])
            if bucket is not None:
                found = self._try(bucket, subject, found)
        for length in infix_lengths:
            if length > n:
                break
            for key in {subject[i : i + length] for i in range(n - length + 1)}:
                bucket = self.infix.get(key)
                if bucket is not None:
                    found = self._try(bucket, subject, found)
        if self.wild:
            found = self._try(self.wild, subject, found)
        return found

    def _try(self, bucket: _Bucket, subject: str, found: int) -> int:
        for index, pattern in bucket:
            if index <= found:
                break  # the rest are earlier rules than the best match so far
            match = self.regex.get(pattern)
            if match is None:  # compiled on first use: most buckets are never looked at
                match = self.regex[pattern] = re.compile(fnmatch.translate(pattern)).match
            if match(subject) is not None:
                return index
        return found

    @property
    def empty(self) -> bool:
        return not (self.literals or self.prefix or self.suffix or self.infix or self.wild)


class _Matcher:
    __slots__ = ("alias", "name", "path")

    def __init__(self, rules: Sequence[Rule]) -> None:
        def of(kind: RuleKind) -> _KindMatcher:
            return _KindMatcher([(i, r.pattern) for i, r in enumerate(rules) if r.kind == kind])

        self.name = of("name")
        self.path = of("path")
        self.alias = of("alias")

    def best(self, name: str, relpath: str, aliases: Iterable[str]) -> int:
        best = max(self.name.best(normalize(name)), self.path.best(relpath))
        if not self.alias.empty:
            for alias in aliases:
                best = max(best, self.alias.best(normalize(alias)))
        return best


@dataclass(frozen=True)
class LoadedPolicy:
    """Settings plus the compiled rule list. ``rules`` holds the presets' rules first (in
    ``settings.presets`` order), then the user rules in file order."""

    settings: Policy
    rules: tuple[Rule, ...]
    sources: tuple[str, ...]
    _matcher: _Matcher = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_matcher", _Matcher(self.rules))

    @property
    def user_rules(self) -> tuple[Rule, ...]:
        """The rules written in policy files (not expanded from presets)."""
        return tuple(r for r in self.rules if not r.from_preset)

    def decide(self, name: str, relpath: str, aliases: Iterable[str] = ()) -> Rule | None:
        """The last rule matching this module, or None. A returned rule with ``exclude``
        set means the policy explicitly does not keep the module."""
        best = self._matcher.best(name, relpath, aliases)
        return self.rules[best] if best >= 0 else None

    def literal_rules_matching_nothing(
        self, known_names: Iterable[str], known_aliases: Iterable[str] = ()
    ) -> list[Rule]:
        """User rules without glob characters that name no known module or builtin: a
        misspelt name must not be skipped silently. Alias rules are checked only when
        ``known_aliases`` is given; a path rule counts as naming nothing when it is not
        the path of a module file named in ``known_names``."""
        names = {normalize(n) for n in known_names}
        aliases = {normalize(a) for a in known_aliases}
        unmatched: list[Rule] = []
        for rule in self.user_rules:
            if rule.is_glob:
                continue
            if rule.kind == "name":
                missing = rule.pattern not in names
            elif rule.kind == "alias":
                missing = bool(aliases) and rule.pattern not in aliases
            else:
                module = module_name_from_path(rule.pattern)
                missing = module is None or module not in names
            if missing:
                unmatched.append(rule)
        return unmatched


# -- loading -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _PolicyFile:
    shown: str  # in-root path recorded in Rule.source / sources
    path: Path  # where to read it (and what error messages name)
    dropin: bool


def _expand_presets(presets: Iterable[str]) -> list[Rule]:
    rules: list[Rule] = []
    for name in presets:
        source = f"preset:{name}"
        rules.extend(parse_rule(text, source=source) for text in PRESETS[name])
    return rules


def _build(settings: Policy, user_rules: Sequence[Rule], sources: Sequence[str]) -> LoadedPolicy:
    rules = _expand_presets(settings.presets) + list(user_rules)
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
    files: list[_PolicyFile] = []
    if explicit is not None:
        if not explicit.exists():
            raise PolicyError(
                f"{explicit}: policy file not found", hint="Check the path given to --policy."
            )
        # Anything else that is not a regular file (/dev/null, a FIFO, a directory) is
        # refused by name when it is read.
        files.append(_PolicyFile(str(explicit), explicit, dropin=False))
    else:
        main = root / MAIN_POLICY
        if main.exists() or main.is_symlink():
            files.append(_PolicyFile("/" + MAIN_POLICY, main, dropin=False))
    if dropins:
        files.extend(_dropin_files(root))

    merged: dict[str, Any] = Policy().model_dump()
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
                merged[key] = validated.model_dump()[key]
    merged["rules"] = [r.text for r in user_rules]
    settings = Policy.model_validate(merged)
    return _build(settings, user_rules, [f.shown for f in files])


def _dropin_files(root: Path) -> list[_PolicyFile]:
    directory = root / DROPIN_DIR
    try:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
    except FileNotFoundError:
        return []
    except NotADirectoryError:
        raise PolicyError(f"{directory}: not a directory", hint=_HINT) from None
    except OSError as e:
        raise PolicyError(f"{directory}: cannot list drop-ins: {e.strerror or e}") from None
    # Hidden files are editor/packaging leftovers; a drop-in symlinked to /dev/null is
    # masked and a directory named *.toml ignored. Any other file that is not regular (a
    # FIFO, a device) is kept so that reading it refuses it by name.
    return [
        _PolicyFile(f"/{DROPIN_DIR}/{p.name}", p, dropin=True)
        for p in entries
        if p.name.endswith(".toml") and not p.name.startswith(".")
        and not p.is_dir() and not is_masked(p)
    ]


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
    data: Mapping[str, Any], merged: Mapping[str, Any], f: _PolicyFile, text: str
) -> Policy:
    """Validate this file's keys on top of what earlier files gave. Lists replace (rather
    than append) here so that an error's list index is the index in this file; since
    ``merged`` is already valid, every error is this file's."""
    try:
        return Policy.model_validate(_overlay(merged, data), context={"dropin": f.dropin})
    except ValidationError as e:
        described = [_describe_error(err, f.path, text) for err in e.errors()]
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


# -- error messages ----------------------------------------------------------------------


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


def _describe_error(err: Any, path: Path, text: str) -> tuple[int | None, str]:
    """(line, one-line message) for one pydantic error in the file at ``path``."""
    loc: tuple[int | str, ...] = tuple(err["loc"])
    key = _format_loc(loc)
    line = _key_line(text, loc)
    where = f"{path}:{line}" if line else str(path)
    kind: str = err["type"]
    ctx: dict[str, Any] = err.get("ctx") or {}
    if kind == "extra_forbidden":
        table = tuple(str(p) for p in loc[:-1])
        model = _TABLES.get(table, Policy)
        valid = sorted(model.model_fields)
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
    elif kind == "list_type":
        explanation = 'must be a list of strings, e.g. ["a", "b"]'
    elif kind == "string_type":
        explanation = "must be a string"
    elif kind in ("model_type", "dict_type"):
        table = tuple(str(p) for p in loc)
        fields = ", ".join(_TABLES[table].model_fields) if table in _TABLES else ""
        explanation = f"must be a table ([{key}]) with keys {fields}".rstrip()
    elif kind == "value_error":
        explanation = str(ctx.get("error", err["msg"]))
    else:
        explanation = str(err["msg"])
    value = _toml_value(err.get("input"))
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
