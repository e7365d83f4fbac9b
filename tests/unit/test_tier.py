"""The unit tier's own promises: its tests are marked ``unit`` and run no subprocess."""

from __future__ import annotations

import subprocess

import pytest


def test_tests_under_tests_unit_are_marked_unit(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("unit") is not None
    assert request.node.get_closest_marker("integration") is None


def test_a_subprocess_fails_the_test_that_starts_it() -> None:
    with pytest.raises(AssertionError, match="the unit tier runs no subprocess"):
        subprocess.run(["true"], check=False)
