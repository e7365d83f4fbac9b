"""The real-kernel fixtures deliver what other tests rely on."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from kernels import KernelTree, copy_kernel_tree

pytestmark = pytest.mark.kernel

_MODULE_FILE = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


def _module_files(moddir: Path) -> list[Path]:
    return [p for p in moddir.rglob("*") if _MODULE_FILE.search(p.name) and p.is_file()]


def test_cloud_kernel_has_more_than_a_thousand_modules(cloud_kernel: KernelTree) -> None:
    assert len(_module_files(cloud_kernel.moddir / "kernel")) > 1000


def test_generic_kernel_has_more_modules_than_cloud(
    cloud_kernel: KernelTree, generic_kernel: KernelTree
) -> None:
    generic = len(_module_files(generic_kernel.moddir / "kernel"))
    cloud = len(_module_files(cloud_kernel.moddir / "kernel"))
    assert generic > cloud


def test_cloud_kernel_ships_modules_builtin(cloud_kernel: KernelTree) -> None:
    builtin = (cloud_kernel.moddir / "modules.builtin").read_text().split()
    assert builtin, "modules.builtin is empty"
    assert all(line.startswith("kernel/") and line.endswith(".ko") for line in builtin)


def test_pristine_tree_has_modules_dep_from_depmod(cloud_kernel: KernelTree) -> None:
    lines = (cloud_kernel.moddir / "modules.dep").read_text().splitlines()
    assert len(lines) > 1000
    first = lines[0].split(":", 1)[0]
    assert (cloud_kernel.moddir / first).is_file()
    assert (cloud_kernel.moddir / "modules.alias").stat().st_size > 0


def test_symvers_lines_have_crc_symbol_module_and_export_type(cloud_kernel: KernelTree) -> None:
    lines = cloud_kernel.symvers.read_text().splitlines()
    assert len(lines) > 1000
    for line in lines:
        fields = line.split("\t")
        assert len(fields) in (4, 5), line
        crc, symbol, _module, export = fields[:4]
        assert re.fullmatch(r"0x[0-9a-f]{8}", crc), line
        assert symbol, line
        assert export.startswith("EXPORT_SYMBOL"), line


def test_kver_matches_module_dir_and_package_name(cloud_kernel: KernelTree) -> None:
    assert [p.name for p in (cloud_kernel.root / "lib" / "modules").iterdir()] == [
        cloud_kernel.kver
    ]
    assert cloud_kernel.kver.endswith("-cloud-amd64")
    package = subprocess.run(
        ["dpkg-deb", "-f", str(cloud_kernel.deb), "Package"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert package == f"linux-image-{cloud_kernel.kver}"
    assert f"linux-headers-{cloud_kernel.kver}" in str(cloud_kernel.symvers)


def test_copy_kernel_tree_changes_do_not_reach_pristine_tree(
    cloud_kernel: KernelTree, tmp_path: Path
) -> None:
    copy = copy_kernel_tree(cloud_kernel, tmp_path / "root")
    assert copy.kver == cloud_kernel.kver
    assert copy.moddir == tmp_path / "root" / "lib" / "modules" / cloud_kernel.kver
    victim = copy.moddir / "modules.dep"
    original = (cloud_kernel.moddir / "modules.dep").read_bytes()
    assert victim.read_bytes() == original
    assert victim.stat().st_ino != (cloud_kernel.moddir / "modules.dep").stat().st_ino
    victim.write_text("")
    assert (cloud_kernel.moddir / "modules.dep").read_bytes() == original


def test_copy_kernel_tree_refuses_non_empty_destination(
    cloud_kernel: KernelTree, tmp_path: Path
) -> None:
    (tmp_path / "junk").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        copy_kernel_tree(cloud_kernel, tmp_path)
