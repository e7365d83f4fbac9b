"""Facts about paths under a root, defined once: where a root's module trees are, which
kernels are installed there and which one is meant by default, whether a root is the
running system, an in-root path's place on this machine. Cheap: the standard library only,
so the CLI's quick verbs can use them."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from .errors import KernelNotFoundError

MODULE_DIR_BASES = ("lib/modules", "usr/lib/modules")
# The initramfs image a regeneration replaced is kept beside the new one, as
# IMAGE.kmodtrim-prev, until the new one has booted (regen/).
PREVIOUS_SUFFIX = ".kmodtrim-prev"
# kmodtrim's own modprobe.d file: an install line per trimmed module (ondemand.py)
ON_DEMAND_CONF = "/etc/modprobe.d/kmodtrim-on-demand.conf"


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


def installed_kernels(root: Path) -> list[str]:
    """Kernel versions with a module tree under ``root``, oldest first (version order)."""
    found: set[str] = set()
    for base in MODULE_DIR_BASES:
        with contextlib.suppress(OSError):
            for entry in os.scandir(root / base):
                if entry.is_dir() and not entry.name.startswith("."):
                    found.add(entry.name)
    return sorted(found, key=_version_key)


def _version_key(kver: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in re.split(r"[.\-+~_]", kver)]


def default_kernel(root: Path) -> str:
    """The running kernel for the live root if installed, else the newest installed one.

    Raises KernelNotFoundError when no kernel is installed under ``root``.
    """
    kernels = installed_kernels(root)
    if is_live_root(root):
        running = os.uname().release
        if running in kernels:
            return running
    if not kernels:
        raise KernelNotFoundError(f"no kernel module trees under {root}/lib/modules")
    return kernels[-1]


def kept_previous_images(root: Path) -> list[Path]:
    """Every ``*.kmodtrim-prev`` image under ROOT/boot, ROOT/efi and ROOT/boot/efi (Boot
    Loader Specification entries included: up to three directories deep)."""
    found: set[Path] = set()
    for top in ("boot", "efi", "boot/efi"):
        base = root / top
        for depth in ("", "*/", "*/*/", "*/*/*/"):
            found.update(p for p in base.glob(f"{depth}*{PREVIOUS_SUFFIX}")
                         if p.is_file() and not p.is_symlink())
    return sorted(found)
