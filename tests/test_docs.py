"""Man pages and completion are generated from the parsers (argparse-manpage, shtab) and
the default policy, and they say what the programs do."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kmodtrim.cli.parser import VERBS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    proc = subprocess.run([sys.executable, "-m", "kmodtrim.cli.docs", str(out), "--policy",
                           str(REPO / "config/policy.toml")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return out


def _render(page: Path) -> str:
    groff = shutil.which("groff")
    assert groff is not None, "groff is needed (scripts/setup installs groff-base)"
    proc = subprocess.run([groff, "-k", "-man", "-Tutf8", "-ww", str(page)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    return re.sub(".\x08", "", proc.stdout)  # no overstrike: plain text


def test_kmodtrim_man_page_lists_every_verb_and_global_option(docs: Path) -> None:
    text = _render(docs / "kmodtrim.8")
    assert "KMODTRIM(8)" in text
    for verb in VERBS:
        assert f"kmodtrim {verb.name}" in text, verb.name
    for option in ("--root", "--kernel", "--observed", "--policy", "--json", "--offline"):
        assert option in text


def test_daemon_and_policy_pages_render(docs: Path) -> None:
    assert "KMODTRIMD(8)" in _render(docs / "kmodtrimd.8")
    policy = _render(docs / "kmodtrim-policy.5")
    assert "KMODTRIM-POLICY(5)" in policy
    for setting in ("mode", "presets", "min_observation", "initramfs", "backend"):
        assert setting in policy


def test_bash_completion_offers_the_verbs(docs: Path) -> None:
    script = (f"source {docs / 'kmodtrim.bash'}; COMP_WORDS=(kmodtrim ro); COMP_CWORD=1; "
              "_shtab_kmodtrim; printf '%s\\n' \"${COMPREPLY[@]}\"")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "rollback" in proc.stdout.split()


def test_zsh_completion_names_the_command(docs: Path) -> None:
    assert (docs / "_kmodtrim").read_text().startswith("#compdef kmodtrim")
