"""tests/conftest.py's rule, run by pytest itself on a throwaway test: under ``CI=true`` a
skip fails (a skip for a missing tool hides a missing install step in scripts/setup);
elsewhere it stays a skip."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parent / "conftest.py"
SKIPPING = "import pytest\n\ndef test_needs_a_tool():\n    pytest.skip('needs frob')\n"


@pytest.mark.parametrize(("ci", "outcome"), [("true", "failed"), ("", "skipped")])
def test_a_skip_fails_only_under_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
                                    ci: str, outcome: str) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(SKIPPING)
    monkeypatch.setenv("CI", ci)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(**{outcome: 1})
    if outcome == "failed":
        result.stdout.fnmatch_lines(["*skipped under CI=true (*needs frob)*scripts/setup*"])
