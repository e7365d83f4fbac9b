"""Every verb's --json document matches its one description (documents.py)."""

from __future__ import annotations

import json
from pathlib import Path

from kmodtrim.documents import DOCUMENTS, problems
from test_executor import KVER, _cli, make_observed, make_root


def _doc(root: Path, *args: str) -> object:
    proc = _cli(root, *args, "--json")
    assert proc.returncode == 0, (args, proc.stderr)
    return json.loads(proc.stdout)


def test_every_verb_answers_with_the_document_it_describes(tmp_path: Path) -> None:
    root, observed = make_root(tmp_path), make_observed(tmp_path)
    skip = ("--initramfs", "skip", "--yes")
    found = {
        "plan": _doc(root, "plan", "--observed", str(observed)),
        "apply": _doc(root, "apply", "--observed", str(observed), *skip),
        "status": _doc(root, "status"),
        "history": _doc(root, "history"),
        "show": _doc(root, "show", "1"),
        "explain": _doc(root, "explain", "unused_e"),
        "observe": _doc(root, "observe"),
        "index": _doc(root, "index"),
        "restore": _doc(root, "restore", "unused_e", *skip),
        "rollback": _doc(root, "rollback", "0", *skip),
        "kernel-event": _doc(root, "kernel-event", "add", KVER, "--initramfs", "skip"),
    }
    assert set(found) == set(DOCUMENTS)
    for verb, doc in found.items():
        assert problems(verb, doc) == [], doc
    assert found["apply"]["generation"] == 1  # type: ignore[index]
    assert found["show"]["taken_out"]  # type: ignore[index]


def test_a_document_that_strays_from_its_description_is_caught() -> None:
    assert problems("history", {"schema": 1, "generations": [], "number": 2}) == [
        "history: undescribed key 'number'"]
    assert problems("history", {"generations": []}) == [
        "history: schema is None, not 1", "history: missing key 'schema'"]
