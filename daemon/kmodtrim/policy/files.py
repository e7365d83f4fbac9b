"""Which files make the policy of a root: the main file (or ``--policy``) and the drop-ins
in lexical order. No pydantic here: the policy cache (cache.py) checks these files before
anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PolicyError
from ..inputs import is_masked
from .rules import _HINT

MAIN_POLICY = "etc/kmodtrim/policy.toml"
DROPIN_DIR = "etc/kmodtrim/policy.d"


@dataclass(frozen=True)
class PolicyFile:
    shown: str  # in-root path recorded in Rule.source / sources
    path: Path  # where to read it (and what error messages name)
    dropin: bool


def policy_files(root: Path, explicit: Path | None, dropins: bool) -> list[PolicyFile]:
    """The files to read, in order. Raises PolicyError for an explicit file that does not
    exist and for a drop-in directory that cannot be listed."""
    files: list[PolicyFile] = []
    if explicit is not None:
        if not explicit.exists():
            raise PolicyError(
                f"{explicit}: policy file not found", hint="Check the path given to --policy."
            )
        # Anything else that is not a regular file (/dev/null, a FIFO, a directory) is
        # refused by name when it is read.
        files.append(PolicyFile(str(explicit), explicit, dropin=False))
    else:
        main = root / MAIN_POLICY
        if main.exists() or main.is_symlink():
            files.append(PolicyFile("/" + MAIN_POLICY, main, dropin=False))
    if dropins:
        files.extend(_dropin_files(root))
    return files


def _dropin_files(root: Path) -> list[PolicyFile]:
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
        PolicyFile(f"/{DROPIN_DIR}/{p.name}", p, dropin=True)
        for p in entries
        if p.name.endswith(".toml") and not p.name.startswith(".")
        and not p.is_dir() and not is_masked(p)
    ]
