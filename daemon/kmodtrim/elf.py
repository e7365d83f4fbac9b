"""Read one kernel module file: its modinfo and its exported and undefined symbols.

Two readers give the same answer:

* ``parse_module`` reads only the few ELF structures a module's metadata lives in (the
  section header table, ``.modinfo``, ``__ksymtab_strings``, ``.symtab``/``.strtab``) with
  ``struct``. It is the one the index uses: a whole 4,000-module tree in about the time
  ``depmod`` takes.
* ``parse_module_reference`` does the same through pyelftools' full ELF model. It is ~20×
  slower and is kept as the reference the fast reader is tested against, and for anyone who
  wants a second opinion on a strange file.

Both raise :class:`ModuleParseError` for anything that is not a well-formed module, never
another exception: a module tree is input, and input can be broken.
"""

from __future__ import annotations

import io
import mmap
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from . import inputs
from .errors import ModuleParseError
from .names import compression_of, module_name_from_path, normalize

# A module file, or a decompressed one, larger than this is treated as malformed (a
# "bomb"), not read. Declared in inputs with the other caps; a module global here so that
# tests can lower it.
MAX_MODULE_BYTES = inputs.MAX_MODULE_BYTES
_WHAT = "kernel module"

_SHN_UNDEF = 0
_SHN_LORESERVE = 0xFF00
_SHN_XINDEX = 0xFFFF
_SHT_SYMTAB = 2
_SHT_NOBITS = 8
_STB_GLOBAL = 1
_STB_WEAK = 2
_ET_REL = 1


@dataclass(frozen=True, slots=True)
class ModuleInfo:
    """What one module file says about itself. Names are normalised (``-`` → ``_``)."""

    name: str
    depends: tuple[str, ...] = ()
    softdep_pre: tuple[str, ...] = ()
    softdep_post: tuple[str, ...] = ()
    weakdeps: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    firmware: tuple[str, ...] = ()
    vermagic: str = ""
    intree: bool = False
    license: str = ""
    exports: tuple[str, ...] = ()
    undefined: tuple[str, ...] = ()
    weak_undefined: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------
# Decompression


def decompress(data: bytes, compression: str | None, origin: str) -> bytes:
    """Decompress a module's bytes (``xz``, ``gzip``, ``zstd`` or None for as-is), streamed
    so that no more than MAX_MODULE_BYTES (+1) is ever produced.

    Raises ModuleParseError for a corrupt or truncated stream, or one that would expand
    beyond MAX_MODULE_BYTES.
    """
    if compression is None:
        return data
    return inputs.decompress_bounded(data, compression, limit=MAX_MODULE_BYTES, what=_WHAT,
                                     shown=origin, error=ModuleParseError)


def read_module_bytes(path: str | os.PathLike[str]) -> bytes:
    """The uncompressed ELF bytes of a module file. Raises ModuleParseError, also for a
    file that is not a regular one (a FIFO is never opened) or is over MAX_MODULE_BYTES."""
    origin = os.fspath(path)
    raw = inputs.read_input(origin, limit=MAX_MODULE_BYTES, what=_WHAT,
                            error=ModuleParseError)
    return decompress(raw, compression_of(origin), origin)


def read_module(path: str | os.PathLike[str]) -> ModuleInfo:
    """Read a module file (``.ko``, ``.ko.xz``, ``.ko.gz``, ``.ko.zst``).

    Raises ModuleParseError (naming the file) for an unreadable, malformed, truncated or
    non-ELF file, and for one that is not a regular file (never opened: a FIFO would
    block).
    """
    origin = os.fspath(path)
    if compression_of(origin) is not None:
        return parse_module(read_module_bytes(origin), origin)
    # Uncompressed: map the file and touch only the pages the metadata lives in. Mapping
    # allocates nothing, so the file's size is not capped; what parsing copies out of it
    # is (see _parse_fast).
    fd = inputs.open_input(origin, limit=None, what=_WHAT, error=ModuleParseError)
    try:
        if os.fstat(fd).st_size == 0:
            raise ModuleParseError(origin, "empty file")
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as view:
            return parse_module(view, origin)
    except OSError as exc:
        raise ModuleParseError(origin, exc.strerror or str(exc)) from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# modinfo


