"""The module reader: every field of real (gcc-built and Debian) modules, and every way a
module file can be broken ending in ModuleParseError naming the file."""

from __future__ import annotations

import dataclasses
import gzip
import lzma
import random
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import zstandard

from kernels import KernelTree
from kmodtrim import elf
from kmodtrim.elf import ModuleInfo, parse_module, parse_module_reference, read_module
from kmodtrim.errors import ModuleParseError
from modbuild import (
    COMPRESS_SUFFIX,
    ModSpec,
    build_module,
    compress_bytes,
    module_bytes,
    swap_elf_byte_order,
)

COMPRESSIONS = [None, "xz", "gzip", "zstd"]
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"

RICH = ModSpec(
    "rich-mod",
    exports=("rich_open", "rich_close"),
    gpl_exports=("rich_gpl",),
    imports=("printk", "kmalloc", "other_mod_sym"),
    weak_imports=("maybe_there",),
    depends=("other-mod", "soundcore"),
    softdeps=("pre: crc32c crc32-generic post: zz-helper", "post: late-one"),
    weakdeps=("wk-one wk_two",),
    aliases=("pci:v00001AF4d00001001sv*sd*bc*sc*i*", "fs-richfs", "rich-alias"),
    firmware=("vendor/rich.bin", "vendor/rich-2.bin"),
    license="Dual MIT/GPL",
    extra_modinfo=(("description", "a rich module"), ("srcversion", "ABCDEF0123456789")),
)
PLAIN = ModSpec("plain")
OUT_OF_TREE = ModSpec("oot", intree=False, license="", vermagic="6.1.0 SMP mod_unload ")
VERSIONED = ModSpec("versioned", imports=("printk",), modversions=True, exports=("v_sym",))
SPECS = [RICH, PLAIN, OUT_OF_TREE, VERSIONED, dataclasses.replace(RICH, arch="i386")]


def expected(spec: ModSpec) -> ModuleInfo:
    """What the reader must return for a built spec (symbol tuples sorted; see ordered)."""
    pre: list[str] = []
    post: list[str] = []
    for value in spec.softdeps:
        target = None
        for word in value.split():
            if word in ("pre:", "post:"):
                target = pre if word == "pre:" else post
            elif target is not None:
                target.append(word.replace("-", "_"))
    return ModuleInfo(
        name=spec.name.replace("-", "_"),
        depends=tuple(d.replace("-", "_") for d in spec.depends),
        softdep_pre=tuple(pre),
        softdep_post=tuple(post),
        weakdeps=tuple(w.replace("-", "_") for v in spec.weakdeps for w in v.split()),
        aliases=spec.aliases,
        firmware=spec.firmware,
        vermagic=spec.vermagic,
        intree=spec.intree,
        license=spec.license,
        exports=tuple(sorted(spec.exports + spec.gpl_exports)),
        undefined=tuple(sorted(spec.imports)),
        weak_undefined=tuple(sorted(spec.weak_imports)),
    )


def ordered(info: ModuleInfo) -> ModuleInfo:
    """Symbols in a canonical order: the ELF symbol table's order is the compiler's."""
    return dataclasses.replace(
        info,
        exports=tuple(sorted(info.exports)),
        undefined=tuple(sorted(info.undefined)),
        weak_undefined=tuple(sorted(info.weak_undefined)),
    )


def raises_naming(path: Path | str) -> AbstractContextManager[object]:
    """Expect a ModuleParseError whose message starts with the file's path."""
    return pytest.raises(
        ModuleParseError, match=f"^{re.escape(str(path))}: not a readable kernel module"
    )


# ---------------------------------------------------------------------------------------
# Built modules: every field, every suffix


@pytest.mark.parametrize("compress", COMPRESSIONS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.arch}")
def test_read_module_returns_exactly_the_built_fields(
    tmp_path: Path, spec: ModSpec, compress: str | None
) -> None:
    path = build_module(spec, tmp_path, compress=compress)
    assert path.name.endswith(COMPRESS_SUFFIX[compress])
    assert ordered(read_module(path)) == expected(spec)


