"""The policy under a real pydantic 1.10 (what Debian 12 and Ubuntu 24.04 ship): the same
files are accepted with the same settings, and every malformed file gets the same one-line
errors, as under the pydantic 2 of this test run. tests/policy_cases.py runs in both
interpreters; the 1.10 one is the virtualenv scripts/setup makes (.cache/venv-pydantic1,
pydantic 1.10.4 as in Debian 12), with kmodtrim taken from this tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PYDANTIC1 = REPO / ".cache" / "venv-pydantic1" / "bin" / "python"
CASES = Path(__file__).resolve().parent / "policy_cases.py"


def run_cases(python: Path | str) -> dict[str, Any]:
    proc = subprocess.run(
        [str(python), str(CASES), "--shipped", str(REPO / "config" / "policy.toml")],
        capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "daemon"),
             "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_policies_validate_the_same_under_pydantic_1_10_and_2() -> None:
    if not PYDANTIC1.exists():
        pytest.skip("needs .cache/venv-pydantic1 with pydantic<2 (scripts/setup makes it)")
    two, one = run_cases(sys.executable), run_cases(PYDANTIC1)
    assert two["pydantic"].startswith("2.") and one["pydantic"] == "1.10.4", (
        two["pydantic"], one["pydantic"])
    assert one["frozen"] and two["frozen"]
    assert set(one["results"]) == set(two["results"])
    for name, result in two["results"].items():
        assert one["results"][name] == result, name
    # The malformed cases really were refused, each error one line naming file and line.
    errors = {name: r["error"] for name, r in two["results"].items() if "error" in r}
    assert len(errors) == len(two["results"]) - 4  # all but empty, every key, drop-ins, shipped
    for name, message in errors.items():
        for line in message.splitlines():
            assert line.startswith("ROOT/etc/kmodtrim/policy"), (name, line)
            assert line.split(":")[1].isdigit(), (name, line)
