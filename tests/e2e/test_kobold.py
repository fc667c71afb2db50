"""The KoboldAI API on a real server with a tiny random-weight model (reference engine).

A Kobold-style client flow (stream, check mid-way, abort, ownership of genkeys), the
Kobold sampler names against the equivalent OpenAI completion with the same seed, every
endpoint, and the API switched off.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from tabby.actors.keyfile import add_api_key, create_key_file
from tabby.config import NetworkConfig, TabbyConfig
from tabby.config.schema import ModelConfigSection, SamplingConfig
from tabby.http.kobold.routes import DEFAULT_MAX_LENGTH
from tabby.server import ServerInfo, serve
from tabby.testing.tiny import make_tiny_hf
from tests.conftest import StartServer, current_scheduler

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"
CONTEXT = 2048
# Long enough that the generation is still running when the flow aborts it.
LONG = 1900


@attrs.frozen
class KoboldServer:
    info: ServerInfo
    admin: dict[str, str]
    owner: dict[str, str]  # the API key that starts generations
    other: dict[str, str]  # another API key

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.info.urls[0], timeout=60)


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> KoboldServer:
    make_tiny_hf(tmp_path / "models" / MODEL, seed=3)
    keys_path = tmp_path / "api_tokens.toml"
    keys = create_key_file(keys_path)
    other = add_api_key(keys_path)
    config = TabbyConfig(
        network=NetworkConfig(
            host="127.0.0.1", port=0, shutdown_grace=1.0, api_servers=("OAI", "Kobold"),
            api_tokens_file=str(keys_path),
        ),
        model=ModelConfigSection(
            model_dir=str(tmp_path / "models"), model_name=MODEL, max_batch_size=8,
            templates_dir=str(REPO / "templates"),
        ),
        sampling=SamplingConfig(overrides_dir=str(REPO / "sampler_overrides")),
        base_dir=tmp_path,
    )  # fmt: skip
    info: ServerInfo = await nursery.start(
        lambda task_status: serve(config, quiet=True, task_status=task_status)
    )
    return KoboldServer(info, _bearer(keys.admin_key), _bearer(keys.api_keys[0]), _bearer(other))


async def _messages(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The ``data`` of each ``event: message`` of a Kobold stream."""
    event = None
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            assert event == "message", line
            yield json.loads(line[len("data: ") :])
            event = None


async def _check(http: httpx.AsyncClient, genkey: str, headers: dict[str, str]) -> httpx.Response:
    return await http.post("/api/extra/generate/check", json={"genkey": genkey}, headers=headers)


async def _abort(http: httpx.AsyncClient, genkey: str, headers: dict[str, str]) -> httpx.Response:
    return await http.post("/api/extra/abort", json={"genkey": genkey}, headers=headers)


async def test_stream_check_abort_flow(server: KoboldServer) -> None:
    scheduler = current_scheduler(server.info)
    before = await scheduler.statistics()
    body = {
        "prompt": "Hello", "max_length": LONG, "use_default_badwordsids": True,
        "temperature": 0, "genkey": "KCPP-flow",
    }  # fmt: skip
    received: list[str] = []
    final: dict[str, Any] = {}
    async with server.client() as http:
        with trio.fail_after(60):
            stream = http.stream(
                "POST", "/api/extra/generate/stream", json=body, headers=server.owner
            )
            async with stream as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                messages = _messages(response)
                async for data in messages:
                    received.append(data["token"])
                    if len(received) >= 3:
                        break
                # Mid-way: the text so far extends what the client has received.
                check = await _check(http, "KCPP-flow", server.owner)
                so_far = check.json()["results"][0]["text"]
                assert so_far.startswith("".join(received))
                # A second generation under a live genkey is refused.
                clash = await http.post("/api/v1/generate", json=body, headers=server.owner)
                assert clash.status_code == 409
                assert clash.json()["error"]["param"] == "genkey"
                # Another API key may neither look at nor abort it; the admin may.
                peek = await http.get(
                    "/api/extra/generate/check", params={"genkey": "KCPP-flow"},
                    headers=server.other,
                )  # fmt: skip
                assert peek.status_code == 403
                assert peek.json()["error"]["type"] == "permission_error"
                refused = await _abort(http, "KCPP-flow", server.other)
                assert refused.status_code == 403
                aborted = await _abort(http, "KCPP-flow", server.admin)
                assert aborted.json() == {"success": True}
                # The stream ends, with the text so far and an "abort" finish.
                async for data in messages:
                    received.append(data["token"])
                    final = data
        text = "".join(received)
        assert final == {"token": "", "finish_reason": "abort"}
        assert text.startswith(so_far)
        assert len(text) < LONG  # it did not run to the end
        # The job is gone from the scheduler, and the genkey from the registry.
        after = await scheduler.statistics()
        assert after.live == 0
        assert after.queued == 0
        assert after.jobs_cancelled - before.jobs_cancelled == 1
        assert (await _check(http, "KCPP-flow", server.owner)).json() == {"results": []}
        assert (await _abort(http, "KCPP-flow", server.owner)).json() == {"success": False}


