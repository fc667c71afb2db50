"""The OpenAPI document: generated from the handlers' attrs classes, complete, valid,
matching live responses; the /docs page; ``tabby export-openapi``."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import jsonschema
import pytest
import quart

from tabby.config import TabbyConfig
from tabby.http.admin.routes import ROUTES as ADMIN_ROUTES
from tabby.http.app import create_app, declared_routes
from tabby.http.export import export_openapi_command
from tabby.http.openapi import (
    DOC_PATHS,
    Route,
    SchemaBuilder,
    app_routes,
    build_document,
    openapi_path,
)
from tests.admin_rig import admin_config, sse_events
from tests.conftest import LiveServer, StartServer

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def validator_for(document: Mapping[str, Any], schema: Mapping[str, Any]) -> Any:
    """A validator of ``schema`` whose ``#/components/...`` refs resolve in ``document``."""
    root = {"$schema": SCHEMA_DIALECT, **schema, "components": document["components"]}
    return jsonschema.Draft202012Validator(root)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


@pytest.fixture
async def server(live_server: StartServer, tmp_path: Path) -> LiveServer:
    return await live_server(admin_config(tmp_path))


async def fetch_document(server: LiveServer) -> dict[str, Any]:
    async with server.client() as client:
        r = await client.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    document: dict[str, Any] = r.json()
    return document


async def test_document_covers_the_app_and_every_reference_resolves(server: LiveServer) -> None:
    document = await fetch_document(server)
    assert document["openapi"] == "3.1.0"
    paths = document["paths"]
    app = create_app(server.info.services)
    rules = [r for r in app.url_map.iter_rules() if r.endpoint != "static"]
    assert len(rules) >= 30
    for rule in rules:
        path = openapi_path(rule.rule)
        if path in DOC_PATHS:
            assert path not in paths
            continue
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            assert method.lower() in paths.get(path, {}), (method, path)
    schemas = document["components"]["schemas"]
    for ref in set(refs(document)):
        assert ref.startswith("#/components/schemas/")
        assert ref.rsplit("/", 1)[-1] in schemas, ref
    for name, schema in schemas.items():
        jsonschema.Draft202012Validator.check_schema({"$schema": SCHEMA_DIALECT, **schema})
        assert schema["title"] in name
    # Every admin route is declared; rules of modules without ROUTES are marked.
    for route in ADMIN_ROUTES:
        op = paths[openapi_path(route.path)][route.method.lower()]
        assert op["x-tabby-permission"] == route.auth
        assert op["security"]
    for ops in paths.values():
        for op in ops.values():
            if op["x-tabby-permission"] == "undeclared":
                assert "security" not in op
    unload = paths["/v1/model/unload"]["post"]["requestBody"]
    assert unload["required"] is False
    operation_ids = [op["operationId"] for ops in paths.values() for op in ops.values()]
    assert len(operation_ids) == len(set(operation_ids))


