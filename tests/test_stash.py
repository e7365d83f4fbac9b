"""The stash's packs: one file per operation, read back byte-identical, robust to damage,
crashes and a full disk, and garbage-collected without losing a referenced blob."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kmodtrim.errors import StashError
from kmodtrim.state.stash import Stash
from kmodtrim.store import StashedFile
from kmodtrim.takeout import PutRequest
from pkgbuild import small_tmpfs


def _tree(root: Path, count: int = 12) -> list[str]:
    """``count`` files of varied, partly repeated content under ROOT/lib/modules/K."""
    base = root / "lib/modules/K/kernel"
    base.mkdir(parents=True)
    paths = []
    for i in range(count):
        path = base / f"m{i}.ko"
        path.write_bytes(os.urandom(3000 + 977 * i) + b"\0" * 20000)
        path.chmod(0o600 if i % 3 == 0 else 0o644)
        paths.append(f"/lib/modules/K/kernel/m{i}.ko")
    (base / "same-as-m1.ko").write_bytes((base / "m1.ko").read_bytes())
    paths.append("/lib/modules/K/kernel/same-as-m1.ko")
    (base / "link.ko").symlink_to("m2.ko")
    paths.append("/lib/modules/K/kernel/link.ko")
    return paths


def _packs(root: Path) -> list[Path]:
    return sorted((root / "var/lib/kmodtrim/stash/packs").glob("*.pack"))


def _originals(root: Path, paths: list[str]) -> dict[str, bytes]:
    return {p: (root / p.lstrip("/")).read_bytes() for p in paths
            if not (root / p.lstrip("/")).is_symlink()}


def _restore_all_elsewhere(stash: Stash, entries: list[StashedFile], dest: Path
                           ) -> dict[str, bytes]:
    out = {}
    for entry in entries:
        target = dest / entry.path.lstrip("/")
        stash.restore_to(entry, dest)
        if entry.link is None:
            out[entry.path] = target.read_bytes()
            assert target.stat().st_mode & 0o7777 == entry.mode
        else:
            assert os.readlink(target) == entry.link
    return out


def test_put_many_writes_one_pack_that_gives_every_file_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    paths = _tree(root)
    originals = _originals(root, paths)
    seen: list[int] = []
    stash = Stash(root)
    entries = stash.put_many([PutRequest(p, package="pkg") for p in paths], each=seen.append)

    assert [e.path for e in entries] == paths and seen == list(range(1, len(paths) + 1))
    assert all(e.package == "pkg" for e in entries)
    packs = _packs(root)
    assert len(packs) == 1
    assert not list((root / "var/lib/kmodtrim/stash").rglob(".*"))  # no temporary left
    # 12 distinct contents (the copy of m1 and the link add no blob), compressed.
    assert sum(1 for e in entries if e.link is None) == 13
    assert len({e.sha256 for e in entries if e.link is None}) == 12
    assert stash.size_on_disk() == packs[0].stat().st_size < sum(map(len, originals.values()))
    # A fresh instance (another process) reads the pack from its index.
    assert _restore_all_elsewhere(Stash(root), entries, tmp_path / "out") == originals


def test_files_already_stashed_are_not_stored_again(tmp_path: Path) -> None:
    root = tmp_path / "root"
    paths = _tree(root)
    stash = Stash(root)
    loose = stash.put(paths[0])  # a loose blob, as single files and older versions store
    first = stash.put_many([PutRequest(p) for p in paths[:6]])
    size = stash.size_on_disk()
    again = Stash(root).put_many([PutRequest(p) for p in paths[:6]])
    assert again == first and first[0] == loose
    # No blob is stored again: the second pack holds only its manifest.
    assert len(_packs(root)) == 2 and stash.size_on_disk() - size < 2048
    assert Stash(root).read(loose) == (root / paths[0].lstrip("/")).read_bytes()


def _damage(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_a_pack_with_a_damaged_index_is_read_by_walking_its_records(tmp_path: Path) -> None:
    root = tmp_path / "root"
    paths = _tree(root)
    originals = _originals(root, paths)
    entries = Stash(root).put_many([PutRequest(p) for p in paths])
    pack = _packs(root)[0]
    _damage(pack, pack.stat().st_size - 200, b"\xff" * 100)  # inside the index
    assert _restore_all_elsewhere(Stash(root), entries, tmp_path / "a") == originals
    _damage(pack, pack.stat().st_size - 8, b"garbage!")  # the end marker
    assert _restore_all_elsewhere(Stash(root), entries, tmp_path / "b") == originals


def test_a_damaged_blob_is_a_clear_error_never_wrong_bytes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    paths = _tree(root, count=3)
    entries = Stash(root).put_many([PutRequest(p) for p in paths])
    pack = _packs(root)[0]
    _damage(pack, 8 + 40 + 60, b"\x00\x01\x02\x03")  # inside the first frame
    with pytest.raises(StashError, match=entries[0].path):
        Stash(root).read(entries[0])
    assert Stash(root).read(entries[1]) == (root / paths[1].lstrip("/")).read_bytes()
    target = root / paths[0].lstrip("/")
    before = target.read_bytes()
    with pytest.raises(StashError):
        Stash(root).restore(entries[0])
    assert target.read_bytes() == before  # the file in place is left as it was


def test_garbage_collection_keeps_every_referenced_blob(tmp_path: Path) -> None:
    root = tmp_path / "root"
    paths = _tree(root)
    originals = _originals(root, paths)
    stash = Stash(root)
    first = stash.put_many([PutRequest(p) for p in paths[:6]])
    second = stash.put_many([PutRequest(p) for p in paths[6:12]])
    assert len(_packs(root)) == 2
    referenced = {e.sha256 for e in second}

    # A little garbage: the pack stays as it is.
    keep_most = referenced - {second[0].sha256}
    by_size = {p.stat().st_size for p in _packs(root)}
    assert stash.collect_garbage(keep_most | {e.sha256 for e in first}) == 0
    assert {p.stat().st_size for p in _packs(root)} == by_size

    # Nothing referenced: the first pack goes whole.
    assert stash.collect_garbage(referenced) == 6
    assert len(_packs(root)) == 1
    assert _restore_all_elsewhere(Stash(root), second, tmp_path / "a") == {
        p: b for p, b in originals.items() if p in {e.path for e in second}}

    # Mostly garbage: rewritten with what is still referenced, which still reads back.
    survivor = second[-3]
    size = stash.size_on_disk()
    stash.collect_garbage({survivor.sha256})
    assert len(_packs(root)) == 1 and stash.size_on_disk() < size / 3
    assert Stash(root).read(survivor) == originals[survivor.path]
    with pytest.raises(StashError, match="missing"):
        Stash(root).read(second[0])

    stash.collect_garbage(set())
    assert _packs(root) == [] and stash.size_on_disk() == 0


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from kmodtrim.takeout import PutRequest
from kmodtrim.state.stash import Stash
root = Path(sys.argv[1])
paths = sys.argv[2:]
def each(i):
    if i == 5:
        os.kill(os.getpid(), signal.SIGKILL)
Stash(root).put_many([PutRequest(p) for p in paths], each=each)
"""


def test_a_writer_killed_mid_pack_leaves_no_pack_and_its_leftover_is_collected(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    paths = _tree(root)
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(root), *paths],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    packs_dir = root / "var/lib/kmodtrim/stash/packs"
    leftovers = list(packs_dir.glob(".*"))
    assert len(leftovers) == 1 and _packs(root) == []
    assert Stash(root).size_on_disk() == 0  # a partial pack holds nothing
    Stash(root).collect_garbage(set())
    assert list(packs_dir.iterdir()) == []


def test_a_full_disk_is_a_clean_error_with_no_partial_pack(tmp_path: Path) -> None:
    root = tmp_path / "root"
    paths = _tree(root)
    with small_tmpfs(root / "var/lib/kmodtrim", "40k") as state:
        with pytest.raises(StashError, match="cannot write the stash: No space") as raised:
            Stash(root).put_many([PutRequest(p) for p in paths])
        assert "free space under /var/lib/kmodtrim" in str(raised.value.hint)
        assert [p.name for p in (state / "stash/packs").iterdir()] == []
        assert _originals(root, paths)  # the tree is untouched
