"""Module names and paths: normalisation (``-`` == ``_``), suffixes, compression."""

from __future__ import annotations

import re

# Longest first so ".ko.xz" is not taken for ".ko".
MODULE_SUFFIXES: tuple[str, ...] = (".ko.zst", ".ko.xz", ".ko.gz", ".ko")
COMPRESSION_OF_SUFFIX: dict[str, str | None] = {
    ".ko": None,
    ".ko.xz": "xz",
    ".ko.gz": "gzip",
    ".ko.zst": "zstd",
}
_VALID_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def normalize(name: str) -> str:
    """The canonical spelling of a module name: dashes become underscores (as kmod does)."""
    return name.replace("-", "_")


def is_valid_module_name(name: str) -> bool:
    """True for names a kernel module can have (letters, digits, ``_``/``-``, ≤ 64 chars)."""
    return bool(_VALID_NAME.match(name))


def is_valid_kernel_version(kernel: str) -> bool:
    """True for strings that can name one directory under lib/modules (as ``uname -r``
    prints): non-empty, printable, no ``/`` or white space, not ``.`` or ``..``."""
    return (0 < len(kernel) <= 255 and "/" not in kernel and kernel not in (".", "..")
            and not any(c.isspace() or not c.isprintable() for c in kernel))


def module_suffix(filename: str) -> str | None:
    """The module suffix of ``filename`` (``.ko``, ``.ko.xz``…), or None if it is not one."""
    for suffix in MODULE_SUFFIXES:
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return suffix
    return None


def module_name_from_path(path: str) -> str | None:
    """The normalised module name for a file path, or None if it is not a module file."""
    filename = path.rsplit("/", 1)[-1]
    suffix = module_suffix(filename)
    if suffix is None:
        return None
    return normalize(filename[: -len(suffix)])


def compression_of(path: str) -> str | None:
    """``"xz"``, ``"gzip"``, ``"zstd"`` or None for an uncompressed ``.ko``."""
    suffix = module_suffix(path.rsplit("/", 1)[-1])
    return COMPRESSION_OF_SUFFIX.get(suffix) if suffix else None
