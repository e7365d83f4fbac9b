"""Shared fixtures: real Debian kernels (tests/kernels.py) and gcc-built modules (modbuild).

Under ``CI=true`` a skipped test fails: a skip for a missing tool hides a missing install
step in ``scripts/setup``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernels import *  # noqa: F403  (session fixtures: cloud_kernel, generic_kernel)

TIERS = ("unit", "integration", "system")
UNIT_DIR = Path(__file__).resolve().parent / "unit"
SYSTEM_FILES = frozenset({"test_vm.py"})


def tier_of(item: pytest.Item) -> str:
    """``unit`` under tests/unit/ (in memory), ``system`` for the VM and every test on a
    real kernel (marker ``kernel``), else ``integration`` (real tools on scratch roots)."""
    path = Path(item.path).resolve()
    if UNIT_DIR in path.parents:
        return "unit"
    if path.name in SYSTEM_FILES or item.get_closest_marker("kernel") is not None:
        return "system"
    return "integration"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(tier_of(item))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else ""
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true ({reason or 'no reason given'}): install what "
                       "it needs in scripts/setup instead")
