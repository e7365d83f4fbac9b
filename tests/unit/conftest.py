"""The unit tier's promise: no subprocess runs in it (tests/conftest.py marks the tiers)."""

from __future__ import annotations

import subprocess
from typing import NoReturn

import pytest


class _NoSubprocess:
    def __init__(self, *args: object, **kwargs: object) -> None:
        _refuse(args[0] if args else kwargs.get("args"))


def _refuse(argv: object) -> NoReturn:
    raise AssertionError(f"the unit tier runs no subprocess (tried {argv!r}); "
                         "a test that needs one belongs outside tests/unit/")


@pytest.fixture(autouse=True)
def _no_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "Popen", _NoSubprocess)
