"""Finding a kernel's module tree and what is in it: the module directory, the module
files (walked without following directory links), their priority, and the builtin modules
(``modules.builtin``, ``modules.builtin.modinfo``)."""

from __future__ import annotations

import os
from pathlib import Path

from ..elf import parse_softdep
from ..errors import KernelNotFoundError
from ..inputs import MAX_KERNEL_METADATA_BYTES, read_optional_input
from ..names import (
    MODULE_SUFFIXES,
    is_valid_kernel_version,
    module_name_from_path,
    normalize,
)
from ..paths import MODULE_DIR_BASES, installed_kernels

# Directories in a module tree that are never module trees themselves.
_SKIP_DIRS = frozenset({"build", "source"})


# ---------------------------------------------------------------------------------------
# Locating a kernel


def module_dir(root: Path, kernel: str) -> Path:
    """ROOT/lib/modules/KVER (or ROOT/usr/lib/modules/KVER). Raises KernelNotFoundError."""
    if not is_valid_kernel_version(kernel):
        raise KernelNotFoundError(f"{kernel!r} is not a kernel version")
    for base in MODULE_DIR_BASES:
        candidate = root / base / kernel
        if candidate.is_dir():
            return candidate
    available = ", ".join(installed_kernels(root)) or "none"
    raise KernelNotFoundError(
        f"no module tree for kernel {kernel} under {root} (looked in "
        f"{', '.join('/' + b for b in MODULE_DIR_BASES)}); installed: {available}",
        hint="pass --kernel with one of the installed versions",
    )


# ---------------------------------------------------------------------------------------
# Reading the tree


# (size, mtime_ns, inode) of a module file
_Stat = tuple[int, int, int]


def _walk_modules(moddir: Path) -> list[tuple[str, _Stat]]:
    """Every module file under ``moddir`` (relpath, (size, mtime_ns, inode)), sorted by
    relpath. Directory symlinks are not followed; a symlinked module file is stat'ed
    through its link; ``build``/``source`` at the top are not module trees."""
    found: list[tuple[str, _Stat]] = []
    stack = [("", str(moddir))]
    suffixes = MODULE_SUFFIXES
    skip = _SKIP_DIRS
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    while stack:
        prefix, directory = stack.pop()
        try:
            fd = os.open(directory, flags)
        except OSError:
            continue
        try:
            # Listing a descriptor makes each file's stat relative to it (fstatat): the
            # kernel resolves one name per file instead of the whole path.
            with os.scandir(fd) as entries:
                for entry in entries:
                    name = entry.name
                    if entry.is_dir(follow_symlinks=False):
                        if prefix or name not in skip:
                            stack.append((prefix + name + "/", directory + "/" + name))
                    elif name.endswith(suffixes):
                        try:
                            st = entry.stat()
                        except OSError:
                            continue
                        found.append((prefix + name, (st.st_size, st.st_mtime_ns, st.st_ino)))
        finally:
            os.close(fd)
    found.sort()  # directory order is arbitrary; priorities and providers must not be
    return found


def _priority(relpath: str) -> tuple[int, str]:
    # depmod's default search order: "updates" first, then everything else.
    return (0 if relpath.startswith("updates/") else 1, relpath)


def read_builtins(moddir: Path) -> tuple[frozenset[str], tuple[tuple[str, str], ...],
                                          dict[str, tuple[tuple[str, ...], tuple[str, ...]]]]:
    """Builtin module names, their aliases and softdeps from modules.builtin(.modinfo).

    Missing or unreadable files give nothing; raises InputError for one that is not a
    regular file or is over MAX_KERNEL_METADATA_BYTES.
    """
    names: set[str] = set()
    raw = _metadata(moddir / "modules.builtin", "builtin-modules list")
    for line in (raw or b"").decode("utf-8", "replace").splitlines():
        name = module_name_from_path(line.strip())
        if name:
            names.add(name)
    aliases: list[tuple[str, str]] = []
    softdeps: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    raw = _metadata(moddir / "modules.builtin.modinfo", "builtin-modules list")
    if raw is not None:
        for item in raw.split(b"\0"):
            text = item.decode("utf-8", "replace")
            head, sep, value = text.partition("=")
            module, dot, key = head.partition(".")
            if not (sep and dot):
                continue
            module = normalize(module)
            names.add(module)
            if key == "alias":
                aliases.append((value, module))
            elif key == "softdep":
                softdeps[module] = parse_softdep(value)
    return frozenset(names), tuple(aliases), softdeps


def _metadata(path: Path, what: str) -> bytes | None:
    return read_optional_input(path, limit=MAX_KERNEL_METADATA_BYTES, what=what,
                               skip_unreadable=True)

