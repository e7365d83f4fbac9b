"""The kernel's own (vmlinux) exported symbols: read from Module.symvers, ``symvers*`` in
the module dir or a real System.map, else derived from a complete tree."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from ..elf import ModuleInfo
from ..inputs import MAX_KERNEL_METADATA_BYTES, read_compressed_input
from .discover import _Stat

# Parsed symbol lists by "exports:PATH": (the file's (size, mtime_ns, inode), its symbols).
_ExportsMemo = dict[str, tuple[_Stat, frozenset[str]]]


def read_kernel_exports(
    root: Path, kernel: str, moddir: Path, symvers: Path | None = None,
    memo: _ExportsMemo | None = None,
) -> tuple[frozenset[str], str] | None:
    """The kernel's (vmlinux) exported symbols from the best source the root has.

    Order: an explicit Module.symvers, ``symvers.xz``/``symvers.gz``/``symvers`` in the
    module dir (Fedora), a real ``/boot/System.map-KVER`` (Debian's is a one-line stub),
    ``/usr/src/linux-headers-KVER/Module.symvers`` (Debian headers). None if none exists.
    ``memo`` (part of the index cache) remembers parsed files by (size, mtime_ns, inode).
    """
    headers = root / "usr" / "src" / f"linux-headers-{kernel}" / "Module.symvers"
    candidates: list[tuple[Path, Callable[[str], list[str]], str]] = []
    if symvers is not None:
        candidates.append((symvers, _parse_symvers, f"symvers:{symvers}"))
    for name in ("symvers.xz", "symvers.gz", "symvers"):
        candidates.append((moddir / name, _parse_symvers, f"symvers:{moddir / name}"))
    candidates.append((root / "boot" / f"System.map-{kernel}", _parse_system_map,
                       f"System.map:/boot/System.map-{kernel}"))
    candidates.append((headers, _parse_symvers, f"symvers:{headers}"))
    for path, parser, source in candidates:
        try:
            st = path.stat()
        except OSError:
            continue
        key = f"exports:{path}"
        stat = (st.st_size, st.st_mtime_ns, st.st_ino)
        hit = memo.get(key) if memo is not None else None
        if hit is not None and hit[0] == stat:
            syms = hit[1]
        else:
            syms = frozenset(parser(_read_maybe_compressed(path)))
            if memo is not None:
                memo[key] = (stat, syms)
        if syms:
            return syms, source
    return None


def _parse_system_map(text: str) -> list[str]:
    # depmod -F takes the "__ksymtab_NAME" symbols of a System.map as the kernel's exports.
    syms = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2].startswith("__ksymtab_"):
            syms.append(fields[2][10:])
    return syms


def _read_maybe_compressed(path: Path) -> str:
    """A kernel symbol list, decompressed (``.xz``, ``.gz``). Raises InputError for an
    unreadable, corrupt or non-regular file, or one over MAX_KERNEL_METADATA_BYTES."""
    raw = read_compressed_input(path, limit=MAX_KERNEL_METADATA_BYTES,
                                what="kernel symbol list")
    return raw.decode("utf-8", "replace")


def _parse_symvers(text: str) -> list[str]:
    # "0xCRC<TAB>symbol<TAB>vmlinux<TAB>EXPORT_SYMBOL[_GPL]<TAB>namespace"
    syms = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[2] == "vmlinux":
            syms.append(fields[1])
    return syms


def derived_kernel_exports(infos: Iterable[ModuleInfo]) -> frozenset[str]:
    """What the kernel must export, judged from a complete tree: every symbol some module
    imports that no module exports. Only valid on an untrimmed tree."""
    infos = list(infos)
    exported: set[str] = set()
    for info in infos:
        exported.update(info.exports)
    needed: set[str] = set()
    for info in infos:
        needed.update(info.undefined)
    return frozenset(needed - exported)