async def test_owner_aborts_blocking_generate(server: KoboldServer) -> None:
    body = {
        "prompt": "Hello", "max_length": LONG, "use_default_badwordsids": True,
        "genkey": "KCPP-block", "sampler_seed": 5,
    }  # fmt: skip
    result: dict[str, Any] = {}
    async with server.client() as http:

        async def generate() -> None:
            response = await http.post("/api/v1/generate", json=body, headers=server.owner)
            assert response.status_code == 200
            result.update(response.json()["results"][0])

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(generate)
                # A polling client, as Kobold Lite polls: wait for the first text.
                so_far = ""
                while not so_far:
                    await trio.sleep(0.02)
                    results = (await _check(http, "KCPP-block", server.owner)).json()["results"]
                    so_far = results[0]["text"] if results else ""
                aborted = await _abort(http, "KCPP-block", server.owner)
                assert aborted.json() == {"success": True}
    assert result["finish_reason"] == "abort"
    assert result["text"].startswith(so_far)
    stats = await current_scheduler(server.info).statistics()
    assert stats.live == 0


KOBOLD_SAMPLERS: dict[str, Any] = {
    "max_length": 16, "min_length": 4, "rep_pen": 1.15, "rep_pen_range": 0,
    "typical": 0.95, "temperature": 1.3, "dynatemp_range": 0.4, "dynatemp_exponent": 1.5,
    "top_k": 40, "top_p": 0.95, "min_p": 0.02, "use_default_badwordsids": True,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5], "rep_pen_slope": 0.7,
}  # fmt: skip
OPENAI_SAMPLERS: dict[str, Any] = {
    "max_tokens": 16, "min_tokens": 4, "repetition_penalty": 1.15, "penalty_range": -1,
    "typical_p": 0.95, "temperature": 1.3, "min_temp": 0.9, "max_temp": 1.7,
    "temp_exponent": 1.5, "top_k": 40, "top_p": 0.95, "min_p": 0.02, "ban_eos_token": True,
}  # fmt: skip


async def test_kobold_names_sample_like_openai(server: KoboldServer) -> None:
    prompt = "The capital of France is"
    async with server.client() as http:

        async def kobold(**extra: Any) -> str:
            body = {"prompt": prompt, **KOBOLD_SAMPLERS, **extra}
            response = await http.post("/api/v1/generate", json=body, headers=server.owner)
            assert response.status_code == 200, response.text
            text: str = response.json()["results"][0]["text"]
            return text

        async def openai(**extra: Any) -> str:
            body = {"prompt": prompt, **OPENAI_SAMPLERS, **extra}
            response = await http.post("/v1/completions", json=body, headers=server.owner)
            assert response.status_code == 200, response.text
            text: str = response.json()["choices"][0]["text"]
            return text

        async def count(text: str) -> int:
            response = await http.post(
                "/api/extra/tokencount", json={"prompt": text}, headers=server.owner
            )
            value: int = response.json()["value"]
            return value

        kobold_text = await kobold(sampler_seed=777)
        assert kobold_text == await openai(seed=777)
        assert await count(kobold_text) >= 4
        # The seed matters (so equal texts above are not a coincidence of greedy decoding).
        others = {await kobold(sampler_seed=s) for s in (1, 2, 3)}
        assert others != {kobold_text}
        # seed wins over sampler_seed.
        assert await kobold(seed=777, sampler_seed=1) == kobold_text
        # stop_sequence is the stop list: the same cut as OpenAI's stop.
        stop = kobold_text[4:6]
        # (min_length 0: a stop within the first tokens counts; EOS is banned either way.)
        cut = await kobold(sampler_seed=777, min_length=0, stop_sequence=[stop])
        assert cut == await openai(seed=777, min_tokens=0, stop=[stop])
        assert cut == kobold_text[: kobold_text.index(stop)]


async def _openai_text(http: httpx.AsyncClient, server: KoboldServer, tokens: int) -> str:
    """The greedy completion of "Hi" with exactly ``tokens`` tokens."""
    body = {"prompt": "Hi", "max_tokens": tokens, "ban_eos_token": True, "temperature": 0}
    response = await http.post("/v1/completions", json=body, headers=server.owner)
    assert response.json()["usage"]["completion_tokens"] == tokens
    text: str = response.json()["choices"][0]["text"]
    return text


