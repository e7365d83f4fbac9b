"""Build real kernel-module-like ELF objects with gcc, and module trees out of them.

A built module is an x86-64 ELF relocatable object laid out like a Linux 6.1 ``.ko``:

* ``.modinfo``: NUL-terminated ``key=value`` strings (license, alias, firmware, softdep,
  weakdep, depends, intree, name, vermagic), as ``MODULE_INFO()`` and modpost emit them;
* exports exactly as 6.1's ``include/linux/export.h`` lays them out on x86-64 (PREL32
  relocations): the name and an empty namespace string in ``__ksymtab_strings``, and a
  ``struct kernel_symbol`` of three 32-bit place-relative offsets in ``___ksymtab+NAME``
  (``___ksymtab_gpl+NAME`` for GPL exports), which the kernel's ``scripts/module.lds``
  merges into ``__ksymtab``/``__ksymtab_gpl`` at ``ld -r`` time — done here the same way;
* imports as calls to ``extern`` functions (undefined GLOBAL symbols) and weak imports as
  ``extern __attribute__((weak))`` (undefined WEAK symbols);
* ``.gnu.linkonce.this_module`` holding an 896-byte ``struct module`` with the name at
  offset 24, as in Debian's 6.1 kernels.

kmod's ``modinfo``, ``depmod`` and ``modprobe`` accept these files (tests/test_modbuild.py
proves it). Builds are cached in memory by spec, per test session: gcc costs ~30 ms a module.
"""

from __future__ import annotations

import hashlib
import re
import struct
import subprocess
import tempfile
import threading
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "COMPRESS_SUFFIX",
    "ModSpec",
    "build_module",
    "build_tree",
    "compress_bytes",
    "module_bytes",
    "swap_elf_byte_order",
    "symbol_crc",
    "write_symvers",
    "write_system_map",
]

# Layout constants of Debian's 6.1 x86-64 ``struct module``.
THIS_MODULE_SIZE = 896
THIS_MODULE_NAME_OFFSET = 24
MODULE_NAME_LEN = 56

CFLAGS = (
    "-c", "-x", "c", "-O0", "-std=gnu11",
    "-fno-pic", "-fno-pie", "-mno-red-zone", "-ffreestanding",
    "-fno-common", "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables", "-fcf-protection=none", "-nostdinc", "-w",
)
# Per architecture: extra gcc flags and the ld emulation.
ARCHES: dict[str, tuple[tuple[str, ...], str]] = {
    "x86_64": (("-m64", "-mcmodel=kernel"), "elf_x86_64"),
    "i386": (("-m32",), "elf_i386"),
}

# What ``ld -r -T scripts/module.lds`` does to export tables in a 6.1 kernel build.
MODULE_LDS = """\
SECTIONS {
	/DISCARD/ : { *(.discard) *(.discard.*) *(.note.GNU-stack) }
	__ksymtab 0 : { *(SORT(___ksymtab+*)) }
	__ksymtab_gpl 0 : { *(SORT(___ksymtab_gpl+*)) }
	__kcrctab 0 : { *(SORT(___kcrctab+*)) }
	__kcrctab_gpl 0 : { *(SORT(___kcrctab_gpl+*)) }
}
"""

# The options the kernel's ``make modules_install`` compresses with (scripts/Makefile.modinst).
COMPRESS_COMMANDS: dict[str, tuple[str, ...]] = {
    "xz": ("xz", "--check=crc32", "--lzma2=dict=1MiB", "-c"),
    "gzip": ("gzip", "-n", "-c"),
    "zstd": ("zstd", "-T0", "-q", "-c"),
}
COMPRESS_SUFFIX: dict[str | None, str] = {
    None: ".ko", "xz": ".ko.xz", "gzip": ".ko.gz", "zstd": ".ko.zst",
}

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MODNAME = re.compile(r"^[A-Za-z0-9_-]{1,55}$")


