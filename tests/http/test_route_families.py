"""Route modules are imported where they are mounted, never loaded by name."""

from __future__ import annotations

import ast
from pathlib import Path

from tabby.config import NetworkConfig, TabbyConfig
from tabby.http import app

HTTP = Path(__file__).resolve().parents[2] / "tabby" / "http"


def test_no_module_is_loaded_by_name() -> None:
    loaders = []
    for path in HTTP.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("import_module", "__import__"):
                loaders.append(f"{path.relative_to(HTTP)}:{node.lineno}")
    assert loaders == []


def test_families_mount_as_api_servers_say() -> None:
    def mounted(*servers: str) -> set[str]:
        config = TabbyConfig(network=NetworkConfig(api_servers=servers))
        return {family.module for family in app.FAMILIES if family.wanted(config)}

    always = {
        "tabby.http.core",
        "tabby.http.admin.routes",
        "tabby.http.embeddings",
        "tabby.http.admin.downloads",
    }
    assert mounted("OAI") == always | {"tabby.http.openai.routes"}
    assert mounted("Kobold") == always | {"tabby.http.kobold.routes"}
    assert mounted("OAI", "Kobold") == always | {
        "tabby.http.openai.routes",
        "tabby.http.kobold.routes",
    }
    kobold_paths = {route.path for route in app.declared_routes(TabbyConfig(
        network=NetworkConfig(api_servers=("Kobold",))
    ))}
    assert "/api/v1/generate" in kobold_paths
    assert "/v1/completions" not in kobold_paths