def test_exports_come_in_ksymtab_strings_order(tmp_path: Path) -> None:
    info = read_module(build_module(RICH, tmp_path))
    assert info.exports == ("rich_open", "rich_close", "rich_gpl")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-{s.arch}")
def test_fast_reader_agrees_with_pyelftools_reader(tmp_path: Path, spec: ModSpec) -> None:
    data = module_bytes(spec, tmp_path)
    assert parse_module(data, "m.ko") == parse_module_reference(data, "m.ko")


# kmod never sees the namespace names EXPORT_SYMBOL_NS stores in __ksymtab_strings
# between the symbol names; neither may we.


@pytest.mark.parametrize("modversions", [True, False])
def test_namespace_names_are_not_exports(tmp_path: Path, modversions: bool) -> None:
    spec = ModSpec("ns-mod", exports=("ns_one", "ns_two"), gpl_exports=("ns_gpl",),
                   export_ns="MY_NS", modversions=modversions)
    data = module_bytes(spec, tmp_path)
    assert sorted(parse_module(data, "ns.ko").exports) == ["ns_gpl", "ns_one", "ns_two"]
    assert sorted(parse_module_reference(data, "ns.ko").exports) == [
        "ns_gpl", "ns_one", "ns_two"
    ]


def test_dashed_name_in_modinfo_is_normalised(tmp_path: Path) -> None:
    spec = ModSpec("foo-bar", depends=("dep-one",), softdeps=("pre: x-y",))
    info = read_module(build_module(spec, tmp_path))
    assert (info.name, info.depends, info.softdep_pre) == ("foo_bar", ("dep_one",), ("x_y",))


@pytest.mark.parametrize("compress", COMPRESSIONS)
def test_name_comes_from_the_file_name_without_modinfo_name(
    tmp_path: Path, compress: str | None
) -> None:
    spec = ModSpec("ignored", write_name=False)
    path = build_module(spec, tmp_path, compress=compress,
                        filename="from-file" + COMPRESS_SUFFIX[compress])
    assert read_module(path).name == "from_file"


def test_modinfo_name_wins_over_the_file_name(tmp_path: Path) -> None:
    path = build_module(ModSpec("real-name"), tmp_path, filename="renamed.ko")
    assert read_module(path).name == "real_name"


def test_no_name_anywhere_is_a_parse_error(tmp_path: Path) -> None:
    data = module_bytes(ModSpec("x", write_name=False), tmp_path)
    with pytest.raises(ModuleParseError, match="no name="):
        parse_module(data, "blob.bin")


def test_big_endian_and_32_bit_modules_parse_like_their_originals(tmp_path: Path) -> None:
    # The reader's contract: any well-formed ELF relocatable with a .modinfo is read,
    # whatever its class, byte order or machine (kmod does not check them either).
    for arch in ("x86_64", "i386"):
        spec = dataclasses.replace(RICH, arch=arch)
        data = module_bytes(spec, tmp_path)
        swapped = swap_elf_byte_order(data, machine=22)  # EM_S390, a big-endian machine
        assert swapped[5] == 2 and swapped[4] == (2 if arch == "x86_64" else 1)
        fast = parse_module(swapped, "be.ko")
        assert fast == parse_module_reference(swapped, "be.ko")
        assert fast == parse_module(data, "le.ko")
        assert ordered(fast) == expected(spec)


def test_foreign_machine_is_read(tmp_path: Path) -> None:
    data = bytearray(module_bytes(RICH, tmp_path))
    struct.pack_into("<H", data, 18, 183)  # EM_AARCH64
    assert ordered(parse_module(bytes(data), "arm.ko")) == expected(RICH)


# ---------------------------------------------------------------------------------------
# Broken files


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("compress", COMPRESSIONS)
def test_empty_file_is_a_parse_error(tmp_path: Path, compress: str | None) -> None:
    path = write(tmp_path, "empty" + COMPRESS_SUFFIX[compress], b"")
    with raises_naming(path):
        read_module(path)


