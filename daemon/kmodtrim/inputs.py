"""Reading input files safely: every file kmodtrim reads goes through here.

Input is untrusted: a path given on the command line or over D-Bus may name ``/dev/zero``,
a FIFO nobody writes to, or a gigabyte file; a compressed file may be a decompression
bomb. So every read has a size cap (the constants below, declared once), non-regular
files (FIFOs, sockets, devices, directories) are refused before they are opened, and
decompression is streamed with a bound on its output. Failures are one-line errors of the
caller's choosing (an :class:`~kmodtrim.errors.InputError` subclass) naming the file and,
for a size, the cap.
"""

from __future__ import annotations

import errno
import lzma
import os
import stat
import zlib
from pathlib import Path
from typing import Any

from .errors import InputError, ModuleParseError

MIB = 1 << 20
# Caps, each with ample headroom over the largest real file of its kind.
# Policy TOML files and modprobe.d files: real ones are a few KiB.
MAX_CONFIG_BYTES = 16 * MIB
# --observed files, /proc/modules, mount tables, fstab, sysfs attributes: a few KiB.
MAX_OBSERVATION_BYTES = 16 * MIB
# Module.symvers, symvers.xz (decompressed), System.map, modules.builtin(.modinfo),
# modules.order: Debian's largest are a few MiB (Module.symvers ~2 MB, System.map ~6 MB).
MAX_KERNEL_METADATA_BYTES = 64 * MIB
# One module file, compressed or decompressed: Debian's largest module is tens of MiB.
MAX_MODULE_BYTES = 256 * MIB
# Input quoted in a message (a rule, a line of an --observed file) is cut to this.
MAX_QUOTED_CHARS = 80

_READ_CHUNK = MIB
_FIRST_READ = 64 << 10
_INPUT_PIECE = 256 << 10
# /dev/null: what systemd and kmod take a symlink to as "this file is masked".
_DEV_NULL = os.makedev(1, 3)


def human_size(n: int) -> str:
    """``16777216`` → ``"16 MiB"`` (whole units where exact, else bytes)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def quote_input(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """``repr(text)`` for a message, cut to its first ``limit`` characters plus ``…`` so
    that a huge line or rule is not echoed whole."""
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + "…"


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, for a message: ``"a FIFO"``, ``"a directory"``…"""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "a regular file" if stat.S_ISREG(mode) else "not a file"


