"""Every error path answers the one JSON error format, never HTML or a traceback."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import quart
from conftest import StartServer, make_config

from tabby.config import LoggingConfig
from tabby.config.validation import check
from tabby.errors import ServiceUnavailable, TabbyError, TooManyRequests, Unprocessable
from tabby.http.auth import requires_admin, requires_api
from tabby.http.body import parse_body
from tabby.http.context import request_id
from tabby.http.errors import use_error_renderer
from tabby.http.sse import SSEItem, sse_response


@attrs.frozen
class Inner:
    weight: float


@attrs.frozen
class Item:
    name: str
    count: int = attrs.field(default=1, validator=check(lambda v: v > 0, "an integer > 0"))
    tags: list[str] = attrs.field(factory=list)
    inner: Inner | None = None
    max_tokens: int | None = attrs.field(default=None, metadata={"aliases": ("max_length",)})


def probe_blueprint() -> quart.Blueprint:
    bp = quart.Blueprint("probe", __name__)

    @bp.post("/t/items")
    async def items() -> dict[str, Any]:
        item = await parse_body(Item)
        return {"item": attrs.asdict(item), "request_id": request_id()}

    @bp.get("/t/boom")
    async def boom() -> dict[str, Any]:
        raise RuntimeError("secret internals")

    @bp.get("/t/busy")
    async def busy() -> dict[str, Any]:
        raise TooManyRequests("the queue is full", retry_after=2.5)

    @bp.get("/t/unavailable")
    async def unavailable() -> dict[str, Any]:
        raise ServiceUnavailable("no model is loaded")

    @bp.get("/t/unprocessable")
    async def unprocessable() -> dict[str, Any]:
        raise Unprocessable("cannot serve that", code="nope")

    @bp.get("/t/api")
    @requires_api
    async def api_only() -> dict[str, Any]:
        return {"ok": True}

    @bp.get("/t/admin")
    @requires_admin
    async def admin_only() -> dict[str, Any]:
        return {"ok": True}

    return bp


def assert_error(response: Any, status: int, type_: str, code: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (type_, code)
    assert "Traceback" not in response.text
    assert len(response.headers["X-Request-Id"]) == 32
    return error


async def test_body_errors(live_server: StartServer) -> None:
    server = await live_server(
        network={"max_body_size": 2000}, extra_blueprints=[probe_blueprint()]
    )
    post = {"headers": {"Content-Type": "application/json"}}
    async with server.client() as client:
        ok = await client.post("/t/items", json={"name": "a", "unknown_field": 1, "max_length": 5})
        assert ok.status_code == 200
        assert ok.json()["item"] == {
            "name": "a",
            "count": 1,
            "tags": [],
            "inner": None,
            "max_tokens": 5,
        }
        assert ok.json()["request_id"] == ok.headers["X-Request-Id"]

        bad_json = await client.post("/t/items", content=b'{"name": ', **post)
        assert_error(bad_json, 400, "invalid_request_error", "invalid_json")

        too_deep = await client.post("/t/items", content=b"[" * 1990, **post)
        assert_error(too_deep, 400, "invalid_request_error", "invalid_json")

        not_object = await client.post("/t/items", json=[1, 2])
        assert_error(not_object, 400, "invalid_request_error", "invalid_body")

        wrong_type = await client.post(
            "/t/items", content=b'{"name": "a"}', headers={"Content-Type": "text/plain"}
        )
        error = assert_error(wrong_type, 400, "invalid_request_error", "unsupported_content_type")
        assert "text/plain" in error["message"]

        invalid = await client.post(
            "/t/items", json={"name": 3, "tags": ["x", 4], "inner": {"weight": "heavy"}}
        )
        error = assert_error(invalid, 400, "invalid_request_error", None)
        assert error["param"] == "name"
        for part in (
            "name: expected a string, got 3",
            "tags[1]: expected a string, got 4",
            'inner.weight: expected a number, got "heavy"',
        ):
            assert part in error["message"]

        missing = await client.post("/t/items", json={})
        assert assert_error(missing, 400, "invalid_request_error", None)["param"] == "name"

        validator = await client.post("/t/items", json={"name": "a", "count": 0})
        error = assert_error(validator, 400, "invalid_request_error", None)
        assert error["param"] == "count"
        assert "expected an integer > 0, got 0" in error["message"]

        too_large = await client.post("/t/items", json={"name": "a" * 3000})
        assert_error(too_large, 413, "invalid_request_error", "payload_too_large")


async def test_status_errors(live_server: StartServer) -> None:
    server = await live_server(extra_blueprints=[probe_blueprint()])
    async with server.client() as client:
        assert_error(await client.get("/nowhere"), 404, "not_found_error", "not_found")
        wrong_method = await client.delete("/health")
        assert_error(wrong_method, 405, "invalid_request_error", "method_not_allowed")
        assert "GET" in wrong_method.headers["Allow"]

        busy = await client.get("/t/busy")
        assert_error(busy, 429, "rate_limit_error", "queue_full")
        assert busy.headers["Retry-After"] == "3"

        assert_error(
            await client.get("/t/unavailable"), 503, "service_unavailable", "service_unavailable"
        )
        assert_error(await client.get("/t/unprocessable"), 422, "invalid_request_error", "nope")

        boom = await client.get("/t/boom")
        error = assert_error(boom, 500, "server_error", "internal_error")
        assert "secret internals" not in boom.text

        assert_error(await client.get("/t/api"), 401, "authentication_error", "missing_api_key")
        admin = await client.get("/t/admin", headers=server.auth("api"))
        assert_error(admin, 403, "permission_error", "admin_required")
        assert (await client.get("/t/admin", headers=server.auth("admin"))).json() == {"ok": True}
        assert error["message"] == "internal server error"


async def test_tracebacks_only_when_enabled(live_server: StartServer) -> None:
    server = await live_server(
        network={"send_tracebacks": True}, extra_blueprints=[probe_blueprint()]
    )
    async with server.client() as client:
        boom = await client.get("/t/boom")
    error = boom.json()["error"]
    assert boom.status_code == 500
    assert "RuntimeError: secret internals" in error["trace"]


async def test_request_ids_are_unique(live_server: StartServer) -> None:
    server = await live_server()
    async with server.client() as client:
        ids = {(await client.get("/health")).headers["X-Request-Id"] for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize(
    ("origins", "origin", "allowed"),
    [
        (["*"], "http://a.example", "*"),
        (["http://a.example"], "http://a.example", "http://a.example"),
        (["http://a.example"], "http://b.example", None),
        ([], "http://a.example", None),
    ],
)
async def test_cors(
    live_server: StartServer, origins: list[str], origin: str, allowed: str | None
) -> None:
    server = await live_server(network={"cors_origins": tuple(origins)})
    async with server.client() as client:
        simple = await client.get("/health", headers={"Origin": origin})
        preflight = await client.options(
            "/v1/auth/permission",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
    assert simple.headers.get("Access-Control-Allow-Origin") == allowed
    assert preflight.headers.get("Access-Control-Allow-Origin") == allowed
    if allowed is not None:
        assert preflight.status_code == 204
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        assert preflight.headers["Access-Control-Allow-Headers"] == "authorization"
    if allowed not in (None, "*"):
        assert "Origin" in simple.headers["Vary"]


async def test_access_log_redacts_secrets(
    live_server: StartServer, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, logger="tabby.access")
    config = attrs.evolve(make_config(tmp_path), logging=LoggingConfig(log_requests=True))
    server = await live_server(config, extra_blueprints=[probe_blueprint()])
    async with server.client() as client:
        response = await client.post(
            "/t/items",
            json={"name": "a", "hf_token": "hf-secret", "nested": [{"api_key": "k-secret"}]},
            headers={
                "Authorization": f"Bearer {server.admin_key}",
                "X-Api-Key": "x-secret",
                "Cookie": "c-secret",
            },
        )
    rid = response.headers["X-Request-Id"]
    text = caplog.text
    assert "POST /t/items 200 " in text
    assert f"id={rid}" in text
    for secret in (server.admin_key, "hf-secret", "k-secret", "x-secret", "c-secret"):
        assert secret not in text
    assert "[redacted]" in text
    assert json.dumps("a") in text  # the body is logged, minus its secrets


def other_shape(exc: TabbyError, trace: str | None) -> dict[str, Any]:
    """Another protocol's error body: {"type": "error", "error": {"type", "message"}}."""
    return {"type": "error", "error": {"type": exc.error_type, "message": exc.message}}