def test_missing_file_is_a_parse_error(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "gone.ko"):
        read_module(tmp_path / "gone.ko")


def test_text_file_is_not_elf(tmp_path: Path) -> None:
    path = write(tmp_path, "readme.ko", b"This is not a module, just text.\n" * 10)
    with pytest.raises(ModuleParseError) as caught:
        read_module(path)
    assert caught.value.path == str(path)
    assert caught.value.reason == "not an ELF file"


def test_executable_is_not_a_relocatable_module(tmp_path: Path) -> None:
    data = bytearray(module_bytes(RICH, tmp_path))
    struct.pack_into("<H", data, 16, 2)  # ET_EXEC
    for parse in (parse_module, parse_module_reference):
        with pytest.raises(ModuleParseError, match="not a relocatable object"):
            parse(bytes(data), "exec.ko")


def test_bad_elf_class_is_a_parse_error(tmp_path: Path) -> None:
    data = bytearray(module_bytes(RICH, tmp_path))
    data[4] = 3
    with pytest.raises(ModuleParseError, match="unknown ELF class"):
        parse_module(bytes(data), "x.ko")


def test_object_without_modinfo_is_not_a_module(tmp_path: Path) -> None:
    path = build_module(ModSpec("bare", with_modinfo=False, exports=("f",)), tmp_path)
    for parse in (parse_module, parse_module_reference):
        with pytest.raises(ModuleParseError, match=r"no \.modinfo section") as caught:
            parse(path.read_bytes(), str(path))
        assert caught.value.path == str(path)
    with raises_naming(path):
        read_module(path)


def elf64_header(data: bytes) -> tuple[int, int, int, int]:
    """(e_shoff, e_shentsize, e_shnum, e_shstrndx) of a little-endian ELF64 file."""
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    return shoff, shentsize, shnum, shstrndx


def section_index(data: bytes, wanted: bytes) -> int:
    shoff, shentsize, shnum, shstrndx = elf64_header(data)
    names_off = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)[0]
    for i in range(shnum):
        name_off = struct.unpack_from("<I", data, shoff + i * shentsize)[0]
        start = names_off + name_off
        if data[start : data.index(b"\0", start)] == wanted:
            return i
    raise AssertionError(f"no section {wanted!r}")


def test_truncated_module_is_a_parse_error_at_every_kind_of_offset(tmp_path: Path) -> None:
    data = module_bytes(RICH, tmp_path)
    shoff = elf64_header(data)[0]
    # The header, mid-header, inside sections, inside the section header table, last byte.
    cuts = [1, 4, 5, 16, 40, 52, 63, 64, 200, len(data) // 2, shoff, shoff + 1,
            shoff + 64, len(data) - 64, len(data) - 1]
    for cut in cuts:
        path = write(tmp_path, f"cut{cut}.ko", data[:cut])
        with raises_naming(path):
            read_module(path)
        with pytest.raises(ModuleParseError):
            parse_module_reference(data[:cut], str(path))


@pytest.mark.parametrize(
    ("field", "offset", "fmt", "value"),
    [
        ("e_shoff past EOF", 0x28, "<Q", 1 << 40),
        ("e_shoff maximal", 0x28, "<Q", (1 << 64) - 1),
        ("e_shoff zero", 0x28, "<Q", 0),
        ("e_shnum maximal", 0x3C, "<H", 0xFFFF),
        ("e_shentsize tiny", 0x3A, "<H", 1),
        ("e_shstrndx out of range", 0x3E, "<H", 0xFEFF),
    ],
)
def test_elf_header_pointing_outside_the_file_is_a_parse_error(
    tmp_path: Path, field: str, offset: int, fmt: str, value: int
) -> None:
    data = bytearray(module_bytes(RICH, tmp_path))
    struct.pack_into(fmt, data, offset, value)
    path = write(tmp_path, "bad.ko", bytes(data))
    with raises_naming(path):
        read_module(path)


