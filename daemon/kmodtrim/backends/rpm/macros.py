"""rpm's macros for a root: the command line that makes rpm read ROOT's macro files and
database, ``%_netsharedpath`` as the system and as rpm sees it, and the macro definitions
kmodtrim writes (split into chunks rpm's line buffer can read)."""

from __future__ import annotations

import fnmatch
import functools
import glob
from collections.abc import Sequence
from pathlib import Path

from ...run import run
from ..detect import rpm_db_dir
from ..package import PM_ENV, is_live

MACRO_FILE = "etc/rpm/macros.kmodtrim"
_CHUNK = 8000  # characters per macro line, well below rpm's 16 KiB line buffer
_FALLBACK_MACRO_PATH = ("/usr/lib/rpm/macros:/usr/lib/rpm/macros.d/macros.*:"
                        "/usr/lib/rpm/platform/%{_target}/macros:/usr/lib/rpm/fileattrs/*.attr:"
                        "/etc/rpm/macros.*:/etc/rpm/macros:/etc/rpm/%{_target}/macros:"
                        "~/.rpmmacros")
_HEADER = """\
# Managed by kmodtrim: these module files were moved to kmodtrim's stash; rpm must not
# install them again on reinstall or upgrade, and records them as "net shared".
# %_netsharedpath keeps what the system defines elsewhere.  Do not edit; `kmodtrim restore`
# (or rollback) rewrites this file.  To set %_netsharedpath in a file loaded after this one,
# append :%{?_kmodtrim_netsharedpath} to keep kmodtrim's paths.
"""


@functools.lru_cache(maxsize=1)
def _host_macro_path() -> tuple[str, ...]:
    done = run(["rpm", "--showrc"], env=PM_ENV)
    for line in done.stdout.splitlines():
        if line.startswith("Macro path:"):
            return tuple(line.split(":", 1)[1].strip().split(":"))
    return tuple(_FALLBACK_MACRO_PATH.split(":"))


def macro_path(root: Path, *, without_ours: bool = False) -> list[str]:
    """The macro files rpm reads for ``root`` (globs left to rpm), optionally without our
    macro file — to learn what the system defines on its own."""
    live = is_live(root)
    ours = str(Path("/") / MACRO_FILE) if live else str(root / MACRO_FILE)
    entries = []
    for entry in _host_macro_path():
        if not live:
            if entry.startswith("~"):
                continue  # the invoking user's macros say nothing about an image
            if entry.startswith("/etc/"):
                entry = str(root) + entry
        if without_ours and fnmatch.fnmatchcase(ours, entry):
            # rpm sorts glob matches; list them ourselves, leaving our file out
            entries += [m for m in sorted(glob.glob(entry)) if m != ours]
        else:
            entries.append(entry)
    return entries


def rpm_command(root: Path) -> list[str]:
    """The argv prefix for running rpm on ``root`` with ROOT's macros and database."""
    if is_live(root):
        return ["rpm"]
    # --macros must come before --root: given after it, rpm 4.18 loads none of the files.
    argv = ["rpm", "--macros=" + ":".join(macro_path(root)), f"--root={root}"]
    db = rpm_db_dir(root)
    if db is not None:
        argv.append(f"--dbpath={db}")
    return argv


def _split(value: str) -> list[str]:
    return [p for p in value.strip().split(":") if p]


def system_netsharedpath(root: Path) -> list[str]:
    """``%_netsharedpath`` as the system defines it without our macro file."""
    argv = ["rpm", "--macros=" + ":".join(macro_path(root, without_ours=True)),
            "--eval", "%{?_netsharedpath}"]
    return _split(run(argv, env=PM_ENV).stdout)


def effective_netsharedpath(root: Path) -> list[str]:
    """``%_netsharedpath`` as rpm operating on ``root`` sees it."""
    return _split(run([*rpm_command(root), "--eval", "%{?_netsharedpath}"], env=PM_ENV).stdout)


def _macro_escape(path: str) -> str:
    return path.replace("%", "%%")


def _define(name: str, items: Sequence[str]) -> list[str]:
    """Lines defining ``%name`` as ``items`` joined by colons, split over ``%name_N`` chunk
    macros (recursively) when one line would be too long for rpm's macro file reader."""
    line = f"%{name} " + ":".join(items)
    if len(line) <= _CHUNK:
        return [line]
    chunks: list[list[str]] = [[]]
    size = 0
    for item in items:
        if chunks[-1] and size + len(item) + 1 > _CHUNK - len(name) - 16:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += len(item) + 1
    lines = [f"%{name}_{i} " + ":".join(chunk) for i, chunk in enumerate(chunks, 1)]
    return lines + _define(name, [f"%{{{name}_{i}}}" for i in range(1, len(chunks) + 1)])

