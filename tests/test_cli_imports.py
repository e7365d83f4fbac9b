"""The quick verbs stay quick: ``kmodtrim --version``, ``status`` and ``history`` import
neither pydantic (the policy) nor the index, the planner, the observers, the engine or
the D-Bus client — each verb imports what it uses (issue 10). Checked on what the process
really imported, not on timings: a whole-process run reports its ``sys.modules`` at exit.

``plan`` is run the same way to show the probe sees those imports when a verb needs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modbuild import ModSpec, build_tree

KVER = "6.1.0-test"
SPECS = (
    ModSpec("core", exports=("core_fn",)),
    ModSpec("user", imports=("core_fn",), depends=("core",)),
    ModSpec("unused"),
)

# Run kmodtrim as ``python -m kmodtrim.cli`` does, and write the names of the modules the
# process imported to the file named by the environment when it exits.
PROBE = """
import atexit, os, runpy, sys

def report():
    with open(os.environ["KMODTRIM_MODULES_OUT"], "w") as f:
        f.write("\\n".join(sorted(sys.modules)))

atexit.register(report)
sys.argv = ["kmodtrim", *sys.argv[1:]]
runpy.run_module("kmodtrim.cli", run_name="__main__", alter_sys=True)
"""

HEAVY = ("pydantic", "pydantic_core", "kmodtrim.policy", "kmodtrim.presets",
         "kmodtrim.index", "kmodtrim.elf", "kmodtrim.planner", "kmodtrim.closure",
         "kmodtrim.observe", "kmodtrim.operations", "kmodtrim.executor", "kmodtrim.engine",
         "kmodtrim.backends", "kmodtrim.regen", "kmodtrim.dbus", "dbus_next",
         "kmodtrim.cli.change")


def imported(tmp_path: Path, *args: str) -> set[str]:
    """The modules a whole ``kmodtrim ARGS`` process imported (it must succeed)."""
    out = tmp_path / "modules.json"
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True,
                          text=True, check=False, stdin=subprocess.DEVNULL,
                          env={**os.environ, "KMODTRIM_MODULES_OUT": str(out)})
    assert proc.returncode == 0, proc.stderr
    return set(out.read_text().split("\n"))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules
                  if any(m == h or m.startswith(h + ".") for h in HEAVY))


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with a module tree, a policy file and one trim in its history."""
    root = tmp_path_factory.mktemp("imports") / "root"
    build_tree(root, KVER, SPECS)
    policy = root / "etc/kmodtrim/policy.toml"
    policy.parent.mkdir(parents=True)
    policy.write_text('presets = []\nclouds = []\nrules = ["user"]\n')
    proc = subprocess.run([sys.executable, "-m", "kmodtrim.cli", "apply", "--yes",
                           "--force", "--initramfs", "skip", "--offline", "--root", str(root)],
                          capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return root


def test_version_imports_nothing_of_the_state_either(tmp_path: Path) -> None:
    modules = imported(tmp_path, "--version")
    assert heavy(modules) == []
    assert not {"kmodtrim.usecases", "kmodtrim.salvage", "kmodtrim.records", "kmodtrim.store",
                "kmodtrim.state", "logging", "json"} & modules


# (``status --verify`` is not one of them: it reads every stash copy and asks the package
# archive about the files that come back from it.)
@pytest.mark.parametrize("args", [("status",), ("status", "--json"), ("history",),
                                  ("history", "--json")], ids=" ".join)
def test_status_and_history_import_no_policy_index_planner_or_engine(
        trimmed: Path, tmp_path: Path, args: tuple[str, ...]) -> None:
    modules = imported(tmp_path, *args, "--root", str(trimmed), "--offline")
    assert "kmodtrim.usecases" in modules  # the verb really ran
    assert heavy(modules) == []
    # Whole records are read at a glance: not the manifest, its model or the stash's
    # reader (state/glance.py).
    assert not {"kmodtrim.records", "kmodtrim.salvage", "kmodtrim.state.stash",
                "kmodtrim.store", "dataclasses", "hashlib"} & modules


def test_status_reads_the_policy_files_mode_without_the_policy_package(
        trimmed: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "kmodtrim.cli", "status", "--json",
                          "--root", str(trimmed)], capture_output=True, text=True,
                         check=True, stdin=subprocess.DEVNULL).stdout
    assert json.loads(out)["generation"] == 1
    assert "tomllib" in imported(tmp_path, "status", "--root", str(trimmed))


def test_plan_imports_what_planning_needs(trimmed: Path, tmp_path: Path) -> None:
    # The policy was validated (and cached) by the apply: a warm plan needs no pydantic.
    modules = imported(tmp_path, "plan", "--json", "--root", str(trimmed), "--offline")
    assert {"kmodtrim.policy", "kmodtrim.planner", "kmodtrim.index"} <= modules
    assert not {"pydantic", "kmodtrim.policy.model", "kmodtrim.cli.change",
                "kmodtrim.executor", "kmodtrim.engine.transition",
                "kmodtrim.engine.operations", "kmodtrim.regen"} & modules
    # A policy file changed since: validated again, with pydantic.
    policy = trimmed / "etc/kmodtrim/policy.toml"
    policy.write_text(policy.read_text())
    modules = imported(tmp_path, "plan", "--json", "--root", str(trimmed), "--offline")
    assert {"pydantic", "kmodtrim.policy.model"} <= modules
    modules = imported(tmp_path, "plan", "--json", "--root", str(trimmed), "--offline")
    assert "pydantic" not in modules
