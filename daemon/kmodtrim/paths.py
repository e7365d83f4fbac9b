"""Facts about paths under a root, defined once: where a root's module trees are, whether
a kernel is installed there, whether a root is the running system, an in-root path's
place on this machine."""

from __future__ import annotations

import os
from pathlib import Path

MODULE_DIR_BASES = ("lib/modules", "usr/lib/modules")


def in_root(root: Path, path: str) -> Path:
    """Where the in-root absolute ``path`` ("/lib/…") is on this machine (no links are
    resolved: writes go through fsutil, which never leaves the root)."""
    return root / path.lstrip("/")


def is_live_root(root: Path) -> bool:
    """True when ``root`` is the running system's own root."""
    try:
        return os.path.samefile(root, "/")
    except OSError:
        return False


def kernel_installed(root: Path, kernel: str) -> bool:
    """True when ``kernel`` has a module tree under ``root``."""
    return any((root / base / kernel).is_dir() for base in MODULE_DIR_BASES)