@dataclass(frozen=True)
class ModSpec:
    """What a synthetic module contains. Symbol names must be C identifiers."""

    name: str
    exports: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()
    weak_imports: tuple[str, ...] = ()
    depends: tuple[str, ...] = ()
    softdeps: tuple[str, ...] = ()
    weakdeps: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    firmware: tuple[str, ...] = ()
    license: str = "GPL"
    vermagic: str = "6.1.0-test SMP preempt mod_unload modversions "
    intree: bool = True
    extra_modinfo: tuple[tuple[str, str], ...] = ()
    # Exports made with EXPORT_SYMBOL_GPL (into __ksymtab_gpl) rather than EXPORT_SYMBOL.
    gpl_exports: tuple[str, ...] = ()
    # modpost writes ``name=KBUILD_MODNAME`` (always with underscores); here the name is
    # written as spelled, so readers' normalisation is exercised. False leaves it out (older
    # kernels did not write it), so readers must take the name from the file name.
    write_name: bool = True
    # Without this the module has no .modinfo section at all (a plain object file).
    with_modinfo: bool = True
    # CONFIG_MODVERSIONS: a ``__versions`` entry (CRC from symbol_crc) for every import,
    # so ``depmod -e -E Module.symvers`` (see write_symvers) checks versions too, and a
    # ``__crc_NAME`` symbol in ``__kcrctab`` for every export (kmod takes a module's
    # exports from those when there are any, else from ``__ksymtab_strings``).
    modversions: bool = False
    # EXPORT_SYMBOL_NS: the namespace string stored after each export's name in
    # ``__ksymtab_strings`` (empty: no namespace).
    export_ns: str = ""
    # "x86_64" (ELF64) or "i386" (ELF32, as a 32-bit kernel's modules are).
    arch: str = "x86_64"

    def modinfo(self) -> tuple[tuple[str, str], ...]:
        """The ``.modinfo`` entries in the order a 6.1 build writes them."""
        entries: list[tuple[str, str]] = []
        if self.license:
            entries.append(("license", self.license))
        entries.extend(self.extra_modinfo)
        entries.extend(("alias", a) for a in self.aliases)
        entries.extend(("firmware", f) for f in self.firmware)
        entries.extend(("softdep", s) for s in self.softdeps)
        entries.extend(("weakdep", w) for w in self.weakdeps)
        entries.append(("depends", ",".join(self.depends)))
        entries.append(("retpoline", "Y"))
        if self.intree:
            entries.append(("intree", "Y"))
        if self.write_name:
            entries.append(("name", self.name))
        entries.append(("vermagic", self.vermagic))
        return tuple(entries)

    def validate(self) -> None:
        """Raise ValueError if gcc could not build this spec faithfully."""
        if self.arch not in ARCHES:
            raise ValueError(f"arch {self.arch!r} is not one of {sorted(ARCHES)}")
        if not _MODNAME.match(self.name):
            raise ValueError(f"module name {self.name!r} is not a valid module name")
        symbols = self.exports + self.gpl_exports + self.imports + self.weak_imports
        for sym in symbols:
            if not _IDENT.match(sym) or sym in ("init_module", "cleanup_module"):
                raise ValueError(f"symbol {sym!r} is not a usable C identifier")
        if len(set(symbols)) != len(symbols):
            raise ValueError(f"module {self.name}: a symbol is listed twice: {symbols}")
        if not re.match(r"^[A-Za-z0-9_]*$", self.export_ns):
            raise ValueError(f"namespace {self.export_ns!r} is not a C identifier")
        for key, value in self.modinfo():
            if "\0" in key + value or "=" in key:
                raise ValueError(f"modinfo {key}={value!r} cannot be encoded")


