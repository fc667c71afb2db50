"""``GET /openapi.json`` and ``GET /docs`` (no key needed).

``/docs`` is one self-contained HTML page rendered here from the OpenAPI document
(the server may run offline, so no script or stylesheet is fetched from elsewhere):
every operation with its permission, request fields and response, then every schema
with its fields, types, defaults and docs; schema names link to their definitions.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from typing import Any

import quart

from tabby.http.openapi import app_document
from tabby.http.services import Services

__all__ = ["add_routes", "render_docs_html", "type_html"]

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:72rem;padding:1rem 2rem;
color:#1d1d1f;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.5rem}
.op{border:1px solid #ddd;border-radius:6px;margin:1rem 0;padding:.6rem 1rem}
.method{display:inline-block;min-width:4.2rem;font-weight:700;font-family:monospace}
.GET{color:#0b6e4f}.POST{color:#8a4b00}.DELETE{color:#b00020}.PUT,.PATCH{color:#4b0082}
.path{font-family:monospace;font-size:1.05rem}.perm{float:right;font-size:.85rem;color:#555}
table{border-collapse:collapse;width:100%;margin:.4rem 0}
td,th{border-bottom:1px solid #eee;text-align:left;padding:.25rem .5rem;vertical-align:top}
th{background:#f6f6f6}code{font-family:monospace;background:#f3f3f3;padding:0 .2rem}
.muted{color:#666}nav a{margin-right:.8rem}
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _schema_link(name: str) -> str:
    return f'<a href="#schema-{_esc(name)}">{_esc(name)}</a>'


def type_html(schema: Mapping[str, Any]) -> str:
    """A short, linked description of a JSON schema's type."""
    if "$ref" in schema:
        return _schema_link(_ref_name(str(schema["$ref"])))
    if "anyOf" in schema:
        return " | ".join(type_html(member) for member in schema["anyOf"])
    if "enum" in schema:
        return "one of " + ", ".join(f"<code>{_esc(json.dumps(v))}</code>" for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array":
        if "prefixItems" in schema:
            return "[" + ", ".join(type_html(item) for item in schema["prefixItems"]) + "]"
        items = schema.get("items")
        return f"array of {type_html(items)}" if items else "array"
    if kind == "object":
        extra = schema.get("additionalProperties")
        return f"object of {type_html(extra)}" if isinstance(extra, Mapping) and extra else "object"
    if isinstance(kind, list):
        return " | ".join(_esc(k) for k in kind)
    if kind:
        return _esc(kind)
    return "any"


def _fields_table(schema: Mapping[str, Any]) -> str:
    properties: Mapping[str, Any] = schema.get("properties", {})
    if not properties:
        return '<p class="muted">No fields.</p>'
    required = set(schema.get("required", ()))
    rows = []
    for name, prop in properties.items():
        default = (
            f"<code>{_esc(json.dumps(prop['default']))}</code>" if "default" in prop else ""
        )
        needed = "yes" if name in required else ""
        rows.append(
            f"<tr><td><code>{_esc(name)}</code></td><td>{type_html(prop)}</td>"
            f"<td>{needed}</td><td>{default}</td><td>{_esc(prop.get('description', ''))}</td></tr>"
        )
    head = "<tr><th>field</th><th>type</th><th>required</th><th>default</th><th>about</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _operation_html(path: str, method: str, op: Mapping[str, Any]) -> str:
    verb = method.upper()
    parts = [
        f'<div class="op" id="{_esc(op.get("operationId", ""))}">',
        f'<span class="perm">permission: {_esc(op.get("x-tabby-permission", "?"))}</span>',
        f'<span class="method {verb}">{verb}</span> <span class="path">{_esc(path)}</span>',
        f"<p><b>{_esc(op.get('summary', ''))}</b> {_esc(op.get('description', ''))}</p>",
    ]
    body = op.get("requestBody", {}).get("content", {}).get("application/json")
    if body:
        parts.append(f"<p>Request body: {type_html(body['schema'])}</p>")
    content = op.get("responses", {}).get("200", {}).get("content", {})
    if "application/json" in content:
        parts.append(f"<p>Response: {type_html(content['application/json']['schema'])}</p>")
    if "text/event-stream" in content:
        event = type_html(content["text/event-stream"]["schema"])
        parts.append(f"<p>Server-sent events, each: {event}</p>")
    parts.append("</div>")
    return "".join(parts)


def render_docs_html(document: Mapping[str, Any]) -> str:
    """The documentation page of an OpenAPI document."""
    info = document.get("info", {})
    title = f"{info.get('title', 'API')} {info.get('version', '')}".strip()
    by_tag: dict[str, list[str]] = {}
    for path, operations in document.get("paths", {}).items():
        for method, op in operations.items():
            tag = (op.get("tags") or ["other"])[0]
            by_tag.setdefault(tag, []).append(_operation_html(path, method, op))
    schemas: Mapping[str, Any] = document.get("components", {}).get("schemas", {})
    nav = "".join(f'<a href="#tag-{_esc(tag)}">{_esc(tag)}</a>' for tag in by_tag)
    sections = [
        f'<h2 id="tag-{_esc(tag)}">{_esc(tag)}</h2>{"".join(ops)}' for tag, ops in by_tag.items()
    ]
    schema_sections = [
        f'<h3 id="schema-{_esc(name)}">{_esc(name)}</h3>'
        f"<p>{_esc(schema.get('description', ''))}</p>{_fields_table(schema)}"
        for name, schema in schemas.items()
    ]
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>{_esc(title)}</h1><p>{_esc(info.get('description', ''))}</p>"
        '<p>Keys: <code>Authorization: Bearer KEY</code>, <code>X-Api-Key</code> or '
        '<code>X-Admin-Key</code>. Machine-readable: <a href="/openapi.json">openapi.json</a>.</p>'
        f'<nav>{nav}<a href="#schemas">schemas</a></nav>'
        f"{''.join(sections)}"
        f'<h2 id="schemas">Schemas</h2>{"".join(schema_sections)}'
        "</body></html>\n"
    )


def add_routes(bp: quart.Blueprint, services: Services) -> None:
    # Built on first use (the app's rules are complete only once it is set up), then
    # kept: the document cannot change while the app runs.
    built: dict[str, Any] = {}

    def document() -> dict[str, Any]:
        if "document" not in built:
            built["document"] = app_document(quart.current_app)
        doc: dict[str, Any] = built["document"]
        return doc

    @bp.get("/openapi.json")
    async def openapi_json() -> quart.Response:
        """The OpenAPI document of this server."""
        text = json.dumps(document(), ensure_ascii=False)
        return quart.Response(text, mimetype="application/json")

    @bp.get("/docs")
    async def docs_page() -> quart.Response:
        """The API documentation as one HTML page."""
        if "html" not in built:
            built["html"] = render_docs_html(document())
        return quart.Response(built["html"], mimetype="text/html")