async def test_every_endpoint_answers(server: KoboldServer) -> None:
    async with server.client() as http:
        for prefix in ("/api/v1", "/api/latest"):
            model = await http.get(f"{prefix}/model", headers=server.owner)
            assert model.json() == {"result": f"tabby/{MODEL}"}
            ctx = await http.get(f"{prefix}/config/max_context_length", headers=server.owner)
            assert ctx.json() == {"value": CONTEXT}
            length = await http.get(f"{prefix}/config/max_length", headers=server.owner)
            assert length.json() == {"value": DEFAULT_MAX_LENGTH}
            version = await http.get(f"{prefix}/info/version")
            assert version.json() == {"result": "1.2.5"}
            prompts = await http.get(f"{prefix}/config/soft_prompts_list")
            assert prompts.json() == {"values": []}
            assert (await http.get(f"{prefix}/config/soft_prompt")).json() == {"value": ""}
            assert (await http.put(f"{prefix}/config/soft_prompt")).json() == {}
        true_ctx = await http.get("/api/extra/true_max_context_length", headers=server.owner)
        assert true_ctx.json() == {"value": CONTEXT}
        extra = await http.get("/api/extra/version")
        assert extra.json() == {"result": "KoboldCpp", "version": "1.74"}
        count = await http.post(
            "/api/extra/tokencount", json={"prompt": "Hello, world!"}, headers=server.owner
        )
        assert count.json()["value"] == len(count.json()["ids"]) > 0
        # Without max_length, a generate is the default length long.
        plain = await http.post(
            "/api/latest/generate",
            json={"prompt": "Hi", "use_default_badwordsids": True, "temperature": 0},
            headers=server.owner,
        )
        assert plain.json()["results"][0]["finish_reason"] == "length"
        same = await _openai_text(http, server, DEFAULT_MAX_LENGTH)
        assert plain.json()["results"][0]["text"] == same
        # A sampler preset's length is the default (and what max_length reports).
        switch = await http.post(
            "/v1/sampling/override/switch",
            json={"overrides": {"max_tokens": {"override": 7}}},
            headers=server.admin,
        )
        assert switch.status_code == 200, switch.text
        length = await http.get("/api/v1/config/max_length", headers=server.owner)
        assert length.json() == {"value": 7}
        short = await http.post(
            "/api/v1/generate",
            json={"prompt": "Hi", "use_default_badwordsids": True, "temperature": 0},
            headers=server.owner,
        )
        assert short.json()["results"][0]["text"] == await _openai_text(http, server, 7)
        # check and abort of a genkey that is not running.
        assert (await _check(http, "nothing", server.owner)).json() == {"results": []}
        assert (await _abort(http, "nothing", server.owner)).json() == {"success": False}
        # Auth and validation errors in tabby's one format.
        unauthorized = await http.post("/api/v1/generate", json={"prompt": "Hi"})
        assert unauthorized.status_code == 401
        assert unauthorized.json()["error"]["code"] == "missing_api_key"
        bad = await http.post(
            "/api/v1/generate", json={"prompt": "Hi", "rep_pen": 0}, headers=server.owner
        )
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "repetition_penalty"
        too_long = await http.post(
            "/api/v1/generate",
            json={"prompt": "Hi", "max_length": 64, "max_context_length": 64},
            headers=server.owner,
        )
        assert too_long.status_code == 400
        assert too_long.json()["error"]["param"] == "max_tokens"
        no_genkey = await http.post("/api/extra/abort", json={}, headers=server.owner)
        assert no_genkey.status_code == 400
        assert no_genkey.json()["error"]["param"] == "genkey"


async def test_trimmed_to_max_context_length(server: KoboldServer) -> None:
    prompt = "The quick brown fox jumps over the lazy dog. " * 8
    async with server.client() as http:
        count = await http.post(
            "/api/extra/tokencount", json={"prompt": prompt}, headers=server.owner
        )
        assert count.json()["value"] > 48
        response = await http.post(
            "/api/v1/generate",
            json={
                "prompt": prompt, "max_context_length": 48, "max_length": 8,
                "temperature": 0, "use_default_badwordsids": True,
            },
            headers=server.owner,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["finish_reason"] == "length"


async def test_kobold_off_or_without_model(live_server: StartServer) -> None:
    off = await live_server(network={"disable_auth": True})
    async with off.client() as http:
        for method, path in (("POST", "/api/v1/generate"), ("GET", "/api/extra/version")):
            response = await http.request(method, path, json={"prompt": "Hi"})
            assert response.status_code == 404
            assert response.json()["error"]["type"] == "not_found_error"
    on = await live_server(network={"disable_auth": True, "api_servers": ["oai", "kobold"]})
    async with on.client() as http:
        for method, path in (("POST", "/api/v1/generate"), ("GET", "/api/v1/model")):
            response = await http.request(method, path, json={"prompt": "Hi"})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "model_not_loaded"
        assert (await http.get("/api/extra/version")).status_code == 200
