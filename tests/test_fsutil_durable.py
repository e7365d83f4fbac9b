"""fsutil.make_durable: a restore flushes what it put back (the files and every directory
leading to them), not the whole machine's pending writes; many files are one sync().

The flushes are real fsync(2) calls on real files; the test watches which descriptors
they were made on (by inode) and that os.sync() is not called for a few files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmodtrim import fsutil


@pytest.fixture
def flushed(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[tuple[int, int]]]:
    calls: dict[str, list[tuple[int, int]]] = {"fsync": [], "sync": []}
    real_fsync, real_sync = os.fsync, os.sync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        calls["fsync"].append((st.st_dev, st.st_ino))
        real_fsync(fd)

    def sync() -> None:
        calls["sync"].append((0, 0))
        real_sync()

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "sync", sync)
    return calls


def _inode(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def test_a_few_files_are_flushed_with_their_directories(
        tmp_path: Path, flushed: dict[str, list[tuple[int, int]]]) -> None:
    root = tmp_path / "root"
    fsutil.write_file(root, "/lib/modules/6.1/kernel/a.ko", b"a", durable=False)
    fsutil.write_file(root, "/lib/modules/6.1/kernel/b.ko", b"b", durable=False)
    fsutil.write_link(root, "/lib/modules/6.1/kernel/c.ko", "a.ko")
    flushed["fsync"].clear()
    fsutil.make_durable(root, ["/lib/modules/6.1/kernel/a.ko", "/lib/modules/6.1/kernel/b.ko",
                               "/lib/modules/6.1/kernel/c.ko", "/lib/modules/6.1/gone.ko",
                               "/lib/nowhere/x.ko"])
    assert flushed["sync"] == []
    kernel = root / "lib/modules/6.1/kernel"
    expected = {_inode(kernel / "a.ko"), _inode(kernel / "b.ko"), _inode(kernel),
                _inode(kernel.parent), _inode(root / "lib/modules"), _inode(root / "lib"),
                _inode(root)}
    assert set(flushed["fsync"]) == expected
    assert _inode(kernel / "c.ko") not in flushed["fsync"]  # a link: its directory entry
    assert len(flushed["fsync"]) == len(expected)  # each directory once


def test_through_a_usrmerge_link(tmp_path: Path,
                                 flushed: dict[str, list[tuple[int, int]]]) -> None:
    root = tmp_path / "root"
    (root / "usr/lib/modules/6.12").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    fsutil.write_file(root, "/lib/modules/6.12/x.ko.xz", b"x", durable=False)
    flushed["fsync"].clear()
    fsutil.make_durable(root, ["/lib/modules/6.12/x.ko.xz"])
    assert _inode(root / "usr/lib/modules/6.12/x.ko.xz") in flushed["fsync"]
    assert _inode(root / "usr/lib/modules/6.12") in flushed["fsync"]
    assert flushed["sync"] == []


def test_many_files_are_one_sync(tmp_path: Path,
                                 flushed: dict[str, list[tuple[int, int]]]) -> None:
    root = tmp_path / "root"
    paths = [f"/lib/m/{i}.ko" for i in range(fsutil.SYNC_EACH_MAX + 1)]
    for path in paths:
        fsutil.write_file(root, path, b"m", durable=False)
    flushed["fsync"].clear()
    fsutil.make_durable(root, paths)
    assert len(flushed["sync"]) == 1
    assert flushed["fsync"] == []


def test_an_unsafe_path_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(fsutil.UnsafePathError):
        fsutil.make_durable(root, ["/lib/../../etc/passwd"])