def parse_softdep(value: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split a softdep value ``"pre: a b post: c"`` into normalised (pre, post) names."""
    pre: list[str] = []
    post: list[str] = []
    target: list[str] | None = None
    for word in value.split():
        if word == "pre:":
            target = pre
        elif word == "post:":
            target = post
        elif target is not None:
            target.append(normalize(word))
    return tuple(pre), tuple(post)


def _split_words(value: str) -> list[str]:
    return value.replace(",", " ").split()


def info_from_modinfo(
    entries: Iterable[tuple[str, str]],
    origin: str,
    exports: tuple[str, ...],
    undefined: tuple[str, ...],
    weak_undefined: tuple[str, ...],
) -> ModuleInfo:
    """Build a ModuleInfo from ``key=value`` modinfo entries (shared by both readers)."""
    name = ""
    depends: list[str] = []
    pre: list[str] = []
    post: list[str] = []
    weak: list[str] = []
    aliases: list[str] = []
    firmware: list[str] = []
    vermagic = ""
    intree = False
    license_ = ""
    for key, value in entries:
        if key == "name":
            name = value
        elif key == "depends":
            depends.extend(normalize(d) for d in value.split(",") if d)
        elif key == "softdep":
            more_pre, more_post = parse_softdep(value)
            pre.extend(more_pre)
            post.extend(more_post)
        elif key == "weakdep":
            weak.extend(normalize(w) for w in _split_words(value))
        elif key == "alias":
            aliases.append(value)
        elif key == "firmware":
            firmware.append(value)
        elif key == "vermagic":
            vermagic = value
        elif key == "intree":
            intree = value == "Y"
        elif key == "license":
            license_ = value
    if not name:
        from_path = module_name_from_path(origin)
        if from_path is None:
            raise ModuleParseError(origin, "no name= in .modinfo and not a module file name")
        name = from_path
    return ModuleInfo(
        name=normalize(name),
        depends=tuple(dict.fromkeys(depends)),
        softdep_pre=tuple(dict.fromkeys(pre)),
        softdep_post=tuple(dict.fromkeys(post)),
        weakdeps=tuple(dict.fromkeys(weak)),
        aliases=tuple(aliases),
        firmware=tuple(dict.fromkeys(firmware)),
        vermagic=vermagic,
        intree=intree,
        license=license_,
        exports=exports,
        undefined=undefined,
        weak_undefined=weak_undefined,
    )


def _modinfo_entries(raw: bytes) -> list[tuple[str, str]]:
    entries = []
    for item in raw.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep:
            entries.append((key, value))
    return entries


def _strings(raw: bytes, skip_offsets: set[int] | frozenset[int] = frozenset()) -> tuple[str, ...]:
    """NUL-separated strings, leaving out those starting at ``skip_offsets``."""
    if not skip_offsets:
        return tuple(s.decode("utf-8", "replace") for s in raw.split(b"\0") if s)
    found = []
    offset = 0
    for item in raw.split(b"\0"):
        if item and offset not in skip_offsets:
            found.append(item.decode("utf-8", "replace"))
        offset += len(item) + 1
    return tuple(found)


# ---------------------------------------------------------------------------------------
# Fast reader


class _Layout:
    """struct formats for one ELF class and byte order."""

    def __init__(self, is64: bool, little: bool) -> None:
        e = "<" if little else ">"
        self.is64 = is64
        if is64:
            self.header = struct.Struct(e + "HHIQQQIHHHHHH")  # from e_type on
            self.section = struct.Struct(e + "IIQQQQIIQQ")
            self.symbol = struct.Struct(e + "IBBHQQ")
            self.sym_fields = (0, 1, 3)  # name, info, shndx
            self.sym_value = 4
        else:
            self.header = struct.Struct(e + "HHIIIIIHHHHHH")
            self.section = struct.Struct(e + "IIIIIIIIII")
            self.symbol = struct.Struct(e + "IIIBBH")
            self.sym_fields = (0, 3, 5)
            self.sym_value = 1


_LAYOUTS = {(c, d): _Layout(c, d) for c in (True, False) for d in (True, False)}


def parse_module(data: bytes | mmap.mmap, origin: str) -> ModuleInfo:
    """Parse uncompressed module bytes (or a read-only map of them).

    Raises ModuleParseError naming ``origin``.
    """
    try:
        return _parse_fast(data, origin)
    except ModuleParseError:
        raise
    except (struct.error, IndexError, ValueError, OverflowError, MemoryError) as exc:
        raise ModuleParseError(origin, f"malformed ELF structure ({exc})") from None


def _parse_fast(data: bytes | mmap.mmap, origin: str) -> ModuleInfo:
    if len(data) < 52 or data[:4] != b"\x7fELF":
        raise ModuleParseError(origin, "not an ELF file")
    if data[4] not in (1, 2) or data[5] not in (1, 2):
        raise ModuleParseError(origin, "unknown ELF class or byte order")
    lay = _LAYOUTS[(data[4] == 2, data[5] == 1)]
    if len(data) < 16 + lay.header.size:
        raise ModuleParseError(origin, "truncated ELF header")
    (e_type, _mach, _ver, _entry, _phoff, shoff, _flags, _ehsize, _phentsize, _phnum,
     shentsize, shnum, shstrndx) = lay.header.unpack_from(data, 16)
    if e_type != _ET_REL:
        raise ModuleParseError(origin, f"not a relocatable object (ELF type {e_type})")
    size = len(data)
    sec = lay.section
    if shoff == 0 or shentsize < sec.size or shoff + sec.size > size:
        raise ModuleParseError(origin, "no section header table")
    if shnum == 0 or shstrndx == _SHN_XINDEX:  # extended numbering lives in section 0
        first = sec.unpack_from(data, shoff)
        shnum = shnum or first[5]
        if shstrndx == _SHN_XINDEX:
            shstrndx = first[6]
    if shoff + shnum * shentsize > size:
        raise ModuleParseError(origin, "section header table runs past the end of the file")
    if shnum * shentsize > MAX_MODULE_BYTES:  # each header becomes a tuple: bound them
        raise ModuleParseError(origin, "section header table is larger than the "
                                       f"{inputs.human_size(MAX_MODULE_BYTES)} limit")
    headers = [sec.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]
    if shstrndx >= shnum:
        raise ModuleParseError(origin, "section name table index out of range")

    def body(index: int) -> tuple[int, int]:
        h = headers[index]
        off, length = h[4], h[5]
        if h[1] == _SHT_NOBITS:
            return 0, 0
        if off + length > size:
            raise ModuleParseError(origin, f"section {index} runs past the end of the file")
        if length > MAX_MODULE_BYTES:  # copied out of a mapped file: bounded like a read
            raise ModuleParseError(origin, f"section {index} is larger than the "
                                           f"{inputs.human_size(MAX_MODULE_BYTES)} limit")
        return off, length

    names_off, names_len = body(shstrndx)
    names_end = names_off + names_len
    wanted = {b".modinfo": -1, b"__ksymtab_strings": -1, b".symtab": -1}
    symtab_index = -1
    has_ksymtab = False  # any __ksymtab* section: exports may need the symtab fallback
    for i, h in enumerate(headers):
        start = names_off + h[0]
        if start >= names_end:
            continue
        end = data.find(b"\0", start, names_end)
        sname = data[start : end if end >= 0 else names_end]
        if sname in wanted:
            wanted[sname] = i
        elif sname.startswith((b"__ksymtab", b"___ksymtab")):
            has_ksymtab = True
        if h[1] == _SHT_SYMTAB and symtab_index < 0:
            symtab_index = i
    if wanted[b".modinfo"] < 0:
        raise ModuleParseError(origin, "no .modinfo section: not a kernel module")
    off, length = body(wanted[b".modinfo"])
    entries = _modinfo_entries(data[off : off + length])
    exports: tuple[str, ...] = ()
    ksymtab_strings = wanted[b"__ksymtab_strings"]
    if ksymtab_strings >= 0:
        off, length = body(ksymtab_strings)
        exports = _strings(data[off : off + length])
    undefined: list[str] = []
    weak_undefined: list[str] = []
    if symtab_index >= 0:
        sym_off, sym_len = body(symtab_index)
        link = headers[symtab_index][6]
        if link >= shnum:
            raise ModuleParseError(origin, "symbol table's string table index out of range")
        str_off, str_len = body(link)
        str_end = str_off + str_len
        entsize = lay.symbol.size
        count = sym_len // entsize
        fname, finfo, fshndx = lay.sym_fields
        symtab = data[sym_off : sym_off + count * entsize]
        # Undefined symbols are global or weak, and ELF puts every local symbol before
        # sh_info: only the tail needs reading.
        first_global = min(headers[symtab_index][7], count)
        for fields in lay.symbol.iter_unpack(symtab[first_global * entsize :]):
            if fields[fshndx] != _SHN_UNDEF or not fields[fname]:
                continue
            bind = fields[finfo] >> 4
            start = str_off + fields[fname]
            if start >= str_end:
                raise ModuleParseError(origin, "symbol name outside the string table")
            end = data.find(b"\0", start, str_end)
            sym = data[start : end if end >= 0 else str_end].decode("utf-8", "replace")
            if bind == _STB_GLOBAL:
                undefined.append(sym)
            elif bind == _STB_WEAK:
                weak_undefined.append(sym)
        if has_ksymtab and ksymtab_strings < 0:
            exports = _ksymtab_symbols(data, lay, symtab, str_off, str_end)
        elif exports and data.find(b"__kstrtabns_", str_off, str_end) >= 0:
            # EXPORT_SYMBOL_NS puts namespace names among the export names; the
            # __kstrtabns_NAME symbols point at them.
            ns_offsets = set()
            for fields in lay.symbol.iter_unpack(symtab):
                if fields[fshndx] != ksymtab_strings:
                    continue
                start = str_off + fields[fname]
                if data.find(b"__kstrtabns_", start, start + 12) == start:
                    ns_offsets.add(fields[lay.sym_value])
            off, length = body(ksymtab_strings)
            exports = _strings(data[off : off + length], ns_offsets)
    return info_from_modinfo(
        entries, origin, exports, tuple(undefined), tuple(weak_undefined)
    )


def _ksymtab_symbols(
    data: bytes | mmap.mmap, lay: _Layout, symtab: bytes, str_off: int, str_end: int
) -> tuple[str, ...]:
    """Exports of a module without ``__ksymtab_strings``: its ``__ksymtab_NAME`` symbols
    (what kmod falls back to)."""
    fname, _finfo, fshndx = lay.sym_fields
    found: list[str] = []
    for fields in lay.symbol.iter_unpack(symtab):
        if fields[fshndx] == _SHN_UNDEF or fields[fshndx] >= _SHN_LORESERVE:
            continue
        start = str_off + fields[fname]
        if start >= str_end or data[start : start + 10] != b"__ksymtab_":
            continue
        end = data.find(b"\0", start, str_end)
        sym = data[start + 10 : end if end >= 0 else str_end].decode("utf-8", "replace")
        if sym and not sym.startswith(("strings", "gpl")):
            found.append(sym)
    return tuple(found)


# ---------------------------------------------------------------------------------------
# Reference reader (pyelftools)


def parse_module_reference(data: bytes, origin: str) -> ModuleInfo:
    """Parse uncompressed module bytes with pyelftools; same result as parse_module.

    Raises ModuleParseError naming ``origin``.
    """
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_type"] != "ET_REL":
            raise ModuleParseError(origin, f"not a relocatable object (ELF type {elf['e_type']})")
        for section in elf.iter_sections():
            # pyelftools would hand back short data; a module's sections must be whole.
            if section["sh_type"] != "SHT_NOBITS" and (
                section["sh_offset"] + section["sh_size"] > len(data)
            ):
                raise ModuleParseError(
                    origin, f"section {section.name or '?'} runs past the end of the file"
                )
        modinfo = elf.get_section_by_name(".modinfo")
        if modinfo is None:
            raise ModuleParseError(origin, "no .modinfo section: not a kernel module")
        entries = _modinfo_entries(modinfo.data())
        ksymtab = elf.get_section_by_name("__ksymtab_strings")
        ksymtab_index = next(
            (i for i, sec in enumerate(elf.iter_sections()) if sec.name == "__ksymtab_strings"),
            -1,
        )
        ns_offsets: set[int] = set()
        undefined: list[str] = []
        weak_undefined: list[str] = []
        fallback: list[str] = []
        symtab = next(
            (s for s in elf.iter_sections() if isinstance(s, SymbolTableSection)
             and s["sh_type"] == "SHT_SYMTAB"),
            None,
        )
        if symtab is not None:
            for sym in symtab.iter_symbols():
                shndx = sym["st_shndx"]
                if shndx == "SHN_UNDEF":
                    if not sym.name:
                        continue
                    bind = sym["st_info"]["bind"]
                    if bind == "STB_GLOBAL":
                        undefined.append(sym.name)
                    elif bind == "STB_WEAK":
                        weak_undefined.append(sym.name)
                elif shndx == ksymtab_index and sym.name.startswith("__kstrtabns_"):
                    ns_offsets.add(sym["st_value"])
                elif (
                    isinstance(shndx, int)
                    and sym.name.startswith("__ksymtab_")
                    and not sym.name[10:].startswith(("strings", "gpl"))
                    and len(sym.name) > 10
                ):
                    fallback.append(sym.name[10:])
        exports = _strings(ksymtab.data(), ns_offsets) if ksymtab is not None else ()
        if ksymtab is None and symtab is not None:
            exports = tuple(fallback)
    except ModuleParseError:
        raise
    except (ELFError, struct.error, IndexError, ValueError, KeyError, AttributeError,
            TypeError, OverflowError, AssertionError, UnicodeDecodeError) as exc:
        raise ModuleParseError(origin, f"malformed ELF structure ({exc})") from None
    except Exception as exc:  # pyelftools' construct layer raises its own error types
        raise ModuleParseError(origin, f"malformed ELF structure ({exc})") from None
    return info_from_modinfo(entries, origin, exports, tuple(undefined), tuple(weak_undefined))
