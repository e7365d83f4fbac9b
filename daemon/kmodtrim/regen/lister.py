"""Reading an initramfs image: the kernel modules it contains, from its cpio segments
(plain or gzip, xz, lzma, bzip2, zstd compressed), with ``lsinitramfs`` only for lz4/lzo."""

from __future__ import annotations

import bz2
import lzma
import re
import shutil
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from ..names import module_name_from_path, normalize
from ..run import run
from .errors import InitramfsError


def list_initramfs(image: Path) -> set[str]:
    """The normalised names of the kernel modules contained in an initramfs image.

    Reads the cpio segments itself (see the module docstring); lz4/lzo-compressed
    segments are listed with ``lsinitramfs``.  Raises InitramfsError when the image cannot
    be read or is not an initramfs.
    """
    try:
        paths = _cpio_paths_of_file(image)
    except _NeedsExternalLister:
        paths = _external_paths(image)
    names: set[str] = set()
    for path in paths:
        # Only the module tree counts; a stray .ko elsewhere is not loadable by modprobe.
        if "lib/modules/" in path:
            name = module_name_from_path(path)
            if name is not None:
                names.add(name)
    return names


def verify_initramfs(image: Path, required: Iterable[str]) -> list[str]:
    """The required module names (normalised, sorted) that image does not contain.

    Raises InitramfsError when the image cannot be read.
    """
    present = list_initramfs(image)
    return sorted({normalize(name) for name in required} - present)


class _NeedsExternalLister(Exception):
    """A segment uses a compression the standard library cannot read."""


_CPIO_NEWC = (b"070701", b"070702")
_CPIO_HEADER = 110
_NONZERO = re.compile(rb"[^\x00]")


def _cpio_paths_of_file(image: Path) -> list[str]:
    try:
        data = image.read_bytes()
    except OSError as exc:
        raise InitramfsError(f"{image}: cannot read initramfs image: {exc.strerror}") from exc
    if not data:
        raise InitramfsError(f"{image}: initramfs image is empty")
    try:
        return _segments(data)
    except _BadImage as exc:
        raise InitramfsError(f"{image}: not a readable initramfs: {exc}") from None


class _BadImage(Exception):
    pass


def _segments(data: bytes) -> list[str]:
    """Paths in a sequence of cpio archives, each plain or compressed, zero-padded between."""
    view = memoryview(data)
    paths: list[str] = []
    pos = 0
    seen_archive = False
    while True:
        found = _NONZERO.search(data, pos)
        if found is None:
            break
        pos = found.start()
        magic = bytes(view[pos : pos + 6])
        if magic in _CPIO_NEWC:
            pos = _cpio_archive(view, pos, paths)
        else:
            decompress = _decompressor_for(bytes(view[pos : pos + 6]))
            if decompress is None:
                if not seen_archive:
                    raise _BadImage(f"unknown format at offset {pos} (magic {magic.hex()})")
                # Trailing garbage after valid archives is what the kernel ignores too.
                break
            inner, used = decompress(view[pos:])
            if used <= 0:
                raise _BadImage(f"compressed segment at offset {pos} is empty")
            paths += _segments(inner)
            pos += used
        seen_archive = True
    if not seen_archive:
        raise _BadImage("no cpio archive found")
    return paths


def _cpio_archive(view: memoryview, pos: int, paths: list[str]) -> int:
    """Append the paths of the newc archive at pos (up to its trailer); return its end."""
    end = len(view)
    while True:
        if pos + _CPIO_HEADER > end:
            raise _BadImage(f"truncated cpio header at offset {pos}")
        header = bytes(view[pos : pos + _CPIO_HEADER])
        if header[:6] not in _CPIO_NEWC:
            raise _BadImage(f"bad cpio magic at offset {pos}")
        try:
            filesize = int(header[54:62], 16)
            namesize = int(header[94:102], 16)
        except ValueError:
            raise _BadImage(f"bad cpio header at offset {pos}") from None
        name_start = pos + _CPIO_HEADER
        name_end = name_start + namesize
        if namesize < 1 or name_end > end:
            raise _BadImage(f"bad cpio name size at offset {pos}")
        name = bytes(view[name_start : name_end - 1]).decode("utf-8", "surrogateescape")
        data_start = _align4(name_end)
        pos = _align4(data_start + filesize)
        if name == "TRAILER!!!":
            return min(pos, end)
        if data_start + filesize > end:
            raise _BadImage(f"cpio member {name!r} runs past the end of the image")
        paths.append(name.removeprefix("./").lstrip("/"))


def _align4(n: int) -> int:
    return (n + 3) & ~3


Decompress = Callable[[memoryview], tuple[bytes, int]]


def _decompressor_for(magic: bytes) -> Decompress | None:
    if magic.startswith(b"\x1f\x8b"):
        return lambda buf: _stream(zlib.decompressobj(wbits=31), buf, "gzip")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lambda buf: _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), buf, "xz")
    if magic.startswith(b"\x5d\x00\x00"):
        return lambda buf: _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), buf, "lzma")
    if magic.startswith(b"BZh"):
        return lambda buf: _stream(bz2.BZ2Decompressor(), buf, "bzip2")
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        import zstandard  # lazily: only zstd images need it

        return lambda buf: _stream(zstandard.ZstdDecompressor().decompressobj(), buf, "zstd")
    if magic.startswith((b"\x02\x21\x4c\x18", b"\x04\x22\x4d\x18", b"\x89LZO")):
        raise _NeedsExternalLister()
    return None


class _Decoder(Protocol):
    def decompress(self, data: memoryview, /) -> bytes: ...


def _stream(decoder: _Decoder, buf: memoryview, kind: str) -> tuple[bytes, int]:
    """Decompress one stream from buf; return its output and how many input bytes it used."""
    try:
        out = decoder.decompress(buf)
    except Exception as exc:  # zlib.error, LZMAError, OSError, ZstdError: all "corrupt"
        raise _BadImage(f"corrupt {kind} segment: {exc}") from None
    eof = getattr(decoder, "eof", True)
    if not eof:
        raise _BadImage(f"truncated {kind} segment")
    unused: bytes = getattr(decoder, "unused_data", b"")
    return out, len(buf) - len(unused)


def _external_paths(image: Path) -> list[str]:
    if shutil.which("lsinitramfs") is None:
        raise InitramfsError(
            f"{image}: initramfs is lz4/lzo-compressed and lsinitramfs is not installed",
            hint="install initramfs-tools-core (and lz4/lzop)",
        )
    done = run(["lsinitramfs", image], check=False, timeout=300)
    if done.returncode != 0 or not done.stdout.strip():
        raise InitramfsError(f"{image}: lsinitramfs could not list it:\n{done.stderr.strip()}")
    return [line.strip().removeprefix("./") for line in done.stdout.splitlines()]
