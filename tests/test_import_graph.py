"""The package's import graph: no module over the size limit, and no import circle, counting every import
a module makes (at the top, inside functions, and under `if TYPE_CHECKING:`), since a circle that only
type checkers follow still ties the modules' designs together."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "service" / "lmserve"
MAX_MODULE_LINES = 500
GENERATED = ("api/proto/",)  # protoc's output (make protos)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        rel = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports (a package's own __init__ counts as the package)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from a.b import c` names the module a.b.c where there is one, else a name in a.b.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

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


def test_no_import_circles() -> None:
    cycles = _cycles(_graph())
    assert cycles == [], "import circles (each a set of modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_no_module_over_the_size_limit() -> None:
    over = {
        str(path.relative_to(PACKAGE_ROOT)): n
        for path in PACKAGE_ROOT.rglob("*.py")
        if not str(path.relative_to(PACKAGE_ROOT)).startswith(GENERATED)
        and (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert over == {}, f"modules over {MAX_MODULE_LINES} lines: {over}"


def test_the_graph_sees_imports_of_every_kind(tmp_path: Path) -> None:
    """The parser counts top-level, function-level, TYPE_CHECKING and relative imports."""
    source = (
        "from typing import TYPE_CHECKING\nimport lmserve.config\n"
        "if TYPE_CHECKING:\n    from lmserve.state import AppState\n"
        "def f():\n    from lmserve.engine import base\n"
        "from . import tokenizer\n"
    )
    path = tmp_path / "mod.py"
    path.write_text(source)
    known = {"lmserve.config", "lmserve.state", "lmserve.engine", "lmserve.engine.base", "lmserve.tokenizer", "lmserve.mod"}
    assert _imports("lmserve.mod", path, known) == {
        "lmserve.config", "lmserve.state", "lmserve.engine.base", "lmserve.tokenizer",
    }  # fmt: skip
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
