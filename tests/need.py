"""The one way a test says what it needs from the machine.

``need`` skips the calling test when a tool is missing (or it does not run as root). Under
``CI=true`` a skip fails (conftest.py): every tool named here is installed by
scripts/setup, so a skip on CI is a missing install step, never a silent pass."""

from __future__ import annotations

import os
import shutil

import pytest


def need(*tools: str, root: bool = False, path: str | None = None) -> None:
    """Skip unless every one of ``tools`` is on ``path`` (default: this PATH) and, with
    ``root``, the test runs as root."""
    missing = [t for t in tools if shutil.which(t, path=path) is None]
    if root and os.geteuid() != 0:
        missing.insert(0, "root")
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (bash scripts/setup installs the tools)")
