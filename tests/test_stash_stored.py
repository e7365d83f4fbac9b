"""Already-compressed modules go into the stash as they are (no second compression), and
stashes written before that (every blob zstd-compressed) still restore."""

from __future__ import annotations

import hashlib
import lzma
import os
import time
from pathlib import Path

import zstandard

from kmodtrim.records import StashedFile
from kmodtrim.state.packfile import PackWriter
from kmodtrim.state.stash import Stash
from kmodtrim.takeout import PutRequest

KDIR = "/usr/lib/modules/6.12.0-test/kernel/drivers"


def _xz_module(root: Path, name: str) -> str:
    path = f"{KDIR}/{name}.ko.xz"
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(lzma.compress(os.urandom(40_000) + b"\0" * 200_000,
                                     check=lzma.CHECK_CRC32))
    return path


def test_a_ko_xz_is_stashed_as_it_is_and_restored_byte_identical(tmp_path: Path) -> None:
    paths = [_xz_module(tmp_path, f"m{i}") for i in range(5)]
    before = {p: (tmp_path / p.lstrip("/")).read_bytes() for p in paths}
    stash = Stash(tmp_path)
    started = time.process_time()
    entries = stash.put_many([PutRequest(p) for p in paths], generation=1)
    print(f"stashed 5 .ko.xz in {time.process_time() - started:.3f} s CPU")
    [pack] = stash.pack_files()
    stored = sum(len(b) for b in before.values())
    # The bytes as they are, plus a 13-byte frame header and 3 bytes per 128 KiB block;
    # the rest of the pack is its records, manifest and index.
    assert stored < pack.stat().st_size < stored + 4096
    for entry in entries:
        (tmp_path / entry.path.lstrip("/")).unlink()
        stash.restore(entry)
        assert (tmp_path / entry.path.lstrip("/")).read_bytes() == before[entry.path]


def test_a_pack_written_before_stored_frames_still_restores(tmp_path: Path) -> None:
    path = _xz_module(tmp_path, "old")
    data = (tmp_path / path.lstrip("/")).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    packs = tmp_path / "var/lib/kmodtrim/stash/packs"
    with PackWriter(packs, durable=True) as writer:  # as the earlier kmodtrim wrote it
        writer.add(sha, zstandard.ZstdCompressor(level=1).compress(data))
        writer.finish(1, None)
    (tmp_path / path.lstrip("/")).unlink()
    entry = StashedFile(path=path, size=len(data), sha256=sha, mode=0o644, uid=0, gid=0,
                        mtime_ns=0)
    Stash(tmp_path).restore(entry)
    assert (tmp_path / path.lstrip("/")).read_bytes() == data
