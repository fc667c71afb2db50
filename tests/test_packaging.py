"""Every library the package imports is declared in pyproject.toml's dependencies.

The test environment also holds the development tools, so an undeclared import would
pass every other test here and fail only on a user's machine.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Imported only inside functions, for features that live in an extra.
OPTIONAL = {"infinity_emb", "exllamav2", "exllamav3", "PIL", "sentence_transformers"}


def _top_level_imports() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tabby").rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"tabby", "__future__"}


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {
        re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0].lower().replace("_", "-")
        for spec in project["dependencies"]
    }


def test_module_level_imports_are_declared_dependencies() -> None:
    providers = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for module in sorted(_top_level_imports() - OPTIONAL):
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [module])}
        if not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f"imported but not declared in [project] dependencies: {missing}"
