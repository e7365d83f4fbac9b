"""The gcc-built synthetic modules are real enough for kmod's own tools to accept them."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from modbuild import (
    THIS_MODULE_NAME_OFFSET,
    THIS_MODULE_SIZE,
    ModSpec,
    build_module,
    build_tree,
    module_bytes,
    write_symvers,
    write_system_map,
)

KVER = "6.1.0-test"
SBIN_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)

A = ModSpec("mod-a", exports=("a_hello", "a_world"), gpl_exports=("a_gpl_only",))
B = ModSpec("mod_b", imports=("a_hello", "a_gpl_only", "printk"), exports=("b_service",))
C = ModSpec("c", imports=("b_service",), weak_imports=("maybe_there",))
RICH = ModSpec(
    "rich-mod",
    depends=("mod-a", "soundcore"),
    softdeps=("pre: crc32c post: zz-helper",),
    weakdeps=("wk_one",),
    aliases=("pci:v00001AF4d00001001sv*sd*bc*sc*i*", "fs-richfs"),
    firmware=("vendor/rich.bin", "vendor/rich-2.bin"),
    license="Dual MIT/GPL",
    extra_modinfo=(("description", 'quotes " and \\ backslash, ümlaut'), ("author", "Me")),
)


def section(elf: ELFFile, name: str) -> Any:
    """A section that must exist (pyelftools types its symbol tables loosely)."""
    found = elf.get_section_by_name(name)
    assert found is not None, f"no section {name}"
    return found


def tool(name: str) -> str:
    """The path of a kmod tool, or a test failure saying what to install."""
    found = shutil.which(name, path=SBIN_PATH)
    if found is None:
        pytest.fail(f"{name} not found: apt-get install kmod")
    return found


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, check=True,
        env={"PATH": SBIN_PATH, "LC_ALL": "C"},
    )


def modinfo_field(path: Path, field: str) -> list[str]:
    return run(tool("modinfo"), "-F", field, path).stdout.splitlines()


def kmod_supports(feature: str) -> bool:
    return f"+{feature}" in run(tool("depmod"), "--version").stdout


def dep_lines(moddir: Path) -> dict[str, list[str]]:
    deps = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        module, _, rest = line.partition(":")
        deps[module] = rest.split()
    return deps


@pytest.mark.parametrize("compress", [None, "xz", "zstd", "gzip"])
def test_modinfo_reads_every_field_of_a_built_module(tmp_path: Path, compress: str | None) -> None:
    path = build_module(RICH, tmp_path, compress=compress)
    assert path.name == "rich-mod" + {None: ".ko", "xz": ".ko.xz", "zstd": ".ko.zst",
                                      "gzip": ".ko.gz"}[compress]
    if compress == "gzip" and not kmod_supports("ZLIB"):
        # Debian builds kmod without zlib: modinfo reads the bytes gzip gives back, the
        # module the kernel would load, instead of the .ko.gz itself.
        unpacked = subprocess.run(["gzip", "-dc", str(path)], capture_output=True,
                                  check=True).stdout
        path = tmp_path / "rich-mod-gunzipped.ko"
        path.write_bytes(unpacked)
    assert modinfo_field(path, "depends") == ["mod-a,soundcore"]
    assert modinfo_field(path, "alias") == list(RICH.aliases)
    assert modinfo_field(path, "firmware") == list(RICH.firmware)
    assert modinfo_field(path, "softdep") == ["pre: crc32c post: zz-helper"]
    assert modinfo_field(path, "weakdep") == ["wk_one"]
    assert modinfo_field(path, "license") == ["Dual MIT/GPL"]
    assert modinfo_field(path, "intree") == ["Y"]
    assert modinfo_field(path, "name") == ["rich-mod"]
    assert modinfo_field(path, "vermagic") == [RICH.vermagic]
    assert modinfo_field(path, "description") == ['quotes " and \\ backslash, ümlaut']


def test_gzip_module_decompresses_to_the_uncompressed_build(tmp_path: Path) -> None:
    gz = build_module(RICH, tmp_path / "gz", compress="gzip")
    plain = build_module(RICH, tmp_path / "plain")
    unpacked = subprocess.run(["gzip", "-dc", str(gz)], capture_output=True, check=True).stdout
    assert unpacked == plain.read_bytes()


def test_xz_module_uses_the_kernels_xz_options(tmp_path: Path) -> None:
    path = build_module(A, tmp_path, compress="xz")
    listing = run("xz", "--robot", "--list", "-vv", path).stdout
    block = next(line for line in listing.splitlines() if line.startswith("block\t"))
    assert "\tCRC32\t" in block
    assert block.endswith("\t--lzma2=dict=1MiB")


def test_module_layout_matches_a_6_1_kernel_module(tmp_path: Path) -> None:
    path = build_module(A, tmp_path)
    with path.open("rb") as f:
        elf = ELFFile(f)
        assert (elf["e_type"], elf["e_machine"], elf.elfclass) == ("ET_REL", "EM_X86_64", 64)
        names = {s.name for s in elf.iter_sections()}
        assert {"__ksymtab", "__ksymtab_gpl", "__ksymtab_strings", ".modinfo",
                ".gnu.linkonce.this_module", ".symtab"} <= names
        assert not any(n.startswith("___ksymtab") for n in names), "module.lds merges them"
        strings = section(elf, "__ksymtab_strings").data().split(b"\0")
        assert [s for s in strings if s] == [b"a_hello", b"a_world", b"a_gpl_only"]
        # Three 32-bit PREL32 offsets (value, name, namespace) per exported symbol.
        assert section(elf, "__ksymtab").data_size == 2 * 12
        assert section(elf, "__ksymtab_gpl").data_size == 12
        this_module = section(elf, ".gnu.linkonce.this_module").data()
        assert len(this_module) == THIS_MODULE_SIZE
        assert this_module[THIS_MODULE_NAME_OFFSET:].split(b"\0")[0] == b"mod_a"
        symtab = section(elf, ".symtab")
        ksymtab_syms = {s.name for s in symtab.iter_symbols() if s.name.startswith("__ksymtab_")}
        assert ksymtab_syms == {"__ksymtab_a_hello", "__ksymtab_a_world", "__ksymtab_a_gpl_only"}


def test_imports_are_undefined_global_and_weak_imports_undefined_weak(tmp_path: Path) -> None:
    path = build_module(C, tmp_path)
    with path.open("rb") as f:
        symtab = section(ELFFile(f), ".symtab")
        undefined = {
            s.name: s["st_info"]["bind"]
            for s in symtab.iter_symbols()
            if s["st_shndx"] == "SHN_UNDEF" and s.name
        }
    assert undefined == {"b_service": "STB_GLOBAL", "maybe_there": "STB_WEAK"}


@pytest.mark.parametrize("compress", [None, "xz", "zstd"])
def test_depmod_derives_dependencies_from_exported_symbols(
    tmp_path: Path, compress: str | None
) -> None:
    moddir = build_tree(tmp_path, KVER, [A, B, C], compress=compress)
    run(tool("depmod"), "-b", tmp_path, KVER)
    suffix = {None: ".ko", "xz": ".ko.xz", "zstd": ".ko.zst"}[compress]
    a, b, c = (f"kernel/drivers/test/{n}{suffix}" for n in ("mod-a", "mod_b", "c"))
    assert dep_lines(moddir) == {a: [], b: [a], c: [b, a]}
    symbols = (moddir / "modules.symbols").read_text()
    for line in ("alias symbol:a_hello mod_a", "alias symbol:a_gpl_only mod_a",
                 "alias symbol:b_service mod_b"):
        assert line in symbols


def test_modprobe_show_depends_lists_the_exporting_module_first(tmp_path: Path) -> None:
    moddir = build_tree(tmp_path, KVER, [A, B, C])
    run(tool("depmod"), "-b", tmp_path, KVER)
    out = run(tool("modprobe"), "--show-depends", "-d", tmp_path, "-S", KVER, "c").stdout
    assert out.split("\n")[:3] == [
        f"insmod {moddir}/kernel/drivers/test/mod-a.ko ",
        f"insmod {moddir}/kernel/drivers/test/mod_b.ko ",
        f"insmod {moddir}/kernel/drivers/test/c.ko ",
    ]


def test_depmod_reports_imports_that_nothing_provides(tmp_path: Path) -> None:
    lonely = ModSpec("lonely", imports=("nobody_exports_this", "printk"),
                     weak_imports=("weak_and_missing",))
    build_tree(tmp_path, KVER, [A, B, lonely])
    system_map = write_system_map(tmp_path / "System.map", ["printk"])
    proc = run(tool("depmod"), "-b", tmp_path, "-e", "-F", system_map, KVER)
    warnings = sorted(line.split("/")[-1] for line in proc.stderr.splitlines())
    assert warnings == ["lonely.ko needs unknown symbol nobody_exports_this"]


def test_depmod_checks_modversions_against_module_symvers(tmp_path: Path) -> None:
    versioned = ModSpec("versioned", imports=("printk", "kmalloc"), modversions=True)
    build_tree(tmp_path, KVER, [versioned])
    good = write_symvers(tmp_path / "good.symvers", ["printk", "kmalloc"])
    assert run(tool("depmod"), "-b", tmp_path, "-e", "-E", good, KVER).stderr == ""
    bad = tmp_path / "bad.symvers"
    printk_line, kmalloc_line = good.read_text().splitlines()
    bad.write_text(f"{printk_line}\n0x00000001\t{kmalloc_line.split(chr(9), 1)[1]}\n")
    proc = run(tool("depmod"), "-b", tmp_path, "-e", "-E", bad, KVER)
    assert "disagrees about version of symbol kmalloc" in proc.stderr
    assert "printk" not in proc.stderr


@pytest.mark.parametrize("modversions", [True, False])
def test_depmod_takes_exports_from_crcs_else_from_ksymtab_strings(
    tmp_path: Path, modversions: bool
) -> None:
    # With CONFIG_MODVERSIONS kmod reads exports from the __crc_* symbols; without, it
    # takes every string in __ksymtab_strings — namespace names included (a kmod quirk
    # readers need not copy, but must know about).
    provider = ModSpec("ns-provider", exports=("ns_one", "ns_two"), export_ns="MY_NS",
                       modversions=modversions)
    user = ModSpec("ns_user", imports=("ns_one",), extra_modinfo=(("import_ns", "MY_NS"),))
    moddir = build_tree(tmp_path, KVER, [provider, user])
    with (moddir / "kernel/drivers/test/ns-provider.ko").open("rb") as f:
        elf = ELFFile(f)
        strings = section(elf, "__ksymtab_strings").data().split(b"\0")
        crcs = {s.name for s in section(elf, ".symtab").iter_symbols()
                if s.name.startswith("__crc_")}
    assert [s for s in strings if s] == [b"ns_one", b"MY_NS", b"ns_two", b"MY_NS"]
    assert crcs == ({"__crc_ns_one", "__crc_ns_two"} if modversions else set())
    run(tool("depmod"), "-b", tmp_path, KVER)
    symbols = {line.split()[1] for line in (moddir / "modules.symbols").read_text().splitlines()
               if line.startswith("alias ")}
    expected = {"symbol:ns_one", "symbol:ns_two"}
    assert symbols == (expected if modversions else expected | {"symbol:MY_NS"})
    assert dep_lines(moddir)["kernel/drivers/test/ns_user.ko"] == [
        "kernel/drivers/test/ns-provider.ko"
    ]


def test_builtin_modules_are_known_to_modprobe(tmp_path: Path) -> None:
    builtin_fs = ModSpec("ext4", aliases=("fs-ext4",), softdeps=("pre: crc32c",))
    moddir = build_tree(tmp_path, KVER, [A], builtin=[builtin_fs, "virtio-pci"])
    assert (moddir / "modules.builtin").read_text() == (
        "kernel/drivers/test/ext4.ko\nkernel/drivers/test/virtio-pci.ko\n"
    )
    entries = (moddir / "modules.builtin.modinfo").read_bytes().split(b"\0")
    assert b"ext4.alias=fs-ext4" in entries
    assert b"virtio_pci.license=GPL" in entries
    assert not (moddir / "kernel/drivers/test/ext4.ko").exists()
    run(tool("depmod"), "-b", tmp_path, KVER)
    modprobe = tool("modprobe")
    assert run(modprobe, "--show-depends", "-d", tmp_path, "-S", KVER, "ext4").stdout == (
        "builtin ext4\n"
    )
    assert run(modprobe, "--resolve-alias", "-d", tmp_path, "-S", KVER, "fs-ext4").stdout == (
        "ext4\n"
    )
    assert (moddir / "modules.order").read_text() == "kernel/drivers/test/mod-a.ko\n"


def test_builds_are_cached_by_spec(tmp_path: Path) -> None:
    spec = ModSpec("cached", exports=("cached_sym",), aliases=(f"x-{time.time_ns()}",))
    first = module_bytes(spec, tmp_path)
    assert module_bytes(spec, tmp_path) is first
    other = module_bytes(ModSpec("cached", exports=("cached_sym",)), tmp_path)
    assert other != first
    assert list(tmp_path.iterdir()) == [], "the gcc scratch directory is removed"


@pytest.mark.parametrize(
    "spec",
    [
        ModSpec("bad name!"),
        ModSpec("x", exports=("not-an-identifier",)),
        ModSpec("x", exports=("dup",), imports=("dup",)),
        ModSpec("x", aliases=("nul\0inside",)),
    ],
)
def test_unbuildable_specs_are_refused(tmp_path: Path, spec: ModSpec) -> None:
    with pytest.raises(ValueError):
        build_module(spec, tmp_path)
