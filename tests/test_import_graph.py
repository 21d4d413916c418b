"""The package's import graph has no circles, counting imports inside functions too (a deferred import that
closes a circle is still a circle: it only moves the failure to run time and hides the dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import mixlm

ROOT = Path(mixlm.__file__).resolve().parent


def module_names() -> dict[str, Path]:
    """mixlm's modules by dotted name (a package by its own name, for its __init__.py)."""
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = ("mixlm", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported(path: Path, name: str, modules: dict[str, Path], *, unknown: set[str] | None = None) -> set[str]:
    """The mixlm modules `name` (at `path`) imports anywhere in its code: `from a.b import c` is a.b.c when
    that is a module, else a.b. `unknown` collects imported mixlm names that are no module (a stale import)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    if unknown is not None:
        unknown.update(f"{name}: {n}" for n in found if (n == "mixlm" or n.startswith("mixlm.")) and n not in modules)
    own = {n for n in found if n in modules and n != name}
    # A package's face importing its own submodules is how a package is assembled, not a dependency on them.
    return {n for n in own if not (path.name == "__init__.py" and n.startswith(name + "."))}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_circles_finds_a_planted_circle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_mixlm_has_no_import_circles():
    modules = module_names()
    graph = {name: imported(path, name, modules) for name, path in modules.items()}
    assert sum(len(v) for v in graph.values()) > 200  # the walk sees the imports (a parser that saw none passes)
    assert graph["mixlm.train"] >= {"mixlm.setup", "mixlm.hooks"}
    assert circles(graph) == []


def test_every_mixlm_import_names_a_module_that_exists():
    """A deferred import of a renamed module fails only when its branch runs; this finds it without running it."""
    modules = module_names()
    unknown: set[str] = set()
    for name, path in modules.items():
        imported(path, name, modules, unknown=unknown)
    assert sorted(unknown) == []