def _c_string(text: str) -> str:
    """A C string literal for ``text`` (UTF-8), every unusual byte as a 3-digit octal escape."""
    out = []
    for byte in text.encode():
        ch = chr(byte)
        if (ch.isascii() and ch.isalnum()) or ch in " _-.,:/*?[]!@#$%^&()+=<>;'{}|~`":
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def c_source(spec: ModSpec) -> str:
    """The C translation unit for a spec (the module body and its ``.mod.c`` in one)."""
    lines = ["typedef unsigned long size_t;"]
    for i, (key, value) in enumerate(spec.modinfo() if spec.with_modinfo else ()):
        lines.append(
            f"static const char __UNIQUE_ID_modinfo{i}[] "
            f'__attribute__((section(".modinfo"), used, aligned(1))) = '
            f"{_c_string(f'{key}={value}')};"
        )
    for sym in spec.imports:
        lines.append(f"extern int {sym}(void);")
    for sym in spec.weak_imports:
        lines.append(f"extern int {sym}(void) __attribute__((weak));")
    for sym, sec in [(s, "") for s in spec.exports] + [(s, "_gpl") for s in spec.gpl_exports]:
        lines.append(f"int {sym}(void) {{ return {len(sym)}; }}")
        # include/linux/export.h (6.1), ___EXPORT_SYMBOL + __KSYMTAB_ENTRY with PREL32.
        lines.append(
            f"static void * const __UNIQUE_ID___addressable_{sym} "
            f'__attribute__((section(".discard.addressable"), used)) = (void *)&{sym};'
        )
        lines.append(
            "asm(\""
            '\\t.section \\"__ksymtab_strings\\",\\"aMS\\",%progbits,1\\n'
            f"__kstrtab_{sym}:\\n"
            f'\\t.asciz \\"{sym}\\"\\n'
            f"__kstrtabns_{sym}:\\n"
            f'\\t.asciz \\"{spec.export_ns}\\"\\n'
            "\\t.previous\\n"
            f'\\t.section \\"___ksymtab{sec}+{sym}\\", \\"a\\"\\n'
            "\\t.balign 4\\n"
            f"__ksymtab_{sym}:\\n"
            f"\\t.long {sym} - .\\n"
            f"\\t.long __kstrtab_{sym} - .\\n"
            f"\\t.long __kstrtabns_{sym} - .\\n"
            "\\t.previous\\n"
            "\");"
        )
        if spec.modversions:
            # modpost's SYMBOL_CRC() in the .mod.c of a 6.1 build.
            lines.append(
                f'asm("\\t.section \\"___kcrctab{sec}+{sym}\\", \\"a\\"\\n'
                f"\\t.balign 4\\n__crc_{sym}:\\n\\t.long {symbol_crc(sym):#x}\\n"
                '\\t.previous\\n");'
            )
    body = [f"\tr += {sym}();" for sym in spec.imports]
    body += [f"\tif ({sym}) r += {sym}();" for sym in spec.weak_imports]
    if spec.modversions:
        # struct modversion_info { unsigned long crc; char name[64 - sizeof(long)]; }
        lines.append(
            "struct modversion_info { unsigned long crc; char name[64 - sizeof(long)]; };"
        )
        for i, sym in enumerate(spec.imports + spec.weak_imports):
            lines.append(
                f"static const struct modversion_info __versions_{i} "
                '__attribute__((section("__versions"), used, aligned(8))) = '
                f'{{ {symbol_crc(sym):#x}UL, "{sym}" }};'
            )
    lines.append("int init_module(void) {\n\tint r = 0;\n" + "\n".join(body) + "\n\treturn r;\n}")
    lines.append("void cleanup_module(void) { }")
    name = spec.name.replace("-", "_").encode()
    padded = (
        b"\0" * THIS_MODULE_NAME_OFFSET
        + name
        + b"\0" * (THIS_MODULE_SIZE - THIS_MODULE_NAME_OFFSET - len(name))
    )
    lines.append(
        "struct module { unsigned char bytes[" + str(THIS_MODULE_SIZE) + "]; };\n"
        "struct module __this_module "
        '__attribute__((section(".gnu.linkonce.this_module"), aligned(64), used)) = '
        "{ { " + ", ".join(str(b) for b in padded) + " } };"
    )
    return "\n".join(lines) + "\n"


def symbol_crc(symbol: str) -> int:
    """The modversions CRC built modules record for ``symbol`` (any fixed function will do)."""
    return zlib.crc32(symbol.encode())


def write_symvers(path: Path, symbols: Iterable[str], *, module: str = "vmlinux") -> Path:
    """Write a ``Module.symvers`` exporting ``symbols`` from ``module`` with symbol_crc CRCs."""
    path.write_text(
        "".join(f"{symbol_crc(s):#010x}\t{s}\t{module}\tEXPORT_SYMBOL\t\n" for s in symbols)
    )
    return path


