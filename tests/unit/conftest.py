"""Test tiers, and the unit tier's promise: no subprocess runs in it.

Every test collected under tests/unit/ is marked ``unit``. The same hook marks the rest:
``system`` for the VM test and every test on a real kernel (marker ``kernel``),
``integration`` for everything else, unless a test already carries a tier marker.

pytest calls ``pytest_collection_modifyitems`` of every conftest it has loaded with *all*
collected items, so marking the other tiers from here works whenever tests/unit/ is part
of the run (``pytest``, ``pytest -m unit``, ``pytest -m "not system"`` from the repository).
A run restricted to other paths (``pytest tests/test_vm.py -m system``) does not load this
file; the tier markers belong in tests/conftest.py for that to work too.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

TIERS = ("unit", "integration", "system")
UNIT_DIR = Path(__file__).resolve().parent
SYSTEM_FILES = frozenset({"test_vm.py"})


def tier_of(item: pytest.Item) -> str:
    """``unit`` under tests/unit/, ``system`` for a VM or real-kernel test, else
    ``integration``."""
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


class _NoSubprocess:
    def __init__(self, *args: object, **kwargs: object) -> None:
        _refuse(args[0] if args else kwargs.get("args"))


def _refuse(argv: object) -> NoReturn:
    raise AssertionError(f"the unit tier runs no subprocess (tried {argv!r}); "
                         "a test that needs one belongs outside tests/unit/")


@pytest.fixture(autouse=True)
def _no_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "Popen", _NoSubprocess)
