"""The package's import graph has no circles, counting imports inside functions too (a deferred import that
closes a circle is still a circle: it only moves the failure to run time and hides the dependency), and counting
an import of a package (or of a module inside one) from outside it as an import of what its __init__.py imports
(importing a package runs its __init__, so a circle through a package's face is still a circle)."""

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


def run_on_import(tree: ast.Module) -> list[ast.AST]:
    """The nodes of `tree` that run when the module is imported: all but function bodies (a package's lazy
    `__getattr__` imports only when that name is asked for)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(c for c in ast.iter_child_nodes(node)
                    if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    return out


def imported(path: Path, name: str, modules: dict[str, Path], *, unknown: set[str] | None = None,
             face: set[str] | None = None) -> set[str]:
    """The mixlm modules `name` (at `path`) imports anywhere in its code: `from a.b import c` is a.b.c when
    that is a module, else a.b. `unknown` collects imported mixlm names that are no module (a stale import);
    `face` collects, for a package's __init__.py, the package's own submodules it imports when it is imported
    (left out of the result)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]

    def names(nodes) -> set[str]:
        found = set()
        for node in nodes:
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
        return found

    tree = ast.parse(path.read_text(), str(path))
    found = names(ast.walk(tree))
    if unknown is not None:
        unknown.update(f"{name}: {n}" for n in found if (n == "mixlm" or n.startswith("mixlm.")) and n not in modules)
    own = {n for n in found if n in modules and n != name}
    # A package's face importing its own submodules is how a package is assembled, not a dependency on them.
    assembled = {n for n in own if path.name == "__init__.py" and n.startswith(name + ".")}
    if face is not None:
        face.update(assembled & names(run_on_import(tree)))
    return own - assembled


def inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the mixlm modules it depends on}: its own imports, plus, for each imported package outside the
    importer, the submodules its __init__.py imports when imported, transitively."""
    faces: dict[str, set[str]] = {}
    graph = {}
    for name, path in modules.items():
        faces[name] = set()
        graph[name] = imported(path, name, modules, face=faces[name])
    expanded = {}
    for name, targets in graph.items():
        edges, todo = set(), list(targets)
        while todo:
            target = todo.pop()
            if target in edges or target == name:
                continue
            edges.add(target)
            # Only the imported package's own face, not those of the packages above it (which `import a.b.c` also
            # runs): that would also count config.validate -> mixing/__init__ -> mixing.prior -> config/__init__.
            if not inside(name, target):
                todo.extend(faces[target])
        expanded[name] = edges
    return expanded


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


def test_import_graph_sees_a_circle_through_a_package_face(tmp_path):
    """a.pick imports the package a.dist inside a function; a.dist's __init__ imports a.dist.select, which
    imports a.pick: a circle, though no module names another's module in a loop."""
    files = {"a/__init__.py": "", "a/pick.py": "def f():\n    from a.dist import g\n",
             "a/dist/__init__.py": "from a.dist.select import g\n", "a/dist/select.py": "from a.pick import f\n"}
    modules = {}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
        parts = Path(rel).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = tmp_path / rel
    graph = import_graph(modules)
    assert graph["a.pick"] == {"a.dist", "a.dist.select"}
    assert graph["a.dist.select"] == {"a.pick"}  # inside a.dist: its own package's face is not re-entered
    assert circles(graph) == [["a.dist.select", "a.pick"]]


def test_mixlm_has_no_import_circles():
    modules = module_names()
    graph = import_graph(modules)
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