def write_system_map(path: Path, symbols: Iterable[str]) -> Path:
    """Write a ``System.map`` in which the kernel exports ``symbols``.

    depmod only believes ``__ksymtab_NAME`` lines, so each symbol gets one (plus its text line).
    """
    lines = []
    for i, sym in enumerate(symbols):
        lines.append(f"{0xFFFFFFFF81000000 + 16 * i:016x} T {sym}\n")
        lines.append(f"{0xFFFFFFFF82000000 + 16 * i:016x} r __ksymtab_{sym}\n")
    path.write_text("".join(lines))
    return path


def _spec_key(spec: ModSpec) -> str:
    return hashlib.sha256(repr(spec).encode()).hexdigest()


_cache: dict[tuple[str, str | None], bytes] = {}
_cache_lock = threading.Lock()


def _compile(spec: ModSpec, scratch: Path) -> bytes:
    source = scratch / "mod.c"
    obj = scratch / "mod.o"
    lds = scratch / "module.lds"
    ko = scratch / "mod.ko"
    source.write_text(c_source(spec))
    lds.write_text(MODULE_LDS)
    arch_flags, emulation = ARCHES[spec.arch]
    for argv in (
        ["gcc", *CFLAGS, *arch_flags, "-o", str(obj), str(source)],
        ["ld", "-r", "-m", emulation, "-T", str(lds), "-o", str(ko), str(obj)],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed for module {spec.name}: {proc.stderr}")
    return ko.read_bytes()


def compress_bytes(data: bytes, compress: str) -> bytes:
    """Compress with the real tool and the options ``make modules_install`` uses."""
    if compress not in COMPRESS_COMMANDS:
        raise ValueError(f"unknown compression {compress!r}: one of {sorted(COMPRESS_COMMANDS)}")
    proc = subprocess.run(
        list(COMPRESS_COMMANDS[compress]), input=data, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{compress} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def module_bytes(spec: ModSpec, scratch_parent: Path, *, compress: str | None = None) -> bytes:
    """The bytes of the built module (compressed if asked), from the cache when possible.

    ``scratch_parent`` is where gcc's temporary files go (removed before returning).
    """
    spec.validate()
    key = _spec_key(spec)
    with _cache_lock:
        cached = _cache.get((key, compress))
    if cached is not None:
        return cached
    with _cache_lock:
        raw = _cache.get((key, None))
    if raw is None:
        with tempfile.TemporaryDirectory(prefix=".modbuild-", dir=scratch_parent) as tmp:
            raw = _compile(spec, Path(tmp))
        with _cache_lock:
            _cache[(key, None)] = raw
    if compress is None:
        return raw
    packed = compress_bytes(raw, compress)
    with _cache_lock:
        _cache[(key, compress)] = packed
    return packed


def build_module(
    spec: ModSpec, dest_dir: Path, *, compress: str | None = None, filename: str | None = None
) -> Path:
    """Write ``dest_dir/NAME.ko`` (``.ko.xz``/``.ko.gz``/``.ko.zst`` when compressed).

    ``filename`` overrides the file name. Raises ValueError for an unbuildable spec and
    RuntimeError if gcc, ld or the compressor fails.
    """
    if compress not in COMPRESS_SUFFIX:
        raise ValueError(f"unknown compression {compress!r}")
    dest_dir.mkdir(parents=True, exist_ok=True)
    data = module_bytes(spec, dest_dir, compress=compress)
    path = dest_dir / (filename or spec.name + COMPRESS_SUFFIX[compress])
    path.write_bytes(data)
    return path


def build_tree(
    root: Path,
    kver: str,
    specs: Iterable[ModSpec],
    *,
    subdir: str = "kernel/drivers/test",
    builtin: Iterable[str | ModSpec] = (),
    compress: str | None = None,
) -> Path:
    """A module tree ``root/lib/modules/KVER`` as a kernel package installs it.

    Loadable modules go to ``SUBDIR/NAME.ko[.xz|.gz|.zst]``; ``builtin`` modules (names, or
    specs whose modinfo to record) are listed in ``modules.builtin`` and
    ``modules.builtin.modinfo`` and get no file. ``modules.order`` lists the loadable ones.
    No ``modules.dep``: run depmod for that, as a package's postinst does. Returns the
    module directory.
    """
    moddir = root / "lib" / "modules" / kver
    target = moddir / subdir
    target.mkdir(parents=True, exist_ok=True)
    spec_list = list(specs)
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda s: build_module(s, target, compress=compress), spec_list))
    order = [f"{subdir}/{s.name}.ko" for s in spec_list]
    (moddir / "modules.order").write_text("".join(line + "\n" for line in order))
    builtin_specs = [b if isinstance(b, ModSpec) else ModSpec(b) for b in builtin]
    (moddir / "modules.builtin").write_text(
        "".join(f"{subdir}/{b.name}.ko\n" for b in builtin_specs)
    )
    modinfo = bytearray()
    for b in builtin_specs:
        kbuild_name = b.name.replace("-", "_")
        for key, value in b.modinfo():
            # Built-in modules have no vermagic/name/depends/retpoline/intree in the file.
            if key in ("vermagic", "name", "depends", "retpoline", "intree"):
                continue
            modinfo += f"{kbuild_name}.{key}={value}".encode() + b"\0"
    (moddir / "modules.builtin.modinfo").write_bytes(bytes(modinfo))
    return moddir


