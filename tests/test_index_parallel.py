"""Compressed modules read on several threads give exactly what one thread reads, in file
order, errors included; a decompression bomb read on a thread still stops at the cap."""

from __future__ import annotations

import gzip
import lzma
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kernels import KernelTree
from kmodtrim import elf
from kmodtrim.elf import ModuleInfo
from kmodtrim.errors import ModuleParseError
from kmodtrim.index import build_index, parallel
from kmodtrim.index.discover import _walk_modules
from kmodtrim.index.parallel import read_modules
from modbuild import ModSpec, build_module, compress_bytes, module_bytes

SPECS = (
    ModSpec("core", exports=("core_fn",), license="GPL v2", firmware=("core/fw.bin",)),
    ModSpec("virtio-thing", imports=("core_fn", "printk"), depends=("core",),
            aliases=("pci:v00001AF4d00001000sv*sd*bc*sc*i*",)),
    ModSpec("helper", softdeps=("pre: core",), weakdeps=("core",)),
)


def comparable(results: list[ModuleInfo | ModuleParseError]) -> list[object]:
    return [str(r) if isinstance(r, ModuleParseError) else r for r in results]


@pytest.fixture
def mixed_tree(tmp_path: Path) -> tuple[Path, list[str]]:
    """Well-formed modules in every compression and none, beside a corrupt stream, a
    non-ELF stream and a bomb, enough of them to be read on threads."""
    moddir = tmp_path / "modules"
    for n in range(8):
        for compress in ("xz", "gzip", "zstd", None):
            for spec in SPECS:
                build_module(spec, moddir / f"d{n}" / (compress or "plain"), compress=compress)
    bad = moddir / "bad"
    bad.mkdir()
    good_xz = compress_bytes(module_bytes(SPECS[0], tmp_path), "xz")
    (bad / "truncated.ko.xz").write_bytes(good_xz[: len(good_xz) // 2])
    (bad / "text.ko.gz").write_bytes(gzip.compress(b"not a module\n" * 50))
    (bad / "bomb.ko.xz").write_bytes(lzma.compress(bytes(3 << 20), check=lzma.CHECK_CRC32))
    relpaths = [relpath for relpath, _ in _walk_modules(moddir)]
    assert sum(1 for r in relpaths if not r.endswith(".ko")) >= 3 * parallel._MIN_PARALLEL_FILES
    return moddir, relpaths


def test_threads_read_what_one_thread_reads(mixed_tree: tuple[Path, list[str]],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    moddir, relpaths = mixed_tree
    monkeypatch.setattr(elf, "MAX_MODULE_BYTES", 1 << 20)  # the bomb is 3 MiB of zeros
    serial = comparable(list(read_modules(moddir, relpaths, workers=1)))
    assert len(serial) == len(relpaths)
    for workers in (2, 3, 8):
        assert comparable(list(read_modules(moddir, relpaths, workers=workers))) == serial
    errors = {r.split(":")[0].rsplit("/", 1)[-1]: r for r in serial if isinstance(r, str)}
    assert set(errors) == {"truncated.ko.xz", "text.ko.gz", "bomb.ko.xz"}
    assert "decompresses to more than the 1 MiB limit" in errors["bomb.ko.xz"]
    assert "not an ELF file" in errors["text.ko.gz"]


def test_threads_run_only_for_enough_compressed_files(
    mixed_tree: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    moddir, relpaths = mixed_tree
    started: list[int] = []

    class CountingPool(ThreadPoolExecutor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            started.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(parallel, "ThreadPoolExecutor", CountingPool)
    few = [r for r in relpaths if r.endswith(".ko")] + \
        [r for r in relpaths if r.endswith(".ko.xz")][: parallel._MIN_PARALLEL_FILES - 1]
    assert len(list(read_modules(moddir, few, workers=4))) == len(few)
    assert not started
    assert len(list(read_modules(moddir, relpaths, workers=4))) == len(relpaths)
    assert started == [1]


def test_an_abandoned_read_ends_its_threads(
    mixed_tree: tuple[Path, list[str]]
) -> None:
    moddir, relpaths = mixed_tree
    reads = read_modules(moddir, relpaths, workers=2)
    first = next(reads)
    reads.close()  # waits for the reads already submitted, starts no more
    assert comparable([first]) == comparable([next(read_modules(moddir, relpaths,
                                                                 workers=1))])


@pytest.mark.kernel
def test_threads_read_a_real_xz_tree_as_one_thread_does(
    trixie_cloud_kernel: KernelTree, tmp_path: Path
) -> None:
    tree = trixie_cloud_kernel
    relpaths = [relpath for relpath, _ in _walk_modules(tree.moddir)]
    assert all(r.endswith(".ko.xz") for r in relpaths) and len(relpaths) > 1000
    serial = list(read_modules(tree.moddir, relpaths, workers=1))
    assert list(read_modules(tree.moddir, relpaths, workers=2)) == serial
    assert not any(isinstance(r, ModuleParseError) for r in serial)
    # The index built on threads holds those very infos.
    index, stats = build_index(tree.root, tree.kver, use_cache=False, symvers=tree.symvers)
    assert stats.parsed == len(relpaths)
    by_relpath = dict(zip(relpaths, serial, strict=True))
    assert all(entry.info == by_relpath[entry.relpath] for entry in index.modules.values())

