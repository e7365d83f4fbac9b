"""The index cache: a warm build is the cold build, whatever happened to the tree or the
cache file in between."""

from __future__ import annotations

import copy
import hashlib
import marshal
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernels import KernelTree
from kmodtrim import __version__
from kmodtrim.elf import ModuleInfo
from kmodtrim.index import ModuleIndex, StashedModule, build_index
from kmodtrim.index import cache as index_module
from modbuild import ModSpec, build_module, build_tree, write_symvers

KVER = "6.1.0-test"
SPECS = (
    ModSpec("core", exports=("core_fn", "core_other"), gpl_exports=("core_gpl",),
            license="GPL v2", firmware=("core/fw.bin",)),
    ModSpec("virtio-thing", imports=("core_fn", "printk"), weak_imports=("maybe_there",),
            depends=("core",), aliases=("pci:v00001AF4d00001000sv*sd*bc*sc*i*",)),
    ModSpec("helper", softdeps=("pre: core post: virtio-thing",), weakdeps=("core",)),
    ModSpec("unused", exports=("unused_fn",), intree=False, license="Proprietary"),
    ModSpec("unused_user", imports=("unused_fn", "core_gpl"), depends=("unused", "core")),
)
# A newer "helper" in updates/ shadows the one in kernel/.
UPDATED_HELPER = ModSpec("helper", exports=("helper_v2",), imports=("core_other",),
                         depends=("core",))


def snapshot(index: ModuleIndex) -> dict[str, Any]:
    """Everything an index says, as plain data (symbol lists included)."""
    return {
        "modules": [
            (name, e.name, e.relpath, e.size, e.shadowed, e.stashed,
             tuple(getattr(e.info, f) for f in index_module._ALL_FIELDS))
            for name, e in index.modules.items()
        ],
        "builtins": index.builtins,
        "builtin_aliases": index.builtin_aliases,
        "kernel_exports": index.kernel_exports,
        "kernel_exports_source": index.kernel_exports_source,
        "parse_errors": [str(e) for e in index.parse_errors],
        "providers": index.symbol_providers,
    }


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    moddir = build_tree(root, KVER, SPECS, builtin=("ext4",))
    build_module(UPDATED_HELPER, moddir / "updates", compress="xz")
    return root