_SHT_SYMTAB, _SHT_RELA, _SHT_REL, _SHT_DYNSYM = 2, 4, 9, 11


def swap_elf_byte_order(data: bytes, *, machine: int | None = None) -> bytes:
    """The same relocatable ELF with the other byte order (EI_DATA flipped).

    Rewrites every structure an ELF reader interprets — the file header, the section header
    table, symbol tables and relocations — so the result is a valid big-endian (or
    little-endian) object that ``readelf`` and pyelftools read the same as the original.
    Section contents that are byte strings (``.modinfo``, string tables) need no change;
    code and other data are left as they are. ``machine`` replaces e_machine (e.g. 22 for
    s390, a big-endian architecture). gcc cannot target a big-endian machine here without a
    cross compiler, hence this.
    """
    is64 = data[4] == 2
    src = "<" if data[5] == 1 else ">"
    dst = ">" if src == "<" else "<"
    out = bytearray(data)
    out[5] = 2 if data[5] == 1 else 1
    addr = "Q" if is64 else "I"
    header = "HHI" + addr * 3 + "IHHHHHH"

    def swap(fmt: str, offset: int) -> tuple[int, ...]:
        fields = struct.unpack_from(src + fmt, data, offset)
        struct.pack_into(dst + fmt, out, offset, *fields)
        return fields

    fields = swap(header, 16)
    if machine is not None:
        struct.pack_into(dst + "H", out, 18, machine)
    shoff, shentsize, shnum = fields[5], fields[10], fields[11]
    section = "IIQQQQIIQQ" if is64 else "IIIIIIIIII"
    symbol = "IBBHQQ" if is64 else "IIIBBH"
    rela = "QQq" if is64 else "IIi"
    rel = "QQ" if is64 else "II"
    for i in range(shnum):
        sh = swap(section, shoff + i * shentsize)
        kind, offset, size = sh[1], sh[4], sh[5]
        entry = {_SHT_SYMTAB: symbol, _SHT_DYNSYM: symbol, _SHT_RELA: rela, _SHT_REL: rel}.get(
            kind
        )
        if entry is None:
            continue
        step = struct.calcsize(src + entry)
        for at in range(offset, offset + size - step + 1, step):
            swap(entry, at)
    return bytes(out)


def scratch_root(root: Path, kver: str, specs: Iterable[ModSpec], *, policy: str) -> Path:
    """A root holding a built module tree, ``policy`` as ROOT/etc/kmodtrim/policy.toml and
    the modules.* files of a real ``depmod`` run: what most kmodtrim tests start from."""
    build_tree(root, kver, specs)
    policy_file = root / "etc/kmodtrim/policy.toml"
    policy_file.parent.mkdir(parents=True, exist_ok=True)
    policy_file.write_text(policy)
    subprocess.run(["depmod", "-b", str(root), kver], check=True, capture_output=True)
    return root
