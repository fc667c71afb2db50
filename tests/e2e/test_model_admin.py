"""Model administration against a real server with tiny real models: loads with SSE
progress, refused and failing loads, and load / unload / template switch while
completions stream."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tabby.errors import NoModelLoaded
from tests.admin_rig import admin_config, sse_events
from tests.conftest import LiveServer, StartServer, current_scheduler

PROGRESS_KEYS = {"model_type", "module", "modules", "status"}
GENERATION_TOKENS = 40  # long enough to still run when the admin call arrives
NO_HANG_S = 60  # a generous bound; a hang fails instead of blocking the suite


async def load(server: LiveServer, client: httpx.AsyncClient, body: dict[str, Any]) -> list[Any]:
    async with client.stream(
        "POST", "/v1/model/load", json=body, headers=server.auth("admin")
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return await sse_events(response)


async def current_model(server: LiveServer, client: httpx.AsyncClient) -> str | None:
    r = await client.get("/v1/model", headers=server.auth())
    if r.status_code == 503:
        return None
    assert r.status_code == 200, r.text
    name: str = r.json()["id"]
    return name


async def test_load_streams_progress_and_serves_the_model(
    live_server: StartServer, tmp_path: Path
) -> None:
    server = await live_server(admin_config(tmp_path))
    async with server.client() as client:
        events = await load(server, client, {"model_name": "tiny2", "max_seq_len": 128})
        assert len(events) >= 2
        for event in events:
            assert set(event) == PROGRESS_KEYS, event
            assert event["model_type"] == "model"
            assert 1 <= event["module"] <= event["modules"]
        assert [e["status"] for e in events[:-1]] == ["processing"] * (len(events) - 1)
        assert events[-1]["status"] == "finished"
        card = (await client.get("/v1/model", headers=server.auth())).json()
        assert (card["id"], card["parameters"]["max_seq_len"]) == ("tiny2", 128)
        listed = (await client.get("/v1/models", headers=server.auth())).json()["data"]
        assert [c["id"] for c in listed] == ["tiny2"]
        # The model that is already loaded: one finished event, nothing reloaded.
        again = await load(server, client, {"model_name": "tiny2"})
        assert again == [{"model_type": "model", "module": 1, "modules": 1, "status": "finished"}]
        r = await client.post("/v1/model/unload", headers=server.auth("admin"))
        assert r.json() == {"status": "unloaded"}
        assert await current_model(server, client) is None
        assert (await client.get("/v1/models", headers=server.auth())).json()["data"] == []


async def test_refused_loads_are_plain_errors_and_keep_the_model(
    live_server: StartServer, tmp_path: Path
) -> None:
    server = await live_server(admin_config(tmp_path))
    outside = tmp_path / "x"
    outside.mkdir()
    (outside / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    cases: list[tuple[Any, int, str]] = [
        ({"model_name": "missing"}, 400, "model_name"),
        ({"model_name": "../x"}, 400, "model_name"),
        ({"model_name": str(outside)}, 400, "model_name"),
        ({"model_name": "tiny2", "backend": "nope"}, 400, "backend"),
        ({"model_name": "tiny2", "max_seq_len": "long"}, 400, "max_seq_len"),
        ({}, 400, "model_name"),
    ]
    async with server.client() as client:
        for body, status, param in cases:
            r = await client.post("/v1/model/load", json=body, headers=server.auth("admin"))
            assert r.status_code == status, (body, r.text)
            assert r.headers["content-type"] == "application/json"
            error = r.json()["error"]
            assert (error["type"], error["param"]) == ("invalid_request_error", param), error
        r = await client.post("/v1/model/load", json={"model_name": "missing"},
                              headers=server.auth("admin"))
        assert r.json()["error"]["code"] == "model_not_found"
        assert await current_model(server, client) == "tiny"


async def test_a_failing_load_ends_the_stream_with_one_error_event(
    live_server: StartServer, tmp_path: Path
) -> None:
    config = admin_config(tmp_path)
    broken = tmp_path / "models" / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    }))
    server = await live_server(config)
    async with server.client() as client:
        events = await load(server, client, {"model_name": "broken"})
        assert events, "no events"
        *progress, last = events
        assert all(set(e) == PROGRESS_KEYS for e in progress)
        assert set(last) == {"error"}
        assert last["error"]["message"]
        # The previous model is gone (as documented), the failure is on record.
        assert await current_model(server, client) is None
        health = await client.get("/health")
        assert health.status_code == 503
        # A good load clears the problem.
        assert (await load(server, client, {"model_name": "tiny"}))[-1]["status"] == "finished"
        assert (await client.get("/health")).status_code == 200


Operation = Callable[[LiveServer, httpx.AsyncClient], Awaitable[None]]


async def switch_template(server: LiveServer, client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/template/switch", json={"name": "chatml"}, headers=server.auth("admin")
    )
    assert r.status_code == 200, r.text


async def load_draining(server: LiveServer, client: httpx.AsyncClient) -> None:
    events = await load(server, client, {"model_name": "tiny2"})
    assert events[-1]["status"] == "finished"


async def load_skipping_queue(server: LiveServer, client: httpx.AsyncClient) -> None:
    events = await load(server, client, {"model_name": "tiny", "skip_queue": True})
    assert events[-1]["status"] == "finished"


async def unload(server: LiveServer, client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/model/unload", headers=server.auth("admin"))
    assert r.status_code == 200, r.text


async def stream_completion(
    server: LiveServer, client: httpx.AsyncClient, started: trio.Event
) -> list[str]:
    """Every ``data:`` payload of one streamed completion (``started`` at the first)."""
    body = {
        "prompt": "Hello",
        "max_tokens": GENERATION_TOKENS,
        "stream": True,
        "temperature": 0,
        "ban_eos_token": True,
    }
    payloads: list[str] = []
    async with client.stream(
        "POST", "/v1/completions", json=body, headers=server.auth()
    ) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                payloads.append(line[len("data: "):])
                started.set()
    return payloads


async def run_during_generation(
    server: LiveServer, client: httpx.AsyncClient, operation: Operation
) -> list[str]:
    """Start a streamed completion, run ``operation`` once text flows, return the stream."""
    result: list[list[str]] = []
    started = trio.Event()
    with trio.fail_after(NO_HANG_S):
        async with trio.open_nursery() as nursery:

            async def generate() -> None:
                result.append(await stream_completion(server, client, started))

            nursery.start_soon(generate)
            await started.wait()
            await operation(server, client)
    return result[0]


def outcome(payloads: list[str]) -> str:
    """"finished" (ended with [DONE]) or "error" (ended with one error event)."""
    assert payloads, "empty stream"
    if payloads[-1] == "[DONE]":
        texts = [json.loads(p) for p in payloads[:-1]]
        assert all("error" not in t for t in texts)
        return "finished"
    last = json.loads(payloads[-1])
    assert set(last) == {"error"}, last
    assert last["error"]["message"]
    assert all("error" not in json.loads(p) for p in payloads[:-1])
    return "error"


async def test_admin_changes_while_a_completion_streams(
    live_server: StartServer, tmp_path: Path
) -> None:
    config = admin_config(tmp_path, model={"max_seq_len": 512, "cache_size": 2048})
    server = await live_server(config)
    async with server.client(timeout=NO_HANG_S) as client:
        # A template switch never disturbs running jobs.
        payloads = await run_during_generation(server, client, switch_template)
        assert outcome(payloads) == "finished"
        # A load waits for running jobs to finish (they are drained) ...
        payloads = await run_during_generation(server, client, load_draining)
        assert outcome(payloads) == "finished"
        assert await current_model(server, client) == "tiny2"
        # ... unless skip_queue: then they end early, cleanly.
        payloads = await run_during_generation(server, client, load_skipping_queue)
        assert outcome(payloads) in ("finished", "error")
        assert await current_model(server, client) == "tiny"
        # An unload cancels running jobs by default.
        scheduler = current_scheduler(server.info)
        payloads = await run_during_generation(server, client, unload)
        assert outcome(payloads) in ("finished", "error")
        assert await current_model(server, client) is None
        # Nothing is left running (the model's scheduler ended once its jobs were gone,
        # and no other is resident), and new requests get a clear 503.
        with pytest.raises(NoModelLoaded):
            await scheduler.statistics()
        models = server.info.services.models
        assert models is not None
        assert (await models.statistics()).resident == ()
        r = await client.post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=server.auth()
        )
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "model_not_loaded"
