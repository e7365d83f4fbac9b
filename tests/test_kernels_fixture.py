"""The real-kernel fixtures deliver what other tests rely on, on each Debian release."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from kernels import KernelTree, apt_options, copy_kernel_tree, kernel_cache_dir, prepare_kernel

pytestmark = pytest.mark.kernel

_MODULE_FILE = re.compile(r"\.ko(\.xz|\.zst|\.gz)?$")


def _module_files(moddir: Path) -> list[Path]:
    return [p for p in moddir.rglob("*") if _MODULE_FILE.search(p.name) and p.is_file()]


def test_cloud_kernel_has_more_than_a_thousand_modules(each_cloud_kernel: KernelTree) -> None:
    assert len(_module_files(each_cloud_kernel.moddir / "kernel")) > 1000


def test_generic_kernel_has_more_modules_than_cloud(
    cloud_kernel: KernelTree, generic_kernel: KernelTree,
    trixie_cloud_kernel: KernelTree, trixie_generic_kernel: KernelTree,
) -> None:
    for generic, cloud in ((generic_kernel, cloud_kernel),
                           (trixie_generic_kernel, trixie_cloud_kernel)):
        assert generic.release == cloud.release
        assert len(_module_files(generic.moddir / "kernel")) > len(
            _module_files(cloud.moddir / "kernel"))


def test_each_release_ships_its_module_format_in_its_layout(
    each_cloud_kernel: KernelTree,
) -> None:
    tree = each_cloud_kernel
    suffixes = {p.name.removeprefix(p.name.split(".")[0]) for p in _module_files(tree.moddir)}
    assert suffixes == {tree.module_suffix}
    lib = tree.root / "lib"
    if tree.release.usrmerged:
        # Debian 13: the package ships /usr/lib/modules; lib -> usr/lib as on a merged system.
        assert lib.is_symlink() and str(lib.readlink()) == "usr/lib"
        assert (tree.root / "usr/lib/modules" / tree.kver / "modules.dep").is_file()
        assert tree.kver.startswith("6.12.")
    else:
        assert not lib.is_symlink() and not (tree.root / "usr/lib/modules").exists()
        assert tree.kver.startswith("6.1.")


def test_cloud_kernel_ships_modules_builtin(each_cloud_kernel: KernelTree) -> None:
    builtin = (each_cloud_kernel.moddir / "modules.builtin").read_text().split()
    assert builtin, "modules.builtin is empty"
    assert all(line.startswith("kernel/") and line.endswith(".ko") for line in builtin)
    assert (each_cloud_kernel.moddir / "modules.builtin.modinfo").stat().st_size > 0


def test_pristine_tree_has_modules_dep_from_depmod(each_cloud_kernel: KernelTree) -> None:
    lines = (each_cloud_kernel.moddir / "modules.dep").read_text().splitlines()
    assert len(lines) > 1000
    first = lines[0].split(":", 1)[0]
    assert first.endswith(each_cloud_kernel.module_suffix)
    assert (each_cloud_kernel.moddir / first).is_file()
    assert (each_cloud_kernel.moddir / "modules.alias").stat().st_size > 0


def test_symvers_lines_have_crc_symbol_module_and_export_type(
    each_cloud_kernel: KernelTree,
) -> None:
    lines = each_cloud_kernel.symvers.read_text().splitlines()
    assert len(lines) > 1000
    for line in lines:
        fields = line.split("\t")
        assert len(fields) in (4, 5), line
        crc, symbol, _module, export = fields[:4]
        assert re.fullmatch(r"0x[0-9a-f]{8}", crc), line
        assert symbol, line
        assert export.startswith("EXPORT_SYMBOL"), line


def test_kver_matches_module_dir_and_package_name(each_cloud_kernel: KernelTree) -> None:
    tree = each_cloud_kernel
    assert [p.name for p in (tree.root / "lib" / "modules").iterdir()] == [tree.kver]
    assert tree.kver.endswith("-cloud-amd64")
    package = subprocess.run(
        ["dpkg-deb", "-f", str(tree.deb), "Package"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert package == tree.package == f"linux-image-{tree.kver}"
    assert f"linux-headers-{tree.kver}" in str(tree.symvers)


def test_the_deb_is_the_one_the_release_archive_signs_for(each_cloud_kernel: KernelTree) -> None:
    # The release's own (signed) index, read through the fixtures' private apt
    # configuration, records this exact file: version and SHA256.
    tree = each_cloud_kernel
    version = subprocess.run(["dpkg-deb", "-f", str(tree.deb), "Version"],
                             capture_output=True, text=True, check=True).stdout.strip()
    show = subprocess.run(
        ["apt-cache", *apt_options(kernel_cache_dir(), tree.release), "show",
         f"{tree.package}={version}"],
        capture_output=True, text=True, check=True,
    ).stdout
    recorded = re.findall(r"^SHA256: (\S+)$", show, re.MULTILINE)
    assert recorded == [hashlib.sha256(tree.deb.read_bytes()).hexdigest()]


def test_copy_kernel_tree_changes_do_not_reach_pristine_tree(
    each_cloud_kernel: KernelTree, tmp_path: Path
) -> None:
    pristine = each_cloud_kernel
    copy = copy_kernel_tree(pristine, tmp_path / "root")
    assert copy.kver == pristine.kver and copy.release == pristine.release
    assert copy.moddir == tmp_path / "root" / "lib" / "modules" / pristine.kver
    assert (copy.root / "lib").is_symlink() == pristine.release.usrmerged
    victim = copy.moddir / "modules.dep"
    original = (pristine.moddir / "modules.dep").read_bytes()
    assert victim.read_bytes() == original
    assert victim.stat().st_ino != (pristine.moddir / "modules.dep").stat().st_ino
    victim.write_text("")
    assert (pristine.moddir / "modules.dep").read_bytes() == original


def test_copy_kernel_tree_refuses_non_empty_destination(
    cloud_kernel: KernelTree, tmp_path: Path
) -> None:
    (tmp_path / "junk").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        copy_kernel_tree(cloud_kernel, tmp_path)


@pytest.mark.parametrize(("flavour", "release"), [("generic", "sid"), ("rt", "trixie")])
def test_prepare_kernel_names_the_flavours_and_releases_it_knows(
    flavour: str, release: str
) -> None:
    with pytest.raises(RuntimeError, match=r"flavours \['cloud', 'generic'\], releases "
                                           r"\['bookworm', 'trixie'\]"):
        prepare_kernel(flavour, release)