@pytest.fixture
def symbol_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Rows whose symbol lists were decoded from a cache file."""
    rows: list[int] = []
    original = index_module._LoadedCache.symbol_lists

    def counting(self: index_module._LoadedCache, row: int) -> Any:
        rows.append(row)
        return original(self, row)

    monkeypatch.setattr(index_module._LoadedCache, "symbol_lists", counting)
    yield rows


def cache_file(root: Path) -> Path:
    return root / "var/cache/kmodtrim" / f"index-{KVER}.marshal"


def cold(root: Path, **kwargs: Any) -> ModuleIndex:
    index, stats = build_index(root, KVER, use_cache=False, **kwargs)
    assert stats.cached == 0
    return index


def test_warm_index_is_the_cold_index(tree: Path, symbol_reads: list[int]) -> None:
    expected = snapshot(cold(tree))
    first, stats = build_index(tree, KVER)
    assert (stats.parsed, stats.cached) == (6, 0)
    assert snapshot(first) == expected
    warm, stats = build_index(tree, KVER)
    assert (stats.files, stats.parsed, stats.cached) == (6, 0, 6)
    assert symbol_reads == []  # nothing needed a symbol list yet
    assert warm.modules["helper"].relpath == "updates/helper.ko.xz"
    assert warm.modules["helper"].shadowed == ("kernel/drivers/test/helper.ko",)
    assert snapshot(warm) == expected
    assert len(symbol_reads) == len(warm.modules)
    assert warm == cold(tree)


def test_cached_infos_behave_like_parsed_ones(tree: Path) -> None:
    parsed = cold(tree)
    build_index(tree, KVER)
    warm, _ = build_index(tree, KVER)
    for name, entry in warm.modules.items():
        info, other = entry.info, parsed.modules[name].info
        assert isinstance(info, ModuleInfo)
        assert info == other and other == info
        assert {info: 1}[other] == 1
        assert hash(info) == hash(other) and repr(info) == repr(other)
        for clone in (copy.copy(info), copy.deepcopy(info), pickle.loads(pickle.dumps(info))):
            assert type(clone) is ModuleInfo and clone == other
    assert warm.modules["core"].info != warm.modules["helper"].info
    with pytest.raises(AttributeError):
        warm.modules["core"].info.name = "other"  # type: ignore[misc]


def test_a_touched_file_is_reread(tree: Path) -> None:
    build_index(tree, KVER)
    target = tree / f"lib/modules/{KVER}/kernel/drivers/test/unused.ko"
    st = target.stat()
    target.write_bytes(target.read_bytes())  # same size and content, new mtime
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    index, stats = build_index(tree, KVER)
    assert stats.parsed == 1 and stats.cached == 5
    assert snapshot(index) == snapshot(cold(tree))


def test_a_replaced_module_is_reread_with_its_new_symbols(tree: Path, tmp_path: Path) -> None:
    build_index(tree, KVER)
    moddir = tree / f"lib/modules/{KVER}"
    changed = ModSpec("unused", exports=("unused_fn", "unused_new"), imports=("core_fn",),
                      aliases=("usb:v1234p*",))
    build_module(changed, tmp_path / "new")
    os.replace(tmp_path / "new/unused.ko", moddir / "kernel/drivers/test/unused.ko")
    index, stats = build_index(tree, KVER)
    assert stats.parsed == 1
    info = index.modules["unused"].info
    assert info.undefined == ("core_fn",) and "unused_new" in info.exports
    assert index.resolve("usb:v1234p0001") == ["unused"]
    assert snapshot(index) == snapshot(cold(tree))
    again, stats = build_index(tree, KVER)
    assert stats.parsed == 0 and snapshot(again) == snapshot(index)


def test_added_and_removed_files(tree: Path, tmp_path: Path) -> None:
    build_index(tree, KVER)
    moddir = tree / f"lib/modules/{KVER}"
    build_module(ModSpec("extra", imports=("core_fn",)), moddir / "kernel/drivers/other")
    index, stats = build_index(tree, KVER)
    assert stats.parsed == 1 and "extra" in index.modules
    assert snapshot(index) == snapshot(cold(tree))
    (moddir / "kernel/drivers/test/unused_user.ko").unlink()
    (moddir / "updates/helper.ko.xz").unlink()
    index, stats = build_index(tree, KVER)
    assert stats.parsed == 0 and "unused_user" not in index.modules
    assert index.modules["helper"].relpath == "kernel/drivers/test/helper.ko"
    assert snapshot(index) == snapshot(cold(tree))
    again, stats = build_index(tree, KVER)
    assert (stats.files, stats.parsed, stats.cached) == (5, 0, 5)
    assert snapshot(again) == snapshot(index)


def test_a_file_that_stops_parsing_is_reported_and_forgotten(tree: Path) -> None:
    build_index(tree, KVER)
    target = tree / f"lib/modules/{KVER}/kernel/drivers/test/unused.ko"
    target.write_bytes(b"\x7fELF" + b"\0" * 60)
    for _ in range(2):
        index, stats = build_index(tree, KVER)
        assert stats.parsed == 0 and len(index.parse_errors) == 1
        assert "unused" not in index.modules
        assert snapshot(index) == snapshot(cold(tree))


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = bytearray()
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif how == "head-byte":
        data[200] ^= 0x20
    elif how == "header":
        data[10] ^= 0x01  # the format number
    elif how == "appended":
        data += b"\0"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how", ["empty", "truncated", "garbage", "head-byte", "header", "appended"]
)
def test_a_damaged_cache_is_ignored_and_rewritten(tree: Path, how: str) -> None:
    build_index(tree, KVER)
    _damage(cache_file(tree), how)
    index, stats = build_index(tree, KVER)
    assert stats.parsed == 6
    assert snapshot(index) == snapshot(cold(tree))
    _, stats = build_index(tree, KVER)
    assert stats.parsed == 0


def test_a_cache_of_another_format_or_tree_is_ignored(tree: Path, tmp_path: Path) -> None:
    moddir = tree / f"lib/modules/{KVER}"
    # What format 3 wrote: one marshal tuple (format, version, moddir, entries).
    cache_file(tree).parent.mkdir(parents=True)
    cache_file(tree).write_bytes(marshal.dumps((3, __version__, str(moddir), {})))
    _, stats = build_index(tree, KVER)
    assert stats.parsed == 6
    # The same tree seen under another root is another tree.
    moved = tmp_path / "moved"
    shutil.copytree(tree, moved, symlinks=True)
    index, stats = build_index(moved, KVER)
    assert stats.parsed == 6 and index.moddir == moved / f"lib/modules/{KVER}"
    _, stats = build_index(moved, KVER)
    assert stats.parsed == 0


def test_a_damaged_symbol_list_is_read_from_the_module(tree: Path) -> None:
    build_index(tree, KVER)
    path = cache_file(tree)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last row's symbol blob
    path.write_bytes(bytes(data))
    index, stats = build_index(tree, KVER)
    assert stats.parsed == 0
    assert snapshot(index) == snapshot(cold(tree))
    assert not path.exists()  # dropped, to be rebuilt by the next build
    _, stats = build_index(tree, KVER)
    assert stats.parsed == 6


def test_symbol_lists_survive_the_cache_being_replaced(tree: Path) -> None:
    build_index(tree, KVER)
    index, _ = build_index(tree, KVER)
    build_index(tree, KVER, rebuild=True)  # another process writes a new cache file
    cache_file(tree).write_bytes(b"not a cache")
    assert snapshot(index) == snapshot(cold(tree))


def _stash(root: Path, relpaths: list[str], store: Path) -> list[StashedModule]:
    """Take module files out of the tree, as a trim does, and describe them."""
    moddir = root / f"lib/modules/{KVER}"
    store.mkdir(exist_ok=True)
    found = []
    for relpath in relpaths:
        data = (moddir / relpath).read_bytes()
        kept = store / hashlib.sha256(data).hexdigest()
        kept.write_bytes(data)
        (moddir / relpath).unlink()
        found.append(StashedModule(relpath, len(data), kept.name,
                                   load=lambda kept=kept: kept.read_bytes()))  # type: ignore[misc]
    return found


def test_stashed_modules_warm_is_cold(tree: Path, tmp_path: Path) -> None:
    build_index(tree, KVER)
    stashed = _stash(tree, ["kernel/drivers/test/unused.ko",
                            "kernel/drivers/test/unused_user.ko"], tmp_path / "stash")
    expected = snapshot(cold(tree, stashed=stashed))
    assert [m[0] for m in expected["modules"] if m[5]] == ["unused", "unused_user"]
    # Just trimmed: the stashed copies' modinfo carries over from the tree's rows.
    index, stats = build_index(tree, KVER, stashed=stashed)
    assert stats.parsed == 0 and snapshot(index) == expected
    # Then from the stash's own rows.
    index, stats = build_index(tree, KVER, stashed=stashed)
    assert stats.parsed == 0 and snapshot(index) == expected
    # A damaged stash row is read from the stash.
    path = cache_file(tree)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    index, _ = build_index(tree, KVER, stashed=stashed)
    assert snapshot(index) == expected
    # Restored: the stash rows go.
    moddir = tree / f"lib/modules/{KVER}"
    for item in stashed:
        (moddir / item.relpath).write_bytes(item.load())
    index, _ = build_index(tree, KVER)
    assert snapshot(index) == snapshot(cold(tree))


def test_a_restored_file_takes_its_stash_row(tree: Path, tmp_path: Path,
                                              symbol_reads: list[int]) -> None:
    """A module put back byte for byte (size and sha256 of its stashed copy) is not read
    again, and the exports derived from the cached rows still hold (they were only moved
    between tree and stash); a restore's load leaves the cache file as it is."""
    build_index(tree, KVER)
    stashed = _stash(tree, ["kernel/drivers/test/unused.ko",
                            "kernel/drivers/test/unused_user.ko"], tmp_path / "stash")
    build_index(tree, KVER, stashed=stashed)
    build_index(tree, KVER, stashed=stashed)  # the cache now lists both as stashed
    moddir = tree / f"lib/modules/{KVER}"
    (moddir / stashed[0].relpath).write_bytes(stashed[0].load())
    before = cache_file(tree).read_bytes()
    symbol_reads.clear()
    index, stats = build_index(tree, KVER, stashed=stashed[1:], save_cache=False)
    assert stats.parsed == 0
    assert symbol_reads == []  # the derived exports came from the cache
    assert snapshot(index) == snapshot(cold(tree, stashed=stashed[1:]))
    assert cache_file(tree).read_bytes() == before
    # Saved, then read as it is.
    build_index(tree, KVER, stashed=stashed[1:])
    index, stats = build_index(tree, KVER, stashed=stashed[1:])
    assert stats.parsed == 0 and snapshot(index) == snapshot(cold(tree, stashed=stashed[1:]))
    # Other bytes of the same size at that path are read.
    data = bytearray(stashed[1].load())
    data[-1] ^= 0xFF
    (moddir / stashed[1].relpath).write_bytes(bytes(data))
    index, stats = build_index(tree, KVER)
    assert stats.parsed == 1
    assert snapshot(index) == snapshot(cold(tree))


