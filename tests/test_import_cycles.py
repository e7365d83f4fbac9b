"""No import cycles inside the kmodtrim package.

Every module of daemon/kmodtrim is parsed with ``ast`` (nothing is imported), and every
import statement anywhere in it counts: at module level, inside functions, and under
``if TYPE_CHECKING:`` (a type-only import still points the wrong way between layers).
Relative and absolute ``kmodtrim.`` imports both count. Importing ``a.b.c`` runs the
packages ``a`` and ``a.b`` first, so those count too (except the importer's own packages,
which are running already); ``from .pkg import name`` imports ``pkg`` and, when ``name``
is a submodule of it, that submodule (see imports_of).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "kmodtrim"
SOURCE = Path(__file__).resolve().parent.parent / "daemon" / PACKAGE


def module_name(path: Path) -> str:
    """``kmodtrim.dbus.service`` for daemon/kmodtrim/dbus/service.py (a package's
    ``__init__.py`` is the package itself)."""
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The kmodtrim modules that importing module ``name`` (at ``path``) may import.

    Importing ``a.b.c`` runs the packages ``a`` and ``a.b`` first, which counts unless
    they are the importer's own packages (already running when it is imported). ``from
    BASE import x`` counts ``BASE.x`` when it is a submodule; it counts ``BASE`` itself
    when some name comes from ``BASE``'s own code, or when ``BASE`` is not one of the
    importer's packages.
    """
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    own = set(_with_parents(package)) if package else set()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(m for m in _with_parents(alias.name) if m not in own)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            submodules = {f"{base_name}.{a.name}" for a in node.names} & known
            found.update(submodules)
            found.update(m for m in _with_parents(base_name) if m not in own)
            if len(submodules) < len(node.names):
                found.add(base_name)
    found.discard(name)
    return found & known


def import_graph() -> dict[str, set[str]]:
    """Module -> the kmodtrim modules it imports."""
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or of a module that
    imports itself), each sorted: the modules that cannot be imported one before the
    other. Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(c for c in components if len(c) > 1 or c[0] in graph[c[0]])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each tangle, as a path ``[a, b, …, a]``."""
    return sorted(_cycle_in(graph, set(tangle)) for tangle in tangles(graph))


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the first module of a strongly connected component."""
    start = min(component)
    paths: dict[str, list[str]] = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for succ in sorted(graph[node] & component):
            if succ == start:
                return paths[node] + [start]
            if succ not in paths:
                paths[succ] = paths[node] + [succ]
                queue.append(succ)
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "kmodtrim.errors" in graph["kmodtrim.dbus.errors"]  # from ..errors import
    assert "kmodtrim.dbus" in graph["kmodtrim.dbus.service"]  # from . import NAME
    assert "kmodtrim.dbus.api" in graph["kmodtrim.dbus.client"]  # from . import api
    assert "kmodtrim.dbus" in graph["kmodtrim.dbus.client"]  # from . import BUS_NAME
    assert "kmodtrim.resident" in graph["kmodtrim.dbus.service"]  # runs before .core
    assert {"kmodtrim.engine", "kmodtrim.engine.recovery"} <= graph["kmodtrim.executor"]


def test_cycle_finder_reports_each_cycle_once() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]


def test_no_import_cycles_inside_kmodtrim() -> None:
    graph = import_graph()
    found = [f"{' -> '.join(_cycle_in(graph, set(tangle)))}  (tangled: {', '.join(tangle)})"
             for tangle in tangles(graph)]
    assert not found, "import cycles:\n" + "\n".join(found)
