"""The ``model`` field, requests during a model switch, and health and readiness, against
a real server.

The server runs the zero-cost scripted backend in place of the reference engine; the
load of ``beta`` can be held (``threading.Event``), so a switch lasts exactly as long as
a test needs, and steps can be slowed down, so a job is still running when a test acts.
(A held step would also hold the scheduler's statistics, which are answered between
steps.)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio

from tabby.backends.base import LoadSpec, ProgressCallback
from tabby.backends.registry import BackendEntry, BackendRegistry, default_registry
from tabby.backends.scripted import ScriptedBackend
from tabby.config import NetworkConfig, TabbyConfig
from tabby.config.schema import EmbeddingsConfig, ModelConfigSection, SamplingConfig
from tests.conftest import LiveServer, StartServer, current_scheduler

REPO = Path(__file__).resolve().parents[2]
NO_HANG_S = 30  # a hang fails the test instead of blocking the suite
HELD_S = 30  # how long a held load or step waits at most for its release


@attrs.define
class Gates:
    """Open by default; a test closes ``load`` to hold ``beta``'s load, or slows steps."""

    load: threading.Event = attrs.Factory(threading.Event)
    step_s: float = 0.0  # seconds every step takes

    def __attrs_post_init__(self) -> None:
        self.load.set()

    def step(self) -> None:
        if self.step_s:
            time.sleep(self.step_s)


def registry(gates: Gates) -> BackendRegistry:
    def load(spec: LoadSpec, _progress: ProgressCallback) -> ScriptedBackend:
        if spec.name == "beta":
            gates.load.wait(HELD_S)
        return ScriptedBackend(
            name=spec.name,
            path=str(spec.path),
            max_seq_len=512,
            max_batch_size=spec.max_batch_size or 8,
            before_step=gates.step,
        )

    return default_registry().with_entry(BackendEntry("reference", load))


def config(tmp_path: Path, *, network: dict[str, Any] | None = None, **model: Any) -> TabbyConfig:
    for name in ("alpha", "beta"):
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return TabbyConfig(
        network=NetworkConfig(host="127.0.0.1", port=0, shutdown_grace=1.0, **(network or {})),
        embeddings=EmbeddingsConfig(embedding_model_name=None),
        model=ModelConfigSection(
            model_dir=str(tmp_path / "models"),
            model_name=model.pop("model_name", "alpha"),
            templates_dir=str(REPO / "templates"),
            prompt_template="chatml",
            **model,
        ),
        sampling=SamplingConfig(overrides_dir=str(REPO / "sampler_overrides")),
        base_dir=tmp_path,
    )


def client_for(server: LiveServer, kind: str = "api") -> openai.AsyncOpenAI:
    key = server.admin_key if kind == "admin" else server.api_key
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


async def wait_until(condition: Any) -> None:
    """Poll a condition of the server's own state (its threads are not trio tasks)."""
    with trio.fail_after(NO_HANG_S):
        while not condition():
            await trio.sleep(0.01)


async def stream_lines(
    client: httpx.AsyncClient, server: LiveServer, body: dict[str, Any]
) -> AsyncIterator[str]:
    async with client.stream(
        "POST", "/v1/completions", json=body, headers=server.auth()
    ) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line:
                yield line


# -- the model field -----------------------------------------------------------------


async def test_the_model_field_names_what_may_be_served(
    live_server: StartServer, tmp_path: Path
) -> None:
    server = await live_server(config(tmp_path), registry=registry(Gates()))
    client = client_for(server)
    ask: dict[str, Any] = {"prompt": "Hi", "max_tokens": 3}
    # The loaded model by its id, a dummy name, and no name at all: the loaded model.
    for name in ("alpha", "gpt-3.5-turbo"):
        result = await client.completions.create(model=name, **ask)
        assert result.model == "alpha"
    async with server.client() as http:
        r = await http.post("/v1/completions", json=ask, headers=server.auth())
        assert (r.status_code, r.json()["model"]) == (200, "alpha")
        r = await http.post("/v1/completions", json={**ask, "model": ""}, headers=server.auth())
        assert r.status_code == 200
        # A model that is not served: 404 in OpenAI's shape, streaming or not, before
        # anything is generated; the same for a model on disk without inline loading.
        for name, stream in (("nope", False), ("nope", True), ("beta", False)):
            body = {**ask, "model": name, "stream": stream}
            r = await http.post("/v1/completions", json=body, headers=server.auth())
            assert r.status_code == 404, r.text
            error = r.json()["error"]
            assert (error["type"], error["param"], error["code"]) == (
                "invalid_request_error", "model", "model_not_found"
            )
            assert repr(name) in error["message"]
        listed = (await http.get("/v1/models", headers=server.auth())).json()["data"]
        assert [card["id"] for card in listed] == ["alpha"]
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )
    assert missing.value.code == "model_not_found"
    assert current_scheduler(server.info) is not None  # nothing was unloaded


