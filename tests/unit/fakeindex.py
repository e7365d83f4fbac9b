"""A ModuleIndex made from plain data, as ``build_index`` would make it from a tree.

Only the construction is faked: the index is the real ``ModuleIndex`` (aliases, softdeps,
symbol providers all work as on a real kernel), built from ``ModuleInfo`` values instead
of module files, so tests of decisions need no tree, no depmod and no disk::

    index = index_of(
        module("virtio_net", depends=["virtio", "net_failover"], aliases=["virtio:d00000001v*"]),
        module("virtio"),
        module("net_failover", undefined=["failover_register"]),
        module("failover", exports=["failover_register"]),
    )
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from kmodtrim.elf import ModuleInfo
from kmodtrim.index import ModuleEntry, ModuleIndex
from kmodtrim.modprobe import ModprobeConfig
from kmodtrim.names import normalize

# A root that does not exist: nothing under it can be read by accident.
ROOT = Path("/nonexistent-unit-root")
KERNEL = "6.1.0-unit-amd64"
MODDIR = ROOT / "lib" / "modules" / KERNEL
INROOT_MODDIR = f"/lib/modules/{KERNEL}"


def module(
    name: str,
    *,
    depends: Iterable[str] = (),
    exports: Iterable[str] = (),
    undefined: Iterable[str] = (),
    weak_undefined: Iterable[str] = (),
    aliases: Iterable[str] = (),
    softdep_pre: Iterable[str] = (),
    softdep_post: Iterable[str] = (),
    weakdeps: Iterable[str] = (),
    firmware: Iterable[str] = (),
    relpath: str | None = None,
    size: int = 1000,
    shadowed: Iterable[str] = (),
    stashed: bool = False,
) -> ModuleEntry:
    """One loadable module; names are normalised as the ELF reader normalises them.
    ``relpath`` defaults to ``kernel/drivers/misc/NAME.ko``."""
    name = normalize(name)
    info = ModuleInfo(
        name=name,
        depends=tuple(normalize(d) for d in depends),
        softdep_pre=tuple(normalize(d) for d in softdep_pre),
        softdep_post=tuple(normalize(d) for d in softdep_post),
        weakdeps=tuple(normalize(d) for d in weakdeps),
        aliases=tuple(aliases),
        firmware=tuple(firmware),
        intree=True,
        license="GPL",
        exports=tuple(exports),
        undefined=tuple(undefined),
        weak_undefined=tuple(weak_undefined),
    )
    return ModuleEntry(
        name=name,
        relpath=relpath if relpath is not None else f"kernel/drivers/misc/{name}.ko",
        size=size,
        info=info,
        shadowed=tuple(shadowed),
        stashed=stashed,
    )


Softdeps = Mapping[str, tuple[Iterable[str], Iterable[str]]]


def index_of(
    *modules: ModuleEntry,
    builtins: Iterable[str] = (),
    builtin_aliases: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    builtin_softdeps: Softdeps | None = None,
    kernel_exports: Iterable[str] = (),
    modprobe_softdeps: Softdeps | None = None,
    modprobe_weakdeps: Mapping[str, Iterable[str]] | None = None,
    modprobe_aliases: Iterable[tuple[str, str]] = (),
    root: Path = ROOT,
    kernel: str = KERNEL,
) -> ModuleIndex:
    """The index of a kernel with these loadable ``modules`` (in this order: the first
    exporter of a symbol provides it), ``builtins`` (with aliases pattern → builtin and
    the softdeps ``modules.builtin.modinfo`` would give), the kernel's own exports, and
    modprobe.d softdeps (which override the modules' own), weakdeps and aliases.

    Mirrors build_index: builtin softdeps are merged under modprobe.d's, and a name that is
    both loadable and builtin counts as loadable. Raises ValueError for a repeated name.
    """
    by_name: dict[str, ModuleEntry] = {}
    for entry in modules:
        if entry.name in by_name:
            raise ValueError(f"module {entry.name} given twice")
        by_name[entry.name] = entry
    softdeps: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for name, (pre, post) in {**(builtin_softdeps or {}), **(modprobe_softdeps or {})}.items():
        softdeps[normalize(name)] = (tuple(normalize(n) for n in pre),
                                     tuple(normalize(n) for n in post))
    weakdeps = {normalize(name): tuple(normalize(n) for n in names)
                for name, names in (modprobe_weakdeps or {}).items()}
    pairs = builtin_aliases.items() if isinstance(builtin_aliases, Mapping) else builtin_aliases
    moddir = root / "lib" / "modules" / kernel
    return ModuleIndex(
        root=root,
        kernel=kernel,
        moddir=moddir,
        modules=by_name,
        builtins=frozenset(normalize(b) for b in builtins) - by_name.keys(),
        builtin_aliases=tuple((pattern, normalize(name)) for pattern, name in pairs),
        modprobe=ModprobeConfig(
            softdeps=softdeps,
            weakdeps=weakdeps,
            aliases=tuple((normalize(a), normalize(m)) for a, m in modprobe_aliases),
        ),
        kernel_exports=frozenset(kernel_exports),
        kernel_exports_source="unit test",
    )
