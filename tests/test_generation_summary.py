"""``history`` reads each generation's summary file instead of its whole manifest, but only
a summary written for exactly the manifest there is (its size and CRC-32): otherwise, and for
manifests written before summaries existed, the manifest itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kmodtrim import usecases
from kmodtrim.errors import StoreError
from kmodtrim.records import Generation, StashedFile
from kmodtrim.state.history import generation_summary
from kmodtrim.store import generations_dir, make_dirs, write_generation


def _generation(number: int, files: int) -> Generation:
    removed = tuple(StashedFile(path=f"/lib/modules/6.1.0-1-amd64/kernel/m{i}.ko",
                                size=1000 + i, sha256=f"{i:064x}", mode=0o644, uid=0, gid=0,
                                mtime_ns=1, module=f"m{i}", kernel="6.1.0-1-amd64")
                    for i in range(files))
    return Generation(number, f"2026-12-0{number}T10:00:00+0000", "apply",
                      f"trim {files} modules", removed=removed,
                      stashed=tuple(f.path for f in removed))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    make_dirs(generations_dir(root))
    write_generation(root, _generation(1, 5))
    write_generation(root, _generation(2, 3))
    return root


EXPECTED = [
    {"generation": 0, "created": "", "action": "untrimmed",
     "description": "the tree as installed", "removed_files": 0, "removed_bytes": 0,
     "current": False},
    {"generation": 1, "created": "2026-12-01T10:00:00+0000", "action": "apply",
     "description": "trim 5 modules", "removed_files": 5, "removed_bytes": 5010,
     "current": False},
    {"generation": 2, "created": "2026-12-02T10:00:00+0000", "action": "apply",
     "description": "trim 3 modules", "removed_files": 3, "removed_bytes": 3003,
     "current": True},
]


def _no_manifest_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(doc: object) -> Generation:
        raise AssertionError("a manifest was parsed")

    monkeypatch.setattr(Generation, "from_json", staticmethod(refuse))


def test_history_comes_from_the_summaries(root: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert sorted(p.name for p in generations_dir(root).iterdir()) == [
        "1.json", "1.summary.json", "2.json", "2.summary.json"]
    _no_manifest_parse(monkeypatch)
    assert usecases.history(root)["generations"] == EXPECTED


def test_a_manifest_without_a_summary_is_read(root: Path) -> None:
    (generations_dir(root) / "1.summary.json").unlink()  # written by an older kmodtrim
    assert usecases.history(root)["generations"] == EXPECTED


@pytest.mark.parametrize("change", ["stale", "wrong type", "not json"])
def test_a_summary_not_matching_its_manifest_is_not_used(root: Path, change: str) -> None:
    summary = generations_dir(root) / "2.summary.json"
    doc = json.loads(summary.read_text())
    if change == "stale":  # the manifest was replaced after the summary was written
        manifest = generations_dir(root) / "2.json"
        manifest.write_text(manifest.read_text().replace("trim 3 modules", "trim three"))
        expected = [*EXPECTED[:2], {**EXPECTED[2], "description": "trim three"}]
    else:
        expected = EXPECTED
        doc["removed_bytes"] = "3003"
        doc["description"] = "not what the manifest says"
        summary.write_text("{" if change == "not json" else json.dumps(doc))
    os.chmod(summary, 0o644)
    assert usecases.history(root)["generations"] == expected


def test_a_damaged_manifest_is_still_an_error(root: Path) -> None:
    (generations_dir(root) / "2.json").write_text("{")
    with pytest.raises(StoreError, match=r"2\.json"):
        usecases.history(root)


def test_the_summary_names_each_kernels_trimmed_modules(root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """What kmodtrimd reads instead of the manifest: per kernel the modules out of the
    tree (self-healing's first check), module files and bytes (its metrics)."""
    _no_manifest_parse(monkeypatch)
    summary = generation_summary(root, 1)
    assert summary["kernels"] == {"6.1.0-1-amd64": {
        "modules": ["m0", "m1", "m2", "m3", "m4"], "module_files": 5, "bytes": 5010}}
    assert generation_summary(root, 0)["kernels"] == {}
