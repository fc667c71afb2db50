"""The core routes: /health transitions and /.well-known/serviceinfo."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import trio.testing
from conftest import StartServer


async def test_health_transitions(live_server: StartServer) -> None:
    server = await live_server()
    health = server.info.services.health
    async with server.client() as client:
        healthy = await client.get("/health")
        assert (healthy.status_code, healthy.json()) == (200, {"status": "healthy", "model": "none", "problems": []})

        before = datetime.now(UTC)
        health.report("scheduler", "step", "RuntimeError: backend step failed")
        health.report("embedder", "load", "model folder missing")
        await trio.testing.wait_all_tasks_blocked()
        sick = await client.get("/health")
        assert sick.status_code == 503
        body = sick.json()
        assert body["status"] == "unhealthy"
        assert [(p["source"], p["description"]) for p in body["problems"]] == [
            ("scheduler", "RuntimeError: backend step failed"),
            ("embedder", "model folder missing"),
        ]
        for problem in body["problems"]:
            when = datetime.fromisoformat(problem["time"])
            assert when.utcoffset() == timedelta(0)
            assert before <= when <= datetime.now(UTC)

        health.clear("scheduler", "step")
        partly = await client.get("/health")
        assert partly.status_code == 503
        assert [p["source"] for p in partly.json()["problems"]] == ["embedder"]

        health.clear("embedder", "load")
        recovered = await client.get("/health")
        assert (recovered.status_code, recovered.json()["status"]) == (200, "healthy")


async def test_serviceinfo(live_server: StartServer) -> None:
    server = await live_server(network={"api_servers": ("OAI", "Kobold")})
    async with server.client() as client:
        info = (await client.get("/.well-known/serviceinfo")).json()
    assert info["version"] == 0.2
    assert info["software"]["name"] == "tabby"
    assert info["api"]["openai"]["relative_url"] == "/v1"
    assert info["api"]["koboldai"]["relative_url"] == "/api"

    only_oai = await live_server(network={"api_servers": ("OAI",)})
    async with only_oai.client() as client:
        info = (await client.get("/.well-known/serviceinfo")).json()
    assert set(info["api"]) == {"openai"}


async def test_plain_options_is_an_empty_204_with_allow(live_server: StartServer) -> None:
    server = await live_server()
    async with server.client() as client:
        response = await client.options("/health")
    assert response.status_code == 204
    assert response.content == b""
    assert "GET" in response.headers["Allow"]
    assert "text/html" not in response.headers.get("content-type", "")
