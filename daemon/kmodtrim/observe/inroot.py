"""Reading below a root as if it were ``/``: in-root paths resolved without leaving the
root, small text files read with limits, directories listed, undecodable names made
printable."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ObservationError
from ..inputs import MAX_OBSERVATION_BYTES, read_optional_input

_MAX_SYMLINK_HOPS = 40  # as the kernel's own limit


def _host(root: Path, inroot: str) -> Path:
    """The host path of the in-root absolute path ``inroot``."""
    return root / inroot.lstrip("/")


def _inroot_realpath(root: Path, inroot: str) -> str:
    """Resolve symlinks in ``inroot`` as if ``root`` were ``/`` (absolute link targets stay
    inside the root; ``..`` stops at it). Missing components are kept as written; a link
    loop stops resolving after _MAX_SYMLINK_HOPS links."""
    pending = [p for p in reversed(inroot.split("/")) if p]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        try:
            target = os.readlink(root.joinpath(*resolved, part))
        except (OSError, ValueError):  # not a link, missing, or a NUL in the name
            resolved.append(part)
            continue
        hops += 1
        if hops > _MAX_SYMLINK_HOPS:
            resolved.append(part)
            resolved.extend(reversed(pending))
            break
        if target.startswith("/"):
            resolved = []
        pending.extend(p for p in reversed(target.split("/")) if p)
    return "/" + "/".join(resolved)


def _read_text(root: Path, inroot: str) -> str | None:
    """A small text file below the root, or None if it cannot be read. Undecodable bytes
    are kept (surrogateescape) so that paths made from them still resolve.

    Raises ObservationError for a file that is not a regular file (never opened) or is
    larger than MAX_OBSERVATION_BYTES.
    """
    raw = read_optional_input(_host(root, inroot), limit=MAX_OBSERVATION_BYTES,
                              what="system information", error=ObservationError,
                              shown=_printable(inroot), skip_unreadable=True)
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


def _printable(value: str) -> str:
    """``value`` with undecodable bytes shown as U+FFFD: it is displayed and sent as JSON."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
