"""The code base stays clean under the project's ruff and mypy --strict configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_ruff_reports_no_problems() -> None:
    proc = _run_tool("ruff", "check", "--no-cache", ".")
    if proc.returncode != 0:
        pytest.fail(f"ruff check failed:\n{proc.stdout}{proc.stderr}", pytrace=False)


def test_mypy_strict_reports_no_errors() -> None:
    # Files and strictness come from [tool.mypy] in pyproject.toml.
    proc = _run_tool("mypy")
    if proc.returncode != 0:
        pytest.fail(f"mypy --strict failed:\n{proc.stdout}{proc.stderr}", pytrace=False)
