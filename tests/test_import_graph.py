"""No import circles in red/ and red_kernels/: every static import (module level, inside functions, under
`if TYPE_CHECKING`) read with `ast`, the graph between the packages' own modules checked for cycles.

An edge A -> B means module A names module B in an import statement: `import x.y` -> x.y; `from x import y` ->
x.y when that is a module, else x (the module that defines the name; for a package, its __init__). Parent
packages a submodule import also runs are not edges (every submodule would form a circle with an __init__ that
imports it). Dynamic imports (importlib.import_module) are not seen.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("red", "red_kernels")


def module_files(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (a package is its __init__.py)."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imported(node: ast.AST, module: str, is_package: bool, modules) -> set[str]:
    """The project modules an import statement names (relative imports resolved against `module`)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names} & modules
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    names = {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return names & modules


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (see the module docstring for what counts as an edge)."""
    files = module_files(root, packages)
    graph = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        targets = set().union(*(_imported(node, mod, is_package, files.keys()) for node in ast.walk(tree)))
        graph[mod] = targets - {mod}
    return graph


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while v not in comp:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
            if len(comp) > 1:
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _shortest_cycle(graph: dict[str, set[str]], comp: set[str], start: str) -> list[str]:
    """[start, ..., start]: a shortest way around inside one component (breadth first)."""
    prev, queue = {start: None}, deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] & comp):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is in no cycle of {sorted(comp)}")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] through each group of modules that import each other, from its first module
    (sorted by name)."""
    return sorted(_shortest_cycle(graph, comp, min(comp)) for comp in _components(graph))


def test_no_import_circles():
    graph = import_graph()
    assert "red.train" in graph and "red_kernels.red_loss" in graph  # the walk found the packages
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_finds_a_circle_through_a_function_level_and_a_relative_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("import os\n\ndef f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("from pkg import a\ng = 1\n")
    (pkg / "d.py").write_text("from .a import x\nfrom . import c\n")  # into the circle, not part of it
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.a", "pkg.c"}
    assert find_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_find_cycles_reports_each_circle_once():
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": set(), "x": {"y"}, "y": {"z"}, "z": {"x", "y"}}
    assert find_cycles(graph) == [["a", "b", "a"], ["x", "y", "z", "x"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