def is_masked(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is (a symlink to) ``/dev/null``: systemd's and kmod's way to mask a
    configuration file, read as empty. Never opens the file."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == _DEV_NULL


class _Refused(Exception):
    """The file is not read: ``reason`` says why (not a regular file, over the cap)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _open_regular(path: str | os.PathLike[str], limit: int | None) -> int:
    """A read-only descriptor of the regular file at ``path`` (symlinks followed).

    Anything else is refused before it is opened — opening a device can have effects (a
    watchdog starts counting) and reading a FIFO blocks — and, should the file be swapped
    after that check, ``O_NONBLOCK`` keeps the open from blocking and a second check on
    the descriptor refuses it. A file whose size is over ``limit`` (if given) is refused.

    Raises OSError for a missing or unreadable file, _Refused otherwise.
    """
    try:
        before = os.stat(path)
        _check(before, limit)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except ValueError as exc:  # a NUL in the path
        raise OSError(errno.EINVAL, str(exc)) from None
    try:
        _check(os.fstat(fd), limit)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check(st: os.stat_result, limit: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _Refused(f"not a regular file ({file_kind(st.st_mode)})")
    if limit is not None and st.st_size > limit:
        raise _Refused(_over(limit))


def _over(limit: int) -> str:
    return f"larger than the {human_size(limit)} limit"


def _bigger(limit: int) -> str:
    return f"decompresses to more than the {human_size(limit)} limit"


def _read(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file, reading until EOF (files in /proc and
    /sys say size 0). Raises OSError, or _Refused beyond ``limit``."""
    fd = _open_regular(path, limit)
    try:
        size = os.fstat(fd).st_size
        chunks: list[bytes] = []
        total = 0
        while True:
            # The first read asks for one byte more than the size, to meet EOF at once
            # (and at least a page-ish amount for /proc files, which say size 0).
            want = max(size + 1, _FIRST_READ) if not chunks else _READ_CHUNK
            chunk = os.read(fd, min(want, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _Refused(_over(limit))
        return b"".join(chunks)
    finally:
        os.close(fd)


def _error(error: type[InputError], shown: str, what: str, reason: str,
           hint: str | None = None) -> InputError:
    if issubclass(error, ModuleParseError):
        return ModuleParseError(shown, reason)
    return error(f"{shown}: cannot read {what}: {reason}",
                 hint=hint or f"give a readable regular file as the {what}")


def open_input(
    path: str | os.PathLike[str], *, limit: int | None, what: str,
    error: type[InputError] = InputError, shown: str | None = None,
) -> int:
    """A read-only descriptor of the regular file at ``path``, for a caller that maps it
    rather than reads it (the caller closes it). ``limit``, if given, caps the file's
    size. Raises ``error`` as read_input does, never opening a file that is not regular.
    """
    shown = os.fspath(path) if shown is None else shown
    try:
        return _open_regular(path, limit)
    except _Refused as exc:
        raise _error(error, shown, what, exc.reason) from None
    except OSError as exc:
        raise _error(error, shown, what, exc.strerror or str(exc)) from None


def read_input(
    path: str | os.PathLike[str], *, limit: int, what: str,
    error: type[InputError] = InputError, shown: str | None = None, hint: str | None = None,
) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them.

    ``what`` names the kind of file in messages (``"policy file"``), ``shown`` the file
    (default: ``path``); ``hint`` replaces the error's default hint. Raises ``error`` (an
    InputError subclass; for ModuleParseError the reason follows the path) for a missing
    or unreadable file, one that is not a regular file (never opened then), or one larger
    than ``limit``.
    """
    shown = os.fspath(path) if shown is None else shown
    try:
        return _read(path, limit)
    except _Refused as exc:
        raise _error(error, shown, what, exc.reason, hint) from None
    except OSError as exc:
        raise _error(error, shown, what, exc.strerror or str(exc), hint) from None


def read_optional_input(
    path: str | os.PathLike[str], *, limit: int, what: str,
    error: type[InputError] = InputError, shown: str | None = None, hint: str | None = None,
    skip_unreadable: bool = False,
) -> bytes | None:
    """As read_input, but None for a file that does not exist, or, with
    ``skip_unreadable``, that cannot be opened or read for any reason an OSError gives.
    Files that are not regular or are over ``limit`` still raise ``error``."""
    shown = os.fspath(path) if shown is None else shown
    try:
        return _read(path, limit)
    except _Refused as exc:
        raise _error(error, shown, what, exc.reason, hint) from None
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if skip_unreadable:
            return None
        raise _error(error, shown, what, exc.strerror or str(exc), hint) from None


# ---------------------------------------------------------------------------------------
# Bounded decompression

COMPRESSION_OF_SUFFIX = {".xz": "xz", ".gz": "gzip", ".zst": "zstd"}


def decompress_bounded(
    data: bytes, compression: str, *, limit: int, what: str, shown: str,
    error: type[InputError] = InputError,
) -> bytes:
    """Decompress ``data`` (``"xz"``, ``"gzip"`` or ``"zstd"``, one stream or frame),
    streamed in pieces so that a bomb is stopped once its output passes ``limit``: no
    more than about ``limit`` is ever allocated for it, however much the stream claims.

    Raises ``error`` (see read_input) for an unknown compression, a corrupt or truncated
    stream (``"truncated xz data"``, ``"corrupt gzip data: …"``), or one that decompresses
    to more than ``limit`` bytes (``"decompresses to more than the 256 MiB limit"``).
    """
    try:
        if compression == "xz":
            return _stream(lzma.LZMADecompressor(), data, limit, "xz")
        if compression == "gzip":
            return _stream(zlib.decompressobj(wbits=31), data, limit, "gzip")  # gzip only
        if compression == "zstd":
            return _zstd(data, limit)
        raise _Refused(f"unknown compression {compression!r}")
    except _Refused as exc:
        raise _error(error, shown, what, exc.reason) from None
    except (lzma.LZMAError, zlib.error, EOFError, ValueError) as exc:
        raise _error(error, shown, what, f"corrupt {compression} data: {exc}") from None
    except Exception as exc:  # zstandard.ZstdError (its module is imported lazily)
        raise _error(error, shown, what, f"corrupt {compression} data: {exc}") from None


def _stream(decompressor: Any, data: bytes, limit: int, compression: str) -> bytes:
    """Run an lzma or zlib decompressor (``Any``: their types share no base) over
    ``data``, taking at most _READ_CHUNK bytes of output (``max_length``) and giving at
    most _INPUT_PIECE bytes of input per call: zlib hands back the input it did not take
    as a copy, which must stay small. Raises _Refused, or the decompressor's error for
    corrupt data."""
    is_zlib = not isinstance(decompressor, lzma.LZMADecompressor)
    view = memoryview(data)
    position = 0
    pending: bytes | memoryview = b""
    chunks: list[bytes] = []
    total = 0
    while True:
        if not pending and position < len(view) and (is_zlib or decompressor.needs_input):
            pending = view[position : position + _INPUT_PIECE]
            position += len(pending)
        want = min(_READ_CHUNK, limit + 1 - total)
        piece = decompressor.decompress(pending, want)
        chunks.append(piece)
        total += len(piece)
        if total > limit:
            raise _Refused(_bigger(limit))
        if decompressor.eof:
            return b"".join(chunks)
        if is_zlib:  # zlib hands back what it did not take; a full piece may have more
            pending = decompressor.unconsumed_tail
            stuck = not pending and len(piece) < want
        else:  # lzma keeps what it did not take, and says whether it needs more
            pending = b""
            stuck = decompressor.needs_input
        if stuck and position >= len(view):
            raise _Refused(f"truncated {compression} data")


def _zstd(data: bytes, limit: int) -> bytes:
    """One zstd frame's content, at most ``limit`` + 1 bytes of it.

    The one-shot decompressor allocates what the frame header declares, so a declared size
    over ``limit`` is refused before anything is allocated; a frame without one gets an
    output buffer of ``limit`` + 1 bytes (only the part written is ever touched). When it
    fails, a streaming pass that keeps nothing tells why: more output than ``limit``
    (too large), an error (corrupt: zstandard's error is raised), or neither (the frame
    ends early: truncated). Raises _Refused or zstandard.ZstdError.
    """
    import io

    import zstandard  # imported lazily: only zstd input needs it

    declared = zstandard.get_frame_parameters(data).content_size
    if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > limit:
        raise _Refused(_bigger(limit))
    decompressor = zstandard.ZstdDecompressor()
    try:
        out: bytes = decompressor.decompress(data, max_output_size=limit + 1)
        return out
    except zstandard.ZstdError:
        reader = decompressor.stream_reader(io.BytesIO(data), read_across_frames=False)
        produced = 0
        while produced <= limit:
            chunk = reader.read(_READ_CHUNK)  # raises ZstdError for corrupt data
            if not chunk:
                raise _Refused("truncated zstd data") from None
            produced += len(chunk)
        raise _Refused(_bigger(limit)) from None


def read_compressed_input(
    path: Path, *, limit: int, what: str, error: type[InputError] = InputError,
    shown: str | None = None,
) -> bytes:
    """read_input, then, for a name ending in ``.xz``, ``.gz`` or ``.zst``, decompress it
    under the same ``limit`` (decompress_bounded). Raises ``error``."""
    shown = str(path) if shown is None else shown
    raw = read_input(path, limit=limit, what=what, error=error, shown=shown)
    compression = COMPRESSION_OF_SUFFIX.get(path.suffix)
    if compression is None:
        return raw
    return decompress_bounded(raw, compression, limit=limit, what=what, shown=shown,
                              error=error)
