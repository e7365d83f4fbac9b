"""modprobe.d configuration under a root: softdeps, weakdeps, aliases, install/blacklist.

kmod reads ``*.conf`` from /etc/modprobe.d, /run/modprobe.d, /usr/local/lib/modprobe.d,
/usr/lib/modprobe.d and /lib/modprobe.d; a file name in an earlier directory hides the same
name in a later one, and files are read in lexical order of their names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .elf import parse_softdep
from .inputs import MAX_CONFIG_BYTES, is_masked, read_optional_input
from .names import normalize
from .paths import ON_DEMAND_CONF

CONFIG_DIRS = (
    "etc/modprobe.d",
    "run/modprobe.d",
    "usr/local/lib/modprobe.d",
    "usr/lib/modprobe.d",
    "lib/modprobe.d",
)


@dataclass(frozen=True)
class ModprobeConfig:
    """What modprobe.d says about module relationships (names normalised)."""

    softdeps: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    weakdeps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    aliases: tuple[tuple[str, str], ...] = ()  # (pattern, module)
    install_commands: dict[str, str] = field(default_factory=dict)
    blacklist: frozenset[str] = frozenset()
    files: tuple[str, ...] = ()  # in-root paths read, in order


def config_files(root: Path) -> list[Path]:
    """The modprobe.d files kmod would read under ``root``, in the order it reads them."""
    chosen: dict[str, Path] = {}
    for directory in CONFIG_DIRS:
        base = root / directory
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            if name.endswith(".conf") and name not in chosen:
                chosen[name] = base / name
    return [chosen[name] for name in sorted(chosen)]


def _logical_lines(text: str) -> list[str]:
    """Lines with ``\\`` continuations joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.endswith("\\"):
            pending += raw[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    if pending.strip():
        lines.append(pending.strip())
    return lines


def read_modprobe_config(root: Path) -> ModprobeConfig:
    """Parse every modprobe.d file under ``root``; unreadable files are skipped, and one
    symlinked to /dev/null masks the same name in later directories.

    Raises InputError for a file that is not a regular file (a FIFO is never opened) or
    is larger than MAX_CONFIG_BYTES.
    """
    softdeps: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    weakdeps: dict[str, tuple[str, ...]] = {}
    aliases: list[tuple[str, str]] = []
    installs: dict[str, str] = {}
    blacklist: set[str] = set()
    files: list[str] = []
    own = root / ON_DEMAND_CONF.lstrip("/")
    for path in config_files(root):
        if path.is_dir():  # kmod skips these too ("directories ... are not supported")
            continue
        if path == own:
            # kmodtrim's own on-demand lines: installs for trimmed modules and their own
            # aliases, which the index has from the modules themselves (thousands of lines
            # on a trimmed generic kernel, read by every plan and restore for nothing).
            continue
        if is_masked(path):  # a symlink to /dev/null: read as empty, as kmod does
            raw: bytes | None = b""
        else:
            raw = read_optional_input(path, limit=MAX_CONFIG_BYTES, what="modprobe.d file",
                                      skip_unreadable=True)
        if raw is None:
            continue
        text = raw.decode("utf-8", "replace")
        files.append("/" + str(path.relative_to(root)))
        for line in _logical_lines(text):
            words = line.split()
            verb = words[0]
            if verb == "softdep" and len(words) >= 2:
                # A later softdep line for the same module replaces the earlier one (kmod).
                softdeps[normalize(words[1])] = parse_softdep(" ".join(words[2:]))
            elif verb == "weakdep" and len(words) >= 3:
                name = normalize(words[1])
                weakdeps[name] = weakdeps.get(name, ()) + tuple(normalize(w) for w in words[2:])
            elif verb == "alias" and len(words) >= 3:
                aliases.append((normalize(words[1]), normalize(words[2])))
            elif verb == "install" and len(words) >= 3:
                installs[normalize(words[1])] = " ".join(words[2:])
            elif verb == "blacklist" and len(words) >= 2:
                blacklist.add(normalize(words[1]))
    return ModprobeConfig(
        softdeps=softdeps,
        weakdeps=weakdeps,
        aliases=tuple(aliases),
        install_commands=installs,
        blacklist=frozenset(blacklist),
        files=tuple(files),
    )
