"""After each change, once every kernel's tree is final: kmodtrim's own modprobe.d file
(ondemand.py says what it holds and why) written for the generation's trimmed modules, or
removed when nothing is trimmed — so rollback 0 leaves no such file.

The aliases come from each trimmed kernel's index (the cache the plan or restore just
used; trimmed modules keep their cached rows). A stashed module the cache has no row for
is read from its local stash copy; one the package archive serves is never downloaded
here: it gets its ``install`` line but no alias lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .. import fsutil
from ..errors import KmodtrimError, ModuleParseError, StashError
from ..ondemand import CONF_PATH, KernelModules, conf_text, excluded_of
from ..paths import kernel_installed
from ..records import Generation, StashedFile
from ..takeout import Source

if TYPE_CHECKING:
    from ..index import ModuleIndex, StashedModule


def _stashed(root: Path, moddir: Path, entries: list[StashedFile]) -> list[StashedModule]:
    from ..index import StashedModule
    from ..state.stash import Stash

    prefix = "/" + moddir.relative_to(root).as_posix() + "/"
    stash = Stash(root)

    def load(entry: StashedFile) -> bytes:
        if entry.source is not Source.STASH:
            raise ModuleParseError(entry.path, "served by the package archive: not fetched")
        try:
            return stash.read(entry)
        except StashError as exc:
            raise ModuleParseError(entry.path, exc.message) from None

    return [StashedModule(relpath=e.path[len(prefix):], size=e.size, sha256=e.sha256,
                          load=lambda e=e: load(e))  # type: ignore[misc]
            for e in entries if e.path.startswith(prefix)]


def kernel_modules(root: Path, kernel: str, trimmed: Iterable[StashedFile],
                   index: ModuleIndex | None = None) -> KernelModules:
    """One kernel's trimmed modules with their aliases and its kept modules' aliases,
    from ``index`` when given (it must know the trimmed modules, stashed or not)."""
    entries = list(trimmed)
    names = {e.module for e in entries if e.module}
    if index is None or index.kernel != kernel:
        from ..index import build_index, module_dir

        index, _ = build_index(root, kernel,
                               stashed=_stashed(root, module_dir(root, kernel), entries))
    out: dict[str, tuple[str, ...]] = {name: () for name in names}
    kept: dict[str, tuple[str, ...]] = {}
    for name, entry in index.modules.items():
        if name in names:
            out[name] = tuple(entry.info.aliases)
        else:
            kept[name] = tuple(entry.info.aliases)
    return KernelModules(kernel, out, kept)


def _read_current(root: Path) -> str | None:
    try:
        return fsutil.read_bytes(root, CONF_PATH, 1 << 24).decode("utf-8", "replace")
    except (OSError, KmodtrimError):
        return None


def current_text(root: Path) -> str | None:
    """The file's text now (None: no such file, or unreadable)."""
    return _read_current(root)


def recorded_excluded(root: Path) -> set[str]:
    """The policy exclusions the current file names (none without a file)."""
    current = _read_current(root)
    return (excluded_of(current) if current is not None else None) or set()


def write_conf(root: Path, generation: Generation,
               indexes: Mapping[str, ModuleIndex] | None = None,
               excluded: set[str] | None = None) -> str | None:
    """Write (or remove) CONF_PATH for ``generation``. ``excluded``: the modules the policy
    excludes (None: the ones the current file names, for changes that read no policy).
    Returns the text written, None when the file is gone. Raises OSError,
    UnsafePathError."""
    fsutil.sweep_temporaries(root, [CONF_PATH])
    current = _read_current(root)
    if excluded is None:
        excluded = (excluded_of(current) if current is not None else None) or set()
    by_kernel: dict[str, list[StashedFile]] = {}
    for f in generation.removed:
        if f.kind == "module" and f.kernel and f.module:
            by_kernel.setdefault(f.kernel, []).append(f)
    kernels = [kernel_modules(root, kernel, files, (indexes or {}).get(kernel))
               for kernel, files in sorted(by_kernel.items())
               if kernel_installed(root, kernel)]
    text = conf_text(kernels, excluded)
    if text is None:
        with contextlib.suppress(FileNotFoundError):
            fsutil.unlink(root, CONF_PATH)
        return None
    if text != current:
        fsutil.write_file(root, CONF_PATH, text.encode())
    return text