async def test_inline_loading_serves_a_model_in_model_dir(
    live_server: StartServer, tmp_path: Path
) -> None:
    server = await live_server(
        config(tmp_path, inline_model_loading=True), registry=registry(Gates())
    )
    ask: dict[str, Any] = {"prompt": "Hi", "max_tokens": 3}
    with pytest.raises(openai.NotFoundError):
        await client_for(server, "admin").completions.create(model="nope", **ask)
    with pytest.raises(openai.AuthenticationError):
        await client_for(server).completions.create(model="beta", **ask)
    result = await client_for(server, "admin").completions.create(model="beta", **ask)
    assert result.model == "beta"
    # Every model in model_dir may be named by the admin, and is listed for it.
    async with server.client() as http:
        listed = (await http.get("/v1/models", headers=server.auth("admin"))).json()["data"]
    assert {"alpha", "beta"} <= {card["id"] for card in listed}


# -- requests during a switch ---------------------------------------------------------


async def start_load(
    nursery: trio.Nursery, server: LiveServer, http: httpx.AsyncClient, name: str
) -> list[dict[str, Any]]:
    """Start loading ``name`` through the admin API; its events gather in the list."""
    events: list[dict[str, Any]] = []

    async def run() -> None:
        async with http.stream(
            "POST", "/v1/model/load", json={"model_name": name}, headers=server.auth("admin")
        ) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: "):]))

    nursery.start_soon(run)
    return events


async def test_requests_during_a_switch_wait_for_the_new_model(
    live_server: StartServer, tmp_path: Path
) -> None:
    gates = Gates()
    network = {"api_servers": ("OAI", "Kobold")}
    server = await live_server(config(tmp_path, network=network), registry=registry(gates))
    models = server.info.services.models
    assert models is not None
    gates.load.clear()
    results: dict[str, Any] = {}
    async with server.client(timeout=NO_HANG_S) as http, trio.open_nursery() as nursery:
        load_events = await start_load(nursery, server, http, "beta")
        await wait_until(lambda: models.serving_state().loading == "beta")

        async def plain() -> None:
            # Named by the model that is loading: valid once it is there.
            answer = await client_for(server).completions.create(
                model="beta", prompt="Hi", max_tokens=3
            )
            results["plain"] = answer.model

        async def streamed() -> None:
            body = {"prompt": "Hi", "max_tokens": 3, "stream": True}
            results["stream"] = [line async for line in stream_lines(http, server, body)]

        async def kobold() -> None:
            body = {"prompt": "Hi", "max_length": 3}
            async with http.stream(
                "POST", "/api/extra/generate/stream", json=body, headers=server.auth()
            ) as response:
                assert response.status_code == 200
                results["kobold"] = [line async for line in response.aiter_lines() if line]

        nursery.start_soon(plain)
        nursery.start_soon(streamed)
        nursery.start_soon(kobold)
        with trio.fail_after(NO_HANG_S):
            while (await models.statistics()).load_waiters < 3:
                await trio.sleep(0.01)
        gates.load.set()
    assert load_events[-1]["status"] == "finished"
    assert results["plain"] == "beta"
    lines = results["stream"]
    assert lines[0] == ": loading"
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert data
    assert all(chunk["model"] == "beta" for chunk in data)
    assert lines[-1] == "data: [DONE]"
    kobold_lines = results["kobold"]
    assert kobold_lines[0] == ": loading"
    assert "event: message" in kobold_lines
    assert json.loads(kobold_lines[-1][6:])["finish_reason"] == "length"


