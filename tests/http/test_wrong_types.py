"""Values of the wrong type where an object is expected, and text that is not valid
Unicode, are 400s naming the field (they used to escape validation as 500s)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import StartServer

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HI, "template_vars": "x"}, "template_vars"),
        ({"messages": HI, "chat_template_kwargs": ["x"]}, "template_vars"),
        ({"messages": HI, "tools": ["x"]}, "tools[0]"),
        ({"messages": HI, "functions": [1]}, "functions[0]"),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": ["x"]}]},
            "messages[0].tool_calls[0]",
        ),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
            "messages[0].content",
        ),
        ({"messages": HI, "stop": ["\udc00"]}, "stop"),
    ],
)
async def test_chat_fields_of_the_wrong_shape_are_400(
    live_server: StartServer, body: dict[str, Any], param: str
) -> None:
    server = await live_server()
    async with server.client(headers=server.auth()) as client:
        # httpx would refuse to encode a lone surrogate; JSON escapes carry it as clients do.
        response = await client.post(
            "/v1/chat/completions",
            content=_json(body),
            headers={"Content-Type": "application/json"},
        )
        health = await client.get("/health")
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None
    assert error["param"].startswith(param)
    assert health.status_code == 200


async def test_a_lone_surrogate_in_a_completion_prompt_is_400(live_server: StartServer) -> None:
    server = await live_server()
    async with server.client(headers=server.auth()) as client:
        response = await client.post(
            "/v1/completions",
            content=_json({"prompt": "x\ud800y"}),
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
    assert "surrogate" in response.json()["error"]["message"]


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode("ascii")


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("stop", "x" * 70_000, "stop"),
        ("stop", ["ab" * 20_000, "cd" * 20_000], "stop"),
        ("banned_strings", ["é" * 40_000], "banned_strings"),
    ],
)
async def test_stop_and_banned_strings_are_capped(
    live_server: StartServer, field: str, value: Any, param: str
) -> None:
    server = await live_server()
    async with server.client(headers=server.auth()) as client:
        response = await client.post(
            "/v1/completions", json={"prompt": "hi", field: value}
        )
        small = await client.post("/v1/completions", json={"prompt": "hi", field: "x" * 1000})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert "at most 65536" in response.json()["error"]["message"]
    # Within the cap the request passes validation (no model is loaded here: 503).
    assert small.status_code == 503