def test_a_name_split_between_tree_and_stash_derives_its_exports_again(
        tree: Path, tmp_path: Path) -> None:
    """helper has two files; which one counts depends on where each is, so moving one
    between tree and stash is not 'the same modules': the exports are derived again."""
    build_index(tree, KVER)
    stashed = _stash(tree, ["updates/helper.ko.xz"], tmp_path / "stash")
    for _ in range(2):
        index, _ = build_index(tree, KVER, stashed=stashed)
        assert index.modules["helper"].relpath == "kernel/drivers/test/helper.ko"
        assert snapshot(index) == snapshot(cold(tree, stashed=stashed))
    (tree / f"lib/modules/{KVER}/updates/helper.ko.xz").write_bytes(stashed[0].load())
    for _ in range(2):
        index, stats = build_index(tree, KVER)
        assert stats.parsed == 0  # its bytes are the stash row's
        assert index.modules["helper"].relpath == "updates/helper.ko.xz"
        assert snapshot(index) == snapshot(cold(tree))


def test_derived_kernel_exports_come_from_the_cache(tree: Path,
                                                    symbol_reads: list[int]) -> None:
    expected = snapshot(cold(tree))
    assert expected["kernel_exports_source"] == "derived from the tree"
    assert "printk" in expected["kernel_exports"]
    build_index(tree, KVER)
    symbol_reads.clear()
    index, _ = build_index(tree, KVER)
    assert symbol_reads == []  # derived once, remembered with the rows it came from
    assert snapshot(index) == expected
    (tree / f"lib/modules/{KVER}/kernel/drivers/test/virtio-thing.ko").unlink()
    index, _ = build_index(tree, KVER)
    assert "printk" not in index.kernel_exports
    assert snapshot(index) == snapshot(cold(tree))


