"""The closure and the symbol check agree with kmod on real Debian kernels (12 and 13)."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kernels import KernelTree, copy_kernel_tree
from kmodtrim.closure import Reason, closure_of, verify_symbols
from kmodtrim.index import ModuleIndex, build_index

pytestmark = pytest.mark.kernel

_INSMOD = re.compile(r"^insmod (\S+)")


def _modprobe_insmods(tree: KernelTree, names: list[str], confdir: Path) -> dict[str, set[str]]:
    """For each name, the module files `modprobe --show-depends` would insmod."""
    result: dict[str, set[str]] = {}
    for name in names:
        proc = subprocess.run(
            ["modprobe", "-C", str(confdir), "--show-depends", "-d", str(tree.root),
             "-S", tree.kver, name],
            capture_output=True, text=True, check=False,
        )
        assert proc.returncode == 0, f"modprobe failed for {name}: {proc.stderr}"
        paths = set()
        for line in proc.stdout.splitlines():
            match = _INSMOD.match(line)
            if match:
                paths.add(str(Path(match.group(1)).relative_to(tree.moddir)))
        result[name] = paths
    return result


@pytest.fixture(scope="module")
def cloud_index(
    each_cloud_kernel: KernelTree, tmp_path_factory: pytest.TempPathFactory
) -> ModuleIndex:
    index, _ = build_index(
        each_cloud_kernel.root, each_cloud_kernel.kver,
        cache_dir=tmp_path_factory.mktemp("cache"), symvers=each_cloud_kernel.symvers,
    )
    return index


def test_closure_contains_everything_modprobe_loads_for_every_module(
    each_cloud_kernel: KernelTree, cloud_index: ModuleIndex, tmp_path: Path
) -> None:
    names = sorted(cloud_index.modules)
    assert len(names) > 1000
    insmods = _modprobe_insmods(each_cloud_kernel, names, tmp_path)
    missing: dict[str, set[str]] = {}
    for name in names:
        closure = closure_of({name: [Reason("policy", "test")]}, cloud_index)
        ours = {cloud_index.modules[m].relpath for m in closure.kept}
        assert name in closure.kept
        if not insmods[name] <= ours:
            missing[name] = insmods[name] - ours
    assert not missing, f"closure misses modules modprobe loads: {dict(list(missing.items())[:5])}"


def test_closure_contains_every_dependency_depmod_wrote_on_the_whole_generic_tree(
    each_generic_kernel: KernelTree,
) -> None:
    # Every module of Debian's generic kernel (4,000+; 13's as .ko.xz): what depmod wrote
    # into modules.dep for a module, the closure of that module keeps.
    tree = each_generic_kernel
    index, _ = build_index(tree.root, tree.kver, use_cache=False, symvers=tree.symvers)
    depends: dict[str, list[str]] = {}
    for line in (tree.moddir / "modules.dep").read_text().splitlines():
        module, _, listed = line.partition(":")
        depends[module] = listed.split()
    by_relpath = {entry.relpath: name for name, entry in index.modules.items()}
    assert set(by_relpath) == set(depends) and len(depends) > 4000
    missing = {}
    for relpath, deps in depends.items():
        closure = closure_of({by_relpath[relpath]: [Reason("policy", "test")]}, index)
        kept = {index.modules[m].relpath for m in closure.kept}
        if not set(deps) <= kept:
            missing[relpath] = set(deps) - kept
    assert not missing, f"closure misses modules.dep entries: {dict(list(missing.items())[:5])}"


def test_softdep_alias_resolved_like_modprobe(
    each_cloud_kernel: KernelTree, cloud_index: ModuleIndex, tmp_path: Path
) -> None:
    # btrfs carries "softdep=pre: crc32c": modprobe resolves it through aliases.
    closure = closure_of({"btrfs": [Reason("policy", "test")]}, cloud_index)
    kinds = {r.kind for reasons in closure.kept.values() for r in reasons}
    assert "softdep-pre" in kinds
    insmods = _modprobe_insmods(each_cloud_kernel, ["btrfs"], tmp_path)["btrfs"]
    ours = {cloud_index.modules[m].relpath for m in closure.kept}
    assert insmods <= ours and len(insmods) >= 3


def _depmod_unknown_symbols(tree: KernelTree) -> set[tuple[str, str]]:
    proc = subprocess.run(
        ["depmod", "-b", str(tree.root), "-e", "-E", str(tree.symvers), tree.kver],
        capture_output=True, text=True, check=True,
    )
    found = set()
    for line in proc.stderr.splitlines():
        match = re.search(r"WARNING: (\S+) needs unknown symbol (\S+)", line)
        if match:
            found.add((str(Path(match.group(1)).relative_to(tree.moddir)), match.group(2)))
    return found


def test_symbol_check_matches_depmod_on_a_tree_with_needed_modules_removed(
    each_cloud_kernel: KernelTree, cloud_index: ModuleIndex, tmp_path: Path
) -> None:
    # Pick exporters that other modules import from, remove them, and compare.
    users: dict[str, int] = {}
    providers = cloud_index.symbol_providers
    for entry in cloud_index.modules.values():
        for sym in entry.info.undefined:
            if sym in providers:
                users[providers[sym]] = users.get(providers[sym], 0) + 1
    rng = random.Random(7)
    victims = rng.sample(sorted(n for n, count in users.items() if count >= 2), 6)
    tree = copy_kernel_tree(each_cloud_kernel, tmp_path / "root")
    for name in victims:
        (tree.moddir / cloud_index.modules[name].relpath).unlink()
    expected = _depmod_unknown_symbols(tree)
    assert expected, "removing exporters must make depmod complain"

    trimmed, _ = build_index(tree.root, tree.kver, use_cache=False, symvers=tree.symvers)
    ours = {(p.relpath, p.symbol) for p in verify_symbols(trimmed.modules, trimmed)}
    assert ours == expected


def test_untrimmed_tree_has_no_unresolved_symbols(cloud_index: ModuleIndex) -> None:
    assert verify_symbols(cloud_index.modules, cloud_index) == []
    assert cloud_index.kernel_exports_source.startswith("symvers:")


def test_derived_kernel_exports_cover_what_symvers_says_modules_need(
    each_cloud_kernel: KernelTree, cloud_index: ModuleIndex
) -> None:
    derived, _ = build_index(each_cloud_kernel.root, each_cloud_kernel.kver, use_cache=False)
    assert derived.kernel_exports_source == "derived from the tree"
    assert derived.kernel_exports <= cloud_index.kernel_exports
    assert verify_symbols(derived.modules, derived) == []


def test_closure_is_the_same_with_dash_or_underscore_names(cloud_index: ModuleIndex) -> None:
    a = closure_of({"virtio-blk": [Reason("observed", "x")]}, cloud_index)
    b = closure_of({"virtio_blk": [Reason("observed", "x")]}, cloud_index)
    assert set(a.kept) == set(b.kept) and "virtio_blk" in a.kept


def test_tree_copy_is_independent(each_cloud_kernel: KernelTree, tmp_path: Path) -> None:
    tree = copy_kernel_tree(each_cloud_kernel, tmp_path / "copy")
    victim = next(tree.moddir.rglob("*.ko*"))
    victim.unlink()
    assert (each_cloud_kernel.moddir / victim.relative_to(tree.moddir)).exists()
    shutil.rmtree(tree.root)
