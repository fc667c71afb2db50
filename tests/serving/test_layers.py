"""The serving core imports only downward: nothing from the protocols or the actors."""

from __future__ import annotations

import ast
from pathlib import Path

SERVING = Path(__file__).resolve().parents[2] / "tabby" / "serving"
ABOVE = ("tabby.http", "tabby.actors", "tabby.server", "tabby.cli")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_serving_imports_nothing_above_it() -> None:
    found = {
        f"{path.relative_to(SERVING)}: {name}"
        for path in SERVING.rglob("*.py")
        for name in imported_modules(path)
        if name.startswith(ABOVE)
    }
    assert found == set()
