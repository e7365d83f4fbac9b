"""ModuleIndex: everything kmodtrim needs to know about one kernel's module tree.

Built from the modules' own ELF metadata (never from depmod's generated ``modules.*``
files, which may be missing or stale), plus ``modules.builtin*``, modprobe.d, and the
kernel's own exported symbols. A per-file cache keyed by (size, mtime_ns, inode) makes a
rebuild re-read only the files that changed; from the cache, a module's undefined-symbol
lists are only read when something asks for them.

model.py is the index itself, discover.py finds the tree and its builtins, exports.py the
kernel's exported symbols, cache.py the cache file, parallel.py reads compressed modules on
every CPU, build.py puts them together.
"""

from __future__ import annotations

from ..paths import MODULE_DIR_BASES as MODULE_DIR_BASES  # re-exported: defined in paths
from ..paths import default_kernel as default_kernel
from ..paths import installed_kernels as installed_kernels
from .build import IndexStats, build_index
from .cache import default_cache_dir
from .discover import module_dir, read_builtins
from .exports import derived_kernel_exports, read_kernel_exports
from .model import (
    DERIVED_EXPORTS,
    DerivedExports,
    ModuleEntry,
    ModuleIndex,
    StashedModule,
    alias_normalize,
)

__all__ = [
    "DERIVED_EXPORTS",
    "MODULE_DIR_BASES",
    "DerivedExports",
    "IndexStats",
    "ModuleEntry",
    "ModuleIndex",
    "StashedModule",
    "alias_normalize",
    "build_index",
    "default_cache_dir",
    "default_kernel",
    "derived_kernel_exports",
    "installed_kernels",
    "module_dir",
    "read_builtins",
    "read_kernel_exports",
]
