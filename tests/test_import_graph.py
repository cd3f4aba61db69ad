"""glmserve's modules import each other without a circle.

An import circle (``a`` imports ``b``, which imports ``a`` back, at module level or inside a
function) means neither module has one home: which of them loads first decides what the other
sees half-built.  The graph is read from the source with ``ast`` (every ``import`` and
``from ... import`` anywhere in a module, whether it runs at import time or later), so the test
needs no import to succeed and sees the lazy imports too.  Two things are not edges: imports
under ``if TYPE_CHECKING:``, which never run (they let a type hint name a module that imports
this one: the standard way to keep such a hint without a circle), and the package of a module
imported by name (``from glmserve.formats import ebnf`` runs ``glmserve/formats/ebnf.py``; its
package's ``__init__`` runs for any import of anything in it, so it would be an edge of every
import).
"""

from __future__ import annotations

import ast
from pathlib import Path

import glmserve

ROOT = Path(glmserve.__file__).parent


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> the glmserve modules it imports`` (a ``from pkg import name`` where ``name``
    is a module counts as importing that module)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: resolved against the importing module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # a name that is a module is that module; any other is an attribute of ``base``
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            graph[mod].update(t for t in targets if t in files and t != mod)
    return graph


def _imports(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, but those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            found.append(n)
        elif isinstance(n, ast.If) and ast.unparse(n.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            stack.extend(n.orelse)
        else:
            stack.extend(ast.iter_child_nodes(n))
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), each
    as one circle's members, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    members.append(m)
                    if m == node:
                        break
                if len(members) > 1:
                    found.append(sorted(members))
    return found


def test_the_cycle_finder_finds_circles(tmp_path):
    """The check itself: a lazy import that closes a circle is found, a chain is not."""
    pkg = tmp_path / "glmserve"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from glmserve.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("import glmserve.a\n")
    assert cycles(import_graph(pkg)) == [["glmserve.a", "glmserve.sub.b"]]
    (pkg / "sub" / "b.py").write_text("import json\n")  # c -> a -> b: a chain
    assert cycles(import_graph(pkg)) == []
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from glmserve.a import x\n"
                                       "else:\n    import glmserve.c\n")  # only the else branch runs
    assert cycles(import_graph(pkg)) == [["glmserve.a", "glmserve.c", "glmserve.sub.b"]]


def test_glmserve_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["glmserve.api.app"]  # the whole package was read
    assert cycles(graph) == []
