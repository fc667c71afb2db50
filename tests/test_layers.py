"""The package's layers import only downward, without cycles, and never by string.

Layers, lowest first (ARCHITECTURE.md draws them): the shared bottom (``errors``,
``logs``), ``config``, ``jobs``, ``engine``, ``backends``, ``serving``, ``actors``,
``http``, then ``server``, ``cli`` and ``__main__``. A module may import its own layer
and the layers below it. ``tabby.testing`` (tiny models for tests and scripts) sits just
above the backends and nothing in the package imports it. Imports under
``if TYPE_CHECKING:`` follow the same layering but may close a cycle (they never run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import attrs

PACKAGE = Path(__file__).resolve().parents[1] / "tabby"

LAYERS: dict[str, float] = {
    "errors": 0,
    "logs": 0,
    "config": 1,
    "jobs": 2,
    "engine": 3,
    "backends": 4,
    "testing": 4.5,
    "serving": 5,
    "actors": 6,
    "http": 7,
    "server": 8,
    "cli": 9,
    "__main__": 10,
}
# Loose modules allowed at the top of the package (``logs``: process-wide logging setup
# and secret redaction, shared by the CLI and the HTTP access log).
TOP_LEVEL = {"__init__", "__main__", "cli", "server", "errors", "logs"}


@attrs.frozen
class Import:
    source: str  # the importing module
    target: str  # the imported module (or the package a name was taken from)
    line: int
    type_only: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, type_only: bool) -> Iterator[tuple[ast.AST, bool]]:
    for child in ast.iter_child_nodes(node):
        guarded = type_only or (isinstance(node, ast.If) and _is_type_checking(node.test)
                                and child in node.body)  # fmt: skip
        yield child, guarded
        yield from _walk(child, guarded)


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    is_package = path.name == "__init__.py"
    return imports_in(name, path.read_text(encoding="utf-8"), known, is_package=is_package)


def imports_in(name: str, source: str, known: set[str], *, is_package: bool) -> list[Import]:
    tree = ast.parse(source)
    package = name if is_package else name.rpartition(".")[0]
    found: list[Import] = []
    for node, type_only in _walk(tree, False):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from tabby.backends import reference` imports the module tabby.backends.reference.
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known else base)
        for target in targets:
            if target == "tabby" or target.startswith("tabby."):
                found.append(Import(name, target, getattr(node, "lineno", 0), type_only))
    return found


def all_imports() -> list[Import]:
    found = modules()
    known = set(found)
    return [imp for name, path in found.items() for imp in imports_of(name, path, known)]


def layer_of(module: str) -> float:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package itself
    return LAYERS[parts[1]]


def test_every_module_belongs_to_a_layer() -> None:
    for name in modules():
        parts = name.split(".")
        if len(parts) > 1:
            assert parts[1] in LAYERS, f"{name}: not in any layer (add it to LAYERS)"


def test_only_the_entry_points_stay_at_the_top() -> None:
    loose = {p.stem for p in PACKAGE.glob("*.py")}
    assert loose <= TOP_LEVEL, f"loose modules at the top: {sorted(loose - TOP_LEVEL)}"


def test_imports_go_only_downward() -> None:
    upward = sorted(
        {
            f"{imp.source}:{imp.line} imports {imp.target}"
            for imp in all_imports()
            if layer_of(imp.target) > layer_of(imp.source)
        }
    )
    assert upward == []


def test_engine_does_not_know_the_backends() -> None:
    # Same band, but the engine is what the reference backend wraps.
    wrong = [
        f"{imp.source}:{imp.line} imports {imp.target}"
        for imp in all_imports()
        if imp.source.startswith("tabby.engine") and imp.target.startswith("tabby.backends")
    ]
    assert wrong == []


def test_nothing_in_the_package_imports_the_test_helpers() -> None:
    users = [
        f"{imp.source}:{imp.line}"
        for imp in all_imports()
        if imp.target.startswith("tabby.testing") and not imp.source.startswith("tabby.testing")
    ]
    assert users == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle is not None:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle is not None:
                return cycle
    return None


def test_no_import_cycles() -> None:
    known = set(modules())
    graph: dict[str, set[str]] = {}
    for imp in all_imports():
        # A package's __init__ importing its own modules is how packages re-export.
        if imp.type_only or imp.target not in known or imp.target == imp.source:
            continue
        if imp.source in known and imp.target.startswith(imp.source + "."):
            continue
        graph.setdefault(imp.source, set()).add(imp.target)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_tabby_module_is_loaded_by_string() -> None:
    loaded: list[str] = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called not in ("import_module", "__import__"):
                continue
            first = node.args[0] if node.args else None
            literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
            if not literal or str(first.value).startswith("tabby"):  # type: ignore[union-attr]
                loaded.append(f"{name}:{node.lineno}")
    assert loaded == []


def test_the_checks_see_a_violation() -> None:
    # The walk must find imports inside functions and TYPE_CHECKING blocks, and relative ones.
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from tabby.http.app import create_app\n"
        "def f():\n    from tabby.server import serve\n"
        "from . import base\n"
    )
    found = imports_in("tabby.backends.probe", source, set(modules()), is_package=False)
    assert [(i.target, i.type_only) for i in found] == [
        ("tabby.http.app", True),
        ("tabby.server", False),
        ("tabby.backends.base", False),
    ]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