def test_a_restore_derives_no_exports(tree: Path, tmp_path: Path,
                                      symbol_reads: list[int]) -> None:
    """A load that leaves the cache as it is (a restore's), from a cache holding no
    derived exports, derives them only when asked: the closure (what a restore needs)
    does not ask, and is the one the derived exports give."""
    from kmodtrim.closure import Reason, closure_of

    build_index(tree, KVER, symvers=write_symvers(tmp_path / "Module.symvers", ["printk"]))
    symbol_reads.clear()
    index, _ = build_index(tree, KVER, save_cache=False)
    assert index.kernel_exports_source == "derived from the tree"
    seeds = {"unused_user": [Reason("policy", "restore requested")]}
    lazy = closure_of(seeds, index)
    assert 0 < len(symbol_reads) < len(index.modules)  # the closure's modules' only
    expected = cold(tree)
    assert lazy == closure_of(seeds, expected)
    assert index.kernel_exports == expected.kernel_exports  # derived when asked
    assert len(set(symbol_reads)) == len(index.modules)  # every module's, then


def test_kernel_exports_file_changes_are_seen(tree: Path, tmp_path: Path) -> None:
    symvers = write_symvers(tmp_path / "Module.symvers", ["printk", "maybe_there"])
    build_index(tree, KVER, symvers=symvers)
    index, _ = build_index(tree, KVER, symvers=symvers)
    assert index.kernel_exports == {"printk", "maybe_there"}
    write_symvers(symvers, ["printk", "kmalloc", "kfree"])
    index, _ = build_index(tree, KVER, symvers=symvers)
    assert index.kernel_exports == {"printk", "kmalloc", "kfree"}
    assert snapshot(index) == snapshot(cold(tree, symvers=symvers))


def test_an_unwritable_cache_directory_costs_only_speed(tree: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    index, stats = build_index(tree, KVER, cache_dir=blocker / "cache")
    assert stats.parsed == 6 and snapshot(index) == snapshot(cold(tree))


@pytest.mark.kernel
def test_warm_is_cold_on_a_real_kernel(each_cloud_kernel: KernelTree, tmp_path: Path) -> None:
    cloud_kernel = each_cloud_kernel
    cache = tmp_path / "cache"
    expected = snapshot(build_index(cloud_kernel.root, cloud_kernel.kver, use_cache=False,
                                    symvers=cloud_kernel.symvers)[0])
    build_index(cloud_kernel.root, cloud_kernel.kver, cache_dir=cache,
                symvers=cloud_kernel.symvers)
    warm, stats = build_index(cloud_kernel.root, cloud_kernel.kver, cache_dir=cache,
                              symvers=cloud_kernel.symvers)
    assert stats.parsed == 0 and stats.cached == stats.files > 1000
    assert snapshot(warm) == expected
    shutil.rmtree(cache)