async def test_admin_operations_are_described_from_their_classes(server: LiveServer) -> None:
    document = await fetch_document(server)
    paths, schemas = document["paths"], document["components"]["schemas"]
    load = paths["/v1/model/load"]["post"]
    assert load["x-tabby-permission"] == "admin"
    assert load["security"] == [{"bearer": []}, {"adminKey": []}]
    assert load["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ModelLoadRequest"
    }
    events = load["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert events == {"$ref": "#/components/schemas/LoadProgressEvent"}
    request = schemas["ModelLoadRequest"]
    assert request["required"] == ["model_name"]
    assert request["properties"]["max_seq_len"] == {
        "type": ["integer", "null"], "description": "Context length.", "default": None
    }
    assert request["properties"]["draft_model"]["anyOf"][0] == {
        "$ref": "#/components/schemas/DraftModelRequest"
    }
    switch = schemas["TemplateSwitchRequest"]["properties"]["prompt_template_name"]
    assert switch["x-aliases"] == ["name"]
    assert "Also accepted as: name." in switch["description"]
    encode = schemas["TokenEncodeRequest"]["properties"]["text"]
    assert encode["anyOf"][1] == {
        "type": "array", "items": {"$ref": "#/components/schemas/ChatMessage"}
    }
    assert paths["/v1/models"]["get"]["security"] == [
        {"bearer": []}, {"apiKey": []}, {"adminKey": []}
    ]
    progress = schemas["LoadProgressEvent"]["properties"]["status"]
    assert progress["enum"] == ["processing", "finished"]


async def test_live_responses_match_their_schemas(server: LiveServer) -> None:
    document = await fetch_document(server)
    checked = 0
    async with server.client() as client:
        for path, operations in document["paths"].items():
            get = operations.get("get")
            if get is None or "{" in path:
                continue
            content = get["responses"]["200"].get("content", {})
            if "application/json" not in content:
                continue
            r = await client.get(path, headers=server.auth("admin"))
            assert r.status_code == 200, (path, r.text)
            validator_for(document, content["application/json"]["schema"]).validate(r.json())
            checked += 1
        assert checked >= 12
        encode = document["paths"]["/v1/token/encode"]["post"]
        r = await client.post("/v1/token/encode", json={"text": "Hi"}, headers=server.auth())
        schema = encode["responses"]["200"]["content"]["application/json"]["schema"]
        validator_for(document, schema).validate(r.json())
        # Errors have the documented shape too.
        r = await client.post("/v1/token/decode", json={"tokens": "x"}, headers=server.auth())
        error_schema = encode["responses"]["default"]["content"]["application/json"]["schema"]
        validator_for(document, error_schema).validate(r.json())
        event_schema = {"$ref": "#/components/schemas/LoadProgressEvent"}
        async with client.stream(
            "POST", "/v1/model/load", json={"model_name": "tiny2"}, headers=server.auth("admin")
        ) as response:
            events = await sse_events(response)
        assert events
        for event in events:
            validator_for(document, event_schema).validate(event)


async def test_docs_page_renders_the_document_offline(server: LiveServer) -> None:
    document = await fetch_document(server)
    async with server.client() as client:
        r = await client.get("/docs")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    page = r.text
    assert page.startswith("<!DOCTYPE html>")
    for path in document["paths"]:
        assert f'<span class="path">{path}</span>' in page, path
    for name in document["components"]["schemas"]:
        assert f'id="schema-{name}"' in page, name
    assert '<a href="#schema-ModelLoadRequest">ModelLoadRequest</a>' in page
    assert "Model folder or .gguf file inside model_dir." in page
    # Self-contained: nothing is fetched from elsewhere.
    assert "http://" not in page
    assert "https://" not in page
    assert "<script" not in page


async def test_export_openapi_writes_the_served_document(
    server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    served = await fetch_document(server)
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # no tabby.toml here: built-in defaults
    out = workdir / "openapi.json"
    assert export_openapi_command(["--output", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8")) == served
    capsys.readouterr()
    assert export_openapi_command(["--api-servers", "Kobold"]) == 0
    without_openai = json.loads(capsys.readouterr().out)
    assert "/v1/completions" in served["paths"]
    assert "/v1/completions" not in without_openai["paths"]
    assert "/v1/model/load" in without_openai["paths"]
    assert export_openapi_command(["--network.port", "not-a-port"]) == 2


# -- the generator itself ---------------------------------------------------------------


@attrs.frozen
class Leaf:
    """A leaf.

    More text that is not part of the summary.
    """

    value: float = attrs.field(metadata={"doc": "A number."})


@attrs.frozen(kw_only=True)
class Node:
    name: str = attrs.field(metadata={"doc": "Its name.", "aliases": ("label", "title")})
    kind: Literal["a", "b"] = "a"
    size: int | None = None
    pair: tuple[int, str] | None = None
    tags: tuple[str, ...] = ()
    weights: dict[str, float] = attrs.field(factory=dict)
    children: list[Node] = attrs.field(factory=list)
    leaf: Leaf | None = None
    where: Path | None = None
    extra: Any = None
    seq: Sequence[Leaf] = ()
    table: Mapping[str, Any] = attrs.field(factory=dict)


def test_schema_builder_maps_types_docs_defaults_and_recursion() -> None:
    builder = SchemaBuilder()
    assert builder.ref(Node) == {"$ref": "#/components/schemas/Node"}
    node = builder.schemas["Node"]
    props = node["properties"]
    assert node["required"] == ["name"]
    assert props["name"] == {
        "type": "string",
        "x-aliases": ["label", "title"],
        "description": "Its name. Also accepted as: label, title.",
    }
    assert props["kind"] == {"type": "string", "enum": ["a", "b"], "default": "a"}
    assert props["size"] == {"type": ["integer", "null"], "default": None}
    assert props["pair"]["anyOf"][0] == {
        "type": "array",
        "prefixItems": [{"type": "integer"}, {"type": "string"}],
        "minItems": 2,
        "maxItems": 2,
    }
    assert props["tags"] == {"type": "array", "items": {"type": "string"}, "default": []}
    assert props["weights"] == {
        "type": "object", "additionalProperties": {"type": "number"}, "default": {}
    }
    assert props["children"]["items"] == {"$ref": "#/components/schemas/Node"}
    assert props["leaf"]["anyOf"] == [{"$ref": "#/components/schemas/Leaf"}, {"type": "null"}]
    assert props["where"]["type"] == ["string", "null"]
    assert props["extra"] == {"default": None}
    assert props["seq"]["items"] == {"$ref": "#/components/schemas/Leaf"}
    assert props["table"]["additionalProperties"] is True
    assert builder.schemas["Leaf"]["description"] == "A leaf."
    document = {"components": {"schemas": builder.schemas}}
    node_value = Node(name="n", size=3, pair=(1, "x"), tags=("t",), weights={"w": 0.5},
                      children=[Node(name="c", leaf=Leaf(1.5))])
    instance = json.loads(json.dumps(attrs.asdict(node_value)))  # as it goes over the wire
    validator_for(document, {"$ref": "#/components/schemas/Node"}).validate(instance)
    bad = {**instance, "kind": "c"}
    with pytest.raises(jsonschema.ValidationError):
        validator_for(document, {"$ref": "#/components/schemas/Node"}).validate(bad)


def test_same_class_names_from_two_modules_get_distinct_components() -> None:
    other = attrs.make_class("Leaf", {"x": attrs.field(type=int)})
    other.__module__ = "elsewhere.things"
    document = build_document([
        Route("post", "/a/<int:item>", request=Leaf, response=other, auth="none", doc="A.\nMore."),
    ])
    op = document["paths"]["/a/{item}"]["post"]
    assert op["summary"] == "A."
    assert op["security"] == []
    assert op["parameters"][0]["name"] == "item"
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/Leaf")
    response_ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert response_ref.endswith("/things_Leaf")
    assert set(document["components"]["schemas"]) >= {"Leaf", "things_Leaf", "ErrorResponse"}


def test_rules_that_no_module_declares_are_listed_from_the_app() -> None:
    app = quart.Quart("probe")

    async def handler() -> str:
        """Probe the thing.

        In detail.
        """
        return ""

    app.add_url_rule("/probe/<int:n>", "probe", handler, methods=["GET", "POST"])
    routes = app_routes(app, declared_routes(TabbyConfig()))
    declared = [r for r in routes if r.auth != "undeclared"]
    assert {r.path for r in ADMIN_ROUTES} <= {r.path for r in declared}
    extra = [r for r in routes if r.path == "/probe/<int:n>"]
    assert [(r.method, r.auth) for r in extra] == [("GET", "undeclared"), ("POST", "undeclared")]
    op = build_document(extra)["paths"]["/probe/{n}"]["get"]
    assert op["summary"] == "Probe the thing."
    assert "In detail." in op["description"]
    assert "security" not in op