SECTIONS_READ = [b".modinfo", b".symtab", b".strtab", b".shstrtab", b"__ksymtab_strings"]


def section_past_eof(tmp_path: Path, section: bytes, what: str) -> bytes:
    data = bytearray(module_bytes(RICH, tmp_path))
    shoff, shentsize, _, _ = elf64_header(bytes(data))
    at = shoff + section_index(bytes(data), section) * shentsize
    struct.pack_into("<Q", data, at + (0x18 if what == "offset" else 0x20), len(data) + 4096)
    return bytes(data)


@pytest.mark.parametrize("section", SECTIONS_READ)
@pytest.mark.parametrize("what", ["offset", "size"])
def test_section_running_past_eof_is_a_parse_error(
    tmp_path: Path, section: bytes, what: str
) -> None:
    with pytest.raises(ModuleParseError, match=r"^bad\.ko: "):
        parse_module(section_past_eof(tmp_path, section, what), "bad.ko")


# pyelftools reads a section past EOF as a short byte string; the reference reader must
# refuse such a file just like the fast one.


@pytest.mark.parametrize(
    ("section", "what"),
    [
        (s, w)
        for s in SECTIONS_READ
        for w in ("offset", "size")
    ],
)
def test_reference_reader_refuses_sections_running_past_eof_too(
    tmp_path: Path, section: bytes, what: str
) -> None:
    with pytest.raises(ModuleParseError, match=r"^bad\.ko: "):
        parse_module_reference(section_past_eof(tmp_path, section, what), "bad.ko")


def test_symbol_table_link_out_of_range_is_a_parse_error(tmp_path: Path) -> None:
    data = bytearray(module_bytes(RICH, tmp_path))
    shoff, shentsize, _, _ = elf64_header(bytes(data))
    at = shoff + section_index(bytes(data), b".symtab") * shentsize
    struct.pack_into("<I", data, at + 0x28, 0xFFFF)  # sh_link
    with pytest.raises(ModuleParseError, match=r"^bad\.ko: "):
        parse_module(bytes(data), "bad.ko")