async def test_a_switch_that_outlasts_the_wait_is_a_503_with_retry_after(
    live_server: StartServer, tmp_path: Path
) -> None:
    gates = Gates()
    server = await live_server(
        config(tmp_path, switch_wait_timeout=0.2), registry=registry(gates)
    )
    models = server.info.services.models
    assert models is not None
    gates.load.clear()
    try:
        async with server.client(timeout=NO_HANG_S) as http, trio.open_nursery() as nursery:
            await start_load(nursery, server, http, "beta")
            await wait_until(lambda: models.serving_state().loading == "beta")
            body = {"prompt": "Hi", "max_tokens": 3}
            r = await http.post("/v1/completions", json=body, headers=server.auth())
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "model_not_loaded"
            assert int(r.headers["Retry-After"]) >= 1
            # A streaming request hears the same as the stream's one error event.
            lines = [
                line
                async for line in stream_lines(http, server, {**body, "stream": True})
            ]
            assert lines[0] == ": loading"
            assert json.loads(lines[-1][6:])["error"]["code"] == "model_not_loaded"
            gates.load.set()
    finally:
        gates.load.set()


async def test_a_load_says_it_waits_for_running_jobs(
    live_server: StartServer, tmp_path: Path
) -> None:
    gates = Gates(step_s=0.02)
    server = await live_server(config(tmp_path), registry=registry(gates))
    async with server.client(timeout=NO_HANG_S) as http, trio.open_nursery() as nursery:
        # About 3 s of steps: still running when the load asks.
        body = {"prompt": "Hi", "max_tokens": 150, "stream": True}
        lines: list[str] = []

        async def generate() -> None:
            lines.extend([line async for line in stream_lines(http, server, body)])

        nursery.start_soon(generate)
        scheduler = current_scheduler(server.info)
        with trio.fail_after(NO_HANG_S):
            while (await scheduler.statistics()).live < 1:
                await trio.sleep(0.01)
        events = await start_load(nursery, server, http, "beta")
    assert events[0] == {
        "model_type": "model",
        "status": "waiting",
        "running_jobs": 1,
        "message": "waiting for 1 running job",
    }
    assert {"model_type", "module", "modules", "status"} == set(events[1])
    assert events[-1]["status"] == "finished"
    assert lines[-1] == "data: [DONE]"  # the job was drained, not cancelled


# -- health and readiness ------------------------------------------------------------


async def _post(http: httpx.AsyncClient, server: LiveServer, body: dict[str, Any]) -> None:
    r = await http.post("/v1/completions", json=body, headers=server.auth())
    assert r.status_code == 200, r.text


async def test_health_names_the_model_and_ready_needs_one(
    live_server: StartServer, tmp_path: Path
) -> None:
    gates = Gates()
    network = {"max_queued_requests": 1}
    server = await live_server(
        config(tmp_path, model_name="", max_batch_size=1, network=network),
        registry=registry(gates),
    )
    async with server.client(timeout=NO_HANG_S) as http:
        health = await http.get("/health")
        assert (health.status_code, health.json()["model"]) == (200, "none")
        ready = await http.get("/ready")
        assert ready.status_code == 503
        assert ready.json() == {"status": "unavailable", "reason": "no model is loaded",
                                "model": "none"}

        r = await http.post("/v1/model/load", json={"model_name": "alpha"},
                            headers=server.auth("admin"))
        assert r.status_code == 200
        health = await http.get("/health")
        assert (health.status_code, health.json()["model"]) == (200, "alpha")
        ready = await http.get("/ready")
        assert (ready.status_code, ready.json()["status"]) == (200, "ready")
        assert ready.json()["model"] == "alpha"

        # One job runs, one waits for a batch slot: the queue is at its bound.
        gates.step_s = 0.02
        async with trio.open_nursery() as nursery:
            body = {"prompt": "Hi", "max_tokens": 60}
            scheduler = current_scheduler(server.info)
            # The second only once the first runs: two at once could both count as queued.
            nursery.start_soon(_post, http, server, body)
            with trio.fail_after(NO_HANG_S):
                while (await scheduler.statistics()).live < 1:
                    await trio.sleep(0.01)
            nursery.start_soon(_post, http, server, body)
            with trio.fail_after(NO_HANG_S):
                while (await scheduler.statistics()).queued < 1:
                    await trio.sleep(0.01)
            full = await http.get("/ready")
            assert full.status_code == 503
            assert (full.json()["reason"], full.json()["max_queued"]) == ("the queue is full", 1)
        assert (await http.get("/ready")).status_code == 200
