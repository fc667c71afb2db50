"""The OpenAI endpoints on a real server with a tiny random-weight model (reference engine).

The model's text is gibberish, but exact: greedy decoding and seeded sampling are
deterministic, so these tests check choices, logprobs, stops, seeds, batching and
cancellation through HTTP with the official ``openai`` client and httpx.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from tabby.config import NetworkConfig, TabbyConfig
from tabby.config.schema import ModelConfigSection, SamplingConfig
from tabby.server import ServerInfo, serve
from tabby.testing.tiny import make_tiny_hf
from tests.conftest import current_scheduler

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"


async def start_tiny(nursery: trio.Nursery, tmp_path: Path, **model: Any) -> ServerInfo:
    make_tiny_hf(tmp_path / "models" / MODEL, seed=3)
    config = TabbyConfig(
        network=NetworkConfig(host="127.0.0.1", port=0, disable_auth=True, shutdown_grace=1.0),
        model=ModelConfigSection(
            model_dir=str(tmp_path / "models"),
            model_name=MODEL,
            templates_dir=str(REPO / "templates"),
            **model,
        ),
        sampling=SamplingConfig(overrides_dir=str(REPO / "sampler_overrides")),
        base_dir=tmp_path,
    )
    info: ServerInfo = await nursery.start(
        lambda task_status: serve(config, quiet=True, task_status=task_status)
    )
    return info


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> ServerInfo:
    return await start_tiny(nursery, tmp_path, max_batch_size=16)


def client_for(info: ServerInfo) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=info.urls[0] + "/v1", api_key="unused", max_retries=0)


async def sse_events(response: httpx.Response) -> list[Any]:
    events: list[Any] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_chat_n2_logprobs_and_usage(server: ServerInfo) -> None:
    client = client_for(server)
    result = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=6,
        n=2,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ban_eos_token": True},
    )
    assert [c.index for c in result.choices] == [0, 1]
    # Greedy: both choices are the same text, exactly 6 tokens long.
    assert result.choices[0].message.content == result.choices[1].message.content
    for choice in result.choices:
        assert choice.finish_reason == "length"
        assert choice.message.role == "assistant"
        assert choice.logprobs is not None
        content = choice.logprobs.content
        assert content is not None
        assert len(content) == 6
        raw = b"".join(bytes(t.bytes or []) for t in content)
        assert raw.decode("utf-8", errors="replace") == choice.message.content
        for token in content:
            assert token.logprob <= 0
            assert len(token.top_logprobs) == 3
            # Greedy picks the most likely token.
            assert math.isclose(token.top_logprobs[0].logprob, token.logprob, abs_tol=1e-4)
        usage = result.usage
    assert usage is not None
    assert usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + 12


async def test_completions_legacy_logprobs_batch_and_stop(server: ServerInfo) -> None:
    client = client_for(server)
    base = await client.completions.create(
        model=MODEL, prompt="Hello, world!", max_tokens=8, temperature=0,
        extra_body={"ban_eos_token": True},
    )  # fmt: skip
    text = base.choices[0].text
    assert base.object == "text_completion"
    assert base.id.startswith("cmpl-")
    assert base.usage is not None
    assert base.usage.completion_tokens == 8
    # A stop string cut from the middle of the greedy text ends generation there.
    stop = text[3:5]
    stopped = await client.completions.create(
        model=MODEL, prompt="Hello, world!", max_tokens=8, temperature=0, stop=[stop],
        extra_body={"ban_eos_token": True},
    )  # fmt: skip
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.text == text[: text.index(stop)]
    assert choice.model_extra is not None
    assert choice.model_extra["stop_str"] == stop
    # A batch of two prompts with n=2: index = prompt_idx * n + n_idx; legacy logprobs.
    batch = await client.completions.create(
        model=MODEL, prompt=["Hello, world!", "def main():"], n=2, max_tokens=4,
        temperature=0, logprobs=2, extra_body={"ban_eos_token": True},
    )  # fmt: skip
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text == text[: len(batch.choices[0].text)]
    for c in batch.choices:
        lp = c.logprobs
        assert lp is not None
        assert lp.tokens is not None
        assert lp.token_logprobs is not None
        assert lp.top_logprobs is not None
        assert lp.text_offset is not None
        assert len(lp.token_logprobs) == len(lp.tokens) == 4
        assert all(t is not None and len(t) == 2 for t in lp.top_logprobs)
        assert all(v <= 0 for v in lp.token_logprobs)
        offsets = [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
        assert lp.text_offset == offsets
    assert batch.choices[2].text != batch.choices[0].text


async def test_seed_reproducible(server: ServerInfo) -> None:
    client = client_for(server)

    async def sample(seed: int) -> str:
        result = await client.completions.create(
            model=MODEL, prompt="Hello", max_tokens=8, temperature=1.5, seed=seed,
            extra_body={"ban_eos_token": True},
        )  # fmt: skip
        return result.choices[0].text

    first = await sample(1234)
    assert await sample(1234) == first
    assert await sample(99) != first


async def test_streams_are_openai_exact(server: ServerInfo) -> None:
    async with httpx.AsyncClient(base_url=server.urls[0], timeout=30) as http:
        body = {
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5,
            "temperature": 0,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ban_eos_token": True,
        }
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = await sse_events(response)
        plain = await http.post("/v1/chat/completions", json={**body, "stream": False})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 10
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in c["delta"] for c in mine[1:])
        assert mine[-1]["finish_reason"] == "length"
        assert mine[-1]["delta"] == {}
        assert all(c["finish_reason"] is None for c in mine[:-1])
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == plain.json()["choices"][index]["message"]["content"]


async def test_completion_stream_with_openai_client(server: ServerInfo) -> None:
    client = client_for(server)
    stream = await client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=6, temperature=0, stream=True,
        extra_body={"ban_eos_token": True},
    )  # fmt: skip
    texts, finishes = [], []
    async for chunk in stream:
        assert chunk.object == "text_completion"
        assert chunk.id.startswith("cmpl-")
        assert chunk.model == MODEL
        texts.append(chunk.choices[0].text)
        finishes.append(chunk.choices[0].finish_reason)
    assert finishes[-1] == "length"
    plain = await client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=6, temperature=0,
        extra_body={"ban_eos_token": True},
    )  # fmt: skip
    assert "".join(texts) == plain.choices[0].text


async def test_concurrent_streams_are_batched(server: ServerInfo) -> None:
    client = client_for(server)
    scheduler = current_scheduler(server)
    before = await scheduler.statistics()
    results: dict[int, str] = {}
    tokens = 16

    async def one(i: int) -> None:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count {i}"}],
            max_tokens=tokens, temperature=0, stream=True,
            extra_body={"ban_eos_token": True},
        )  # fmt: skip
        parts = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        results[i] = "".join(parts)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(one, i)
    after = await scheduler.statistics()
    assert len(results) == 16
    # Each stream equals the same request alone.
    alone = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count 7"}], max_tokens=tokens,
        temperature=0, extra_body={"ban_eos_token": True},
    )  # fmt: skip
    assert results[7] == alone.choices[0].message.content
    generated = after.tokens_generated - before.tokens_generated
    steps = after.steps - before.steps
    assert generated == 16 * tokens
    # One at a time would take one step per token; batching takes far fewer.
    assert steps < generated / 4


async def test_disconnect_cancels_and_frees_cache(server: ServerInfo) -> None:
    scheduler = current_scheduler(server)
    before = await scheduler.statistics()
    body = {
        "prompt": "Hello", "max_tokens": 1500, "n": 2, "stream": True,
        "ban_eos_token": True,
    }  # fmt: skip
    async with httpx.AsyncClient(base_url=server.urls[0], timeout=30) as http:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            seen = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 6:
                    break
        busy = await scheduler.statistics()
        assert busy.live + busy.queued >= 1
    # The client is gone: both jobs are cancelled and their pages freed, promptly.
    with trio.fail_after(10):
        while True:
            stats = await scheduler.statistics()
            if stats.live == 0 and stats.queued == 0 and stats.cache_pages_used == 0:
                break
            await trio.sleep(0.02)
    assert stats.cache_pages_free > 0
    assert stats.jobs_cancelled - before.jobs_cancelled == 2
    assert stats.jobs_finished == before.jobs_finished
    async with httpx.AsyncClient(base_url=server.urls[0]) as http:
        assert (await http.get("/health")).status_code == 200


async def test_model_field_loads_inline(nursery: trio.Nursery, tmp_path: Path) -> None:
    make_tiny_hf(tmp_path / "models" / "other", seed=4)
    server = await start_tiny(nursery, tmp_path, inline_model_loading=True)
    client = client_for(server)

    async def answer_model(model: str) -> str:
        result = await client.completions.create(model=model, prompt="Hi", max_tokens=2)
        return result.model

    assert await answer_model("gpt-3.5-turbo") == MODEL  # a dummy name never switches
    with pytest.raises(openai.NotFoundError) as unknown:  # an unknown one is not served
        await answer_model("no-such-model")
    assert unknown.value.code == "model_not_found"
    assert await answer_model("other") == "other"
    assert server.services.models.serving_state().model_name == "other"


async def test_disconnect_cancels_a_non_streaming_request(server: ServerInfo) -> None:
    scheduler = current_scheduler(server)
    before = await scheduler.statistics()
    body = {"prompt": "Hello", "max_tokens": 1500, "n": 2, "ban_eos_token": True}
    async with httpx.AsyncClient(base_url=server.urls[0], timeout=30) as http:
        with trio.move_on_after(30) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(http.post, "/v1/completions", json=body))
                # Leave as soon as both jobs run: the client's request is cancelled.
                while (await scheduler.statistics()).live < 2:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught
    with trio.fail_after(10):
        while True:
            stats = await scheduler.statistics()
            if stats.live == 0 and stats.queued == 0 and stats.cache_pages_used == 0:
                break
            await trio.sleep(0.02)
    assert stats.jobs_cancelled - before.jobs_cancelled == 2
    assert stats.jobs_finished == before.jobs_finished