def test_symbol_name_outside_the_string_table_is_a_parse_error(tmp_path: Path) -> None:
    data = bytearray(module_bytes(ModSpec("one", imports=("only_import",)), tmp_path))
    shoff, shentsize, _, _ = elf64_header(bytes(data))
    at = shoff + section_index(bytes(data), b".symtab") * shentsize
    sym_off, sym_size = struct.unpack_from("<QQ", data, at + 0x18)
    for entry in range(sym_off, sym_off + sym_size, 24):
        if struct.unpack_from("<H", data, entry + 6)[0] == 0 and data[entry + 4] >> 4 == 1:
            struct.pack_into("<I", data, entry, 0x7FFFFFFF)  # st_name of the import
    with pytest.raises(ModuleParseError, match=r"^bad\.ko: "):
        parse_module(bytes(data), "bad.ko")


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "truncated to half": lambda b: b[: len(b) // 2],
    "truncated by one byte": lambda b: b[:-1],
    "truncated by four bytes": lambda b: b[:-4],
    "header only": lambda b: b[:6],
    "bytes flipped in the middle": lambda b: (
        b[: len(b) // 3] + bytes(x ^ 0xFF for x in b[len(b) // 3 : len(b) // 3 + 8])
        + b[len(b) // 3 + 8 :]
    ),
    "garbage": lambda b: b"\x00\x01garbage" * 40,
}
# The zstd CLI ends each frame with a 4-byte checksum; a stream cut inside it must be
# reported as truncated.


@pytest.mark.parametrize(
    ("compress", "corruption"),
    [
        (c, k)
        for c in ("xz", "gzip", "zstd")
        for k in CORRUPTIONS
    ],
)
def test_corrupt_compressed_module_is_a_parse_error(
    tmp_path: Path, compress: str, corruption: str
) -> None:
    stream = compress_bytes(module_bytes(RICH, tmp_path), compress)
    bad = CORRUPTIONS[corruption](stream)
    path = write(tmp_path, "bad" + COMPRESS_SUFFIX[compress], bad)
    with raises_naming(path):
        read_module(path)


def test_valid_compressed_stream_of_text_is_not_a_module(tmp_path: Path) -> None:
    # A valid stream whose content is not ELF.
    for compress in ("xz", "gzip", "zstd"):
        path = write(tmp_path, "text" + COMPRESS_SUFFIX[compress],
                     compress_bytes(b"hello world\n" * 100, compress))
        with pytest.raises(ModuleParseError, match="not an ELF file"):
            read_module(path)


def bomb(compress: str, size: int) -> bytes:
    """A small stream that expands to ``size`` zero bytes."""
    if compress == "zstd":
        compressor = zstandard.ZstdCompressor(level=1).compressobj()
        chunk = bytes(1 << 20)
        parts = [compressor.compress(chunk) for _ in range(size >> 20)]
        return b"".join(parts) + compressor.compress(bytes(size & ((1 << 20) - 1))) + \
            compressor.flush()
    if compress == "xz":
        return lzma.compress(bytes(size), check=lzma.CHECK_CRC32)
    return gzip.compress(bytes(size), compresslevel=1)


@pytest.mark.parametrize("compress", ["xz", "gzip", "zstd"])
def test_decompression_bomb_is_refused(
    tmp_path: Path, compress: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real limit is hundreds of MiB; a lowered one proves the mechanism for each format
    # (test_zstd_bomb_beyond_the_real_limit_is_refused covers the real one).
    monkeypatch.setattr(elf, "MAX_MODULE_BYTES", 1 << 20)
    path = write(tmp_path, "bomb" + COMPRESS_SUFFIX[compress], bomb(compress, 3 << 20))
    assert path.stat().st_size < 1 << 16
    with pytest.raises(ModuleParseError, match="decompresses to more than"):
        read_module(path)
    # Exactly at the limit is still read (then rejected as not ELF, being zeros).
    path = write(tmp_path, "edge" + COMPRESS_SUFFIX[compress], bomb(compress, 1 << 20))
    with pytest.raises(ModuleParseError, match="not an ELF file"):
        read_module(path)


@pytest.mark.slow
def test_zstd_bomb_beyond_the_real_limit_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "bomb.ko.zst", bomb("zstd", elf.MAX_MODULE_BYTES + (1 << 20)))
    assert path.stat().st_size < 1 << 20
    with pytest.raises(ModuleParseError, match="decompresses to more than"):
        read_module(path)


def test_oversized_uncompressed_module_is_read_without_loading_it_whole(tmp_path: Path) -> None:
    # A sparse 1 GiB file whose first bytes are a module: mmap, not read().
    path = tmp_path / "huge.ko"
    data = module_bytes(RICH, tmp_path)
    with path.open("wb") as f:
        f.write(data)
        f.truncate(1 << 30)
    assert ordered(read_module(path)) == expected(RICH)


# ---------------------------------------------------------------------------------------
# The Debian cloud kernels: Debian 12's plain .ko files, Debian 13's .ko.xz


def module_files(tree: KernelTree) -> list[Path]:
    return sorted(p for p in tree.moddir.rglob("*.ko*") if p.is_file())


def modinfo_lines(path: Path, field: str) -> list[str]:
    out = subprocess.run(
        [shutil.which("modinfo", path=SBIN_PATH) or "modinfo", "-F", field, str(path)],
        capture_output=True, text=True, check=True,
    ).stdout
    return out.splitlines()


def elf_bytes(path: Path) -> bytes:
    """A module file's ELF bytes, decompressed here with the standard library's lzma (the
    Debian releases ship plain or xz modules), independently of the reader under test."""
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


@pytest.fixture(scope="module")
def cloud_infos(each_cloud_kernel: KernelTree) -> dict[Path, ModuleInfo]:
    return {path: read_module(path) for path in module_files(each_cloud_kernel)}


@pytest.mark.kernel
def test_every_cloud_kernel_module_is_read(cloud_infos: dict[Path, ModuleInfo]) -> None:
    assert len(cloud_infos) > 1000
    for path, info in cloud_infos.items():
        assert info.name == path.name.split(".ko")[0].replace("-", "_")
        assert info.vermagic and info.intree and info.license


@pytest.mark.kernel
def test_cloud_kernel_agrees_with_modinfo(
    cloud_infos: dict[Path, ModuleInfo]
) -> None:
    sample = random.Random(61).sample(sorted(cloud_infos), 50)
    for path in sample:
        info = cloud_infos[path]
        depends = modinfo_lines(path, "depends")
        assert info.depends == tuple(
            d.replace("-", "_") for line in depends for d in line.split(",") if d
        ), path
        assert info.aliases == tuple(modinfo_lines(path, "alias")), path
        assert info.firmware == tuple(dict.fromkeys(modinfo_lines(path, "firmware"))), path


def depmod_pairs(path: Path, prefix: str) -> set[tuple[str, str]]:
    """(key, module) pairs from a depmod output file of ``alias KEY MODULE`` lines."""
    pairs = set()
    for line in path.read_text().splitlines():
        if line.startswith("alias "):
            _, key, module = line.split(" ")
            pairs.add((key.removeprefix(prefix), module))
    return pairs


@pytest.mark.kernel
def test_cloud_kernel_exports_match_depmod(
    each_cloud_kernel: KernelTree, cloud_infos: dict[Path, ModuleInfo]
) -> None:
    # depmod wrote modules.symbols from these files' exports: the whole tree must agree.
    ours = {(s, i.name) for i in cloud_infos.values() for s in i.exports}
    theirs = depmod_pairs(each_cloud_kernel.moddir / "modules.symbols", "symbol:")
    assert len(theirs) > 1000
    assert ours == theirs


@pytest.mark.kernel
def test_cloud_kernel_exports_match_depmod_apart_from_namespace_names(
    each_cloud_kernel: KernelTree, cloud_infos: dict[Path, ModuleInfo]
) -> None:
    ours = {(s, i.name) for i in cloud_infos.values() for s in i.exports}
    theirs = depmod_pairs(each_cloud_kernel.moddir / "modules.symbols", "symbol:")
    assert theirs <= ours
    assert all(sym.isupper() for sym, _ in ours - theirs), ours - theirs


@pytest.mark.kernel
def test_cloud_kernel_aliases_match_depmod(
    each_cloud_kernel: KernelTree, cloud_infos: dict[Path, ModuleInfo]
) -> None:
    # depmod wrote modules.alias from the same .modinfo sections.
    ours = {(a, i.name) for i in cloud_infos.values() for a in i.aliases}
    theirs = depmod_pairs(each_cloud_kernel.moddir / "modules.alias", "")
    assert len(theirs) > 1000
    assert ours == theirs


@pytest.mark.kernel
def test_cloud_kernel_fast_reader_agrees_with_pyelftools(
    cloud_infos: dict[Path, ModuleInfo],
) -> None:
    for path in random.Random(62).sample(sorted(cloud_infos), 100):
        data = elf_bytes(path)
        reference = parse_module_reference(data, str(path))
        assert parse_module(data, str(path)) == reference == cloud_infos[path]


@pytest.mark.kernel
@pytest.mark.parametrize("compress", ["xz", "gzip", "zstd"])
def test_recompressed_cloud_modules_read_the_same(
    tmp_path: Path, compress: str, cloud_infos: dict[Path, ModuleInfo]
) -> None:
    for path in random.Random(63).sample(sorted(cloud_infos), 5):
        name = path.name.split(".ko")[0] + COMPRESS_SUFFIX[compress]
        packed = write(tmp_path, name, compress_bytes(elf_bytes(path), compress))
        assert read_module(packed) == cloud_infos[path]
