"""Loaded modules: ``--observed`` files (one name a line, ``/proc/modules`` and ``lsmod``
output too), ROOT/proc/modules and ROOT/sys/module."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ObservationError
from ..inputs import MAX_OBSERVATION_BYTES, quote_input, read_input, read_optional_input
from ..names import is_valid_module_name, module_name_from_path, normalize
from .exported import looks_like_document, parse_observation_document
from .inroot import _host, _scandir

PROC_MODULES = "/proc/modules"


@dataclass(frozen=True)
class ObservedName:
    """A module name seen loaded, and where: ``source`` is ``/proc/modules`` or the
    ``--observed`` file as given; ``line`` is 1-based, None when not from a line."""

    name: str
    source: str
    line: int | None


def parse_observed_text(text: str, origin: str) -> list[ObservedName]:
    """Module names in ``text``: one name per line, ``#`` comments (whole-line or trailing),
    blank lines; ``/proc/modules`` lines and ``lsmod`` output (its header is skipped) give
    their first column. Names are normalised; repeats keep their first occurrence.

    Raises ObservationError naming ``origin:LINE`` for a token that cannot be a module
    name, or a line holding several names (only the first would be taken otherwise).
    """
    found: dict[str, ObservedName] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0]
        if lineno == 1:
            line = line.lstrip("\ufeff")  # a byte order mark from an editor
        tokens = line.split()
        if not tokens:
            continue
        if tokens[:2] == ["Module", "Size"]:  # lsmod's header
            continue
        token = tokens[0]
        if not is_valid_module_name(token):
            as_file = module_name_from_path(token)
            raise ObservationError(
                f"{origin}:{lineno}: {quote_input(token)} is not a module name",
                hint=(f"write the module name, e.g. {quote_input(as_file)}" if as_file else
                      "give one module name per line (letters, digits, '_' or '-'); "
                      "'#' starts a comment; /proc/modules and lsmod output work too"),
            )
        if len(tokens) > 1 and not tokens[1].isdigit():
            # Neither "NAME SIZE …" (/proc/modules, lsmod) nor one name: probably several
            # names on a line, of which only the first would be kept — say so instead.
            raise ObservationError(
                f"{origin}:{lineno}: expected one module name, "
                f"found {quote_input(line.strip())}",
                hint="give one module name per line; /proc/modules and lsmod lines work too",
            )
        name = normalize(token)
        if name not in found:
            found[name] = ObservedName(name, origin, lineno)
    return list(found.values())


def read_observed_file(path: Path) -> list[ObservedName]:
    """The module names in an ``--observed`` file (format: see parse_observed_text; or a
    JSON observation export or fleet merge, see exported.py).

    Raises ObservationError if the file cannot be read, is not a regular file (a FIFO or
    device is never opened), is larger than MAX_OBSERVATION_BYTES, is not UTF-8, or has a
    bad line.
    """
    data = read_input(path, limit=MAX_OBSERVATION_BYTES, what="observed-modules file",
                      error=ObservationError,
                      hint="give a readable file with one module name per line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ObservationError(
            f"{path}: not UTF-8 text (byte {exc.start}): not an observed-modules file",
            hint="give a text file with one module name per line",
        ) from exc
    if looks_like_document(text):  # an observation export or a fleet merge
        return [ObservedName(name, source, None)
                for name, source in parse_observation_document(text, str(path))]
    return parse_observed_text(text, str(path))


def merge_observed(*groups: Iterable[ObservedName]) -> list[ObservedName]:
    """The names in ``groups``, in order, each once: the first source naming a module is
    the one kept. An --observed file that was also supplied to an earlier trim (so it is
    remembered) names its modules twice; they are still one module observed each."""
    found: dict[str, ObservedName] = {}
    for group in groups:
        for observed in group:
            found.setdefault(observed.name, observed)
    return list(found.values())


def read_proc_modules(root: Path) -> list[ObservedName]:
    """Modules loaded in the running kernel, from ROOT/proc/modules ([] if absent).

    Raises ObservationError if the file exists but cannot be read or parsed, is not a
    regular file, or is larger than MAX_OBSERVATION_BYTES.
    """
    data = read_optional_input(
        _host(root, PROC_MODULES), limit=MAX_OBSERVATION_BYTES, what="the loaded modules",
        error=ObservationError, shown=PROC_MODULES,
        hint="run as a user that can read /proc/modules",
    )
    if data is None:
        return []
    return parse_observed_text(data.decode("utf-8", "replace"), PROC_MODULES)


def read_sys_modules(root: Path) -> list[str]:
    """Loadable modules loaded now, from ROOT/sys/module: the entries with an ``initstate``
    file (builtins appear there too, without one). Sorted, normalised; [] if absent."""
    base = _host(root, "/sys/module")
    names: set[str] = set()
    for entry in _scandir(base):
        if is_valid_module_name(entry.name) and os.path.isfile(
            os.path.join(entry.path, "initstate")
        ):
            names.add(normalize(entry.name))
    return sorted(names)
