"""depmod: every ``modules.*`` index of a kernel rebuilt in full after its module files
changed."""

from __future__ import annotations

from pathlib import Path

from ..errors import KernelNotFoundError
from ..run import run
from .layout import _MODULE_BASES, _is_live

_DEPMOD_TIMEOUT = 600.0


def run_depmod(root: Path, kernel: str) -> None:
    """Rebuild every ``modules.*`` index of ``kernel`` under ``root`` (``depmod -a``).

    Raises KernelNotFoundError if the root has no module directory for the kernel, and
    CommandError if depmod fails.
    """
    if not any((root / base / kernel).is_dir() for base in _MODULE_BASES):
        raise KernelNotFoundError(
            f"no module directory for kernel {kernel} under {root} "
            f"(looked in {', '.join(base + '/' + kernel for base in _MODULE_BASES)})",
            hint="check --kernel and --root",
        )
    argv: list[str | Path] = ["depmod", "-a"]
    if not _is_live(root):
        argv += ["-b", root]
    run([*argv, kernel], timeout=_DEPMOD_TIMEOUT)