def other_protocol_blueprint() -> quart.Blueprint:
    bp = quart.Blueprint("other_protocol", __name__)
    use_error_renderer(bp, other_shape)

    @bp.post("/other/v1/items")
    async def items() -> dict[str, Any]:
        item = await parse_body(Item)
        return {"item": attrs.asdict(item)}

    @bp.get("/other/v1/busy")
    async def busy() -> dict[str, Any]:
        raise TooManyRequests("the queue is full", retry_after=2.5)

    @bp.get("/other/v1/boom")
    async def boom() -> dict[str, Any]:
        raise RuntimeError("secret internals")

    @bp.get("/other/v1/stream")
    async def stream() -> quart.Response:
        async def events() -> AsyncIterator[SSEItem]:
            yield {"index": 0}
            raise Unprocessable("cannot go on", code="nope")

        return sse_response(events())

    return bp


async def test_a_blueprint_renders_errors_in_its_own_shape(live_server: StartServer) -> None:
    server = await live_server(extra_blueprints=[other_protocol_blueprint()])
    async with server.client() as client:
        invalid = await client.post("/other/v1/items", json={"name": 3})
        assert invalid.status_code == 400
        assert invalid.json() == {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "invalid request: name: expected a string, got 3",
            },
        }
        busy = await client.get("/other/v1/busy")
        assert busy.status_code == 429
        assert busy.headers["Retry-After"] == "3"
        assert busy.json() == {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": "the queue is full"},
        }
        boom = await client.get("/other/v1/boom")
        assert boom.status_code == 500
        assert boom.json() == {
            "type": "error",
            "error": {"type": "server_error", "message": "internal server error"},
        }
        async with client.stream("GET", "/other/v1/stream") as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        assert [json.loads(line[len("data: ") :]) for line in lines] == [
            {"index": 0},
            {"type": "error", "error": {"type": "invalid_request_error", "message": "cannot go on"}},
        ]
        # The OpenAI routes (and every other route) keep the OpenAI shape.
        openai = await client.post("/v1/completions", json={"prompt": 3}, headers=server.auth())
        error = assert_error(openai, 400, "invalid_request_error", None)
        assert error["param"] == "prompt"
        assert_error(await client.get("/nowhere"), 404, "not_found_error", "not_found")


async def test_no_model_is_a_warning_not_an_error(
    live_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = await live_server()
    caplog.set_level(logging.INFO)
    async with server.client(headers=server.auth()) as client:
        for _ in range(3):
            response = await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
            )
            assert response.status_code == 503
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    warnings = [r for r in caplog.records if r.name == "tabby.http.errors"]
    assert len(warnings) == 3
    assert {r.levelname for r in warnings} == {"WARNING"}
