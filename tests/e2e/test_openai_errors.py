"""Bad input and failures on the OpenAI endpoints, against a real server.

The server runs the zero-cost scripted backend (``tabby.backends.scripted``) in place of
the reference engine, so these tests cost almost nothing but the HTTP round trips.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tabby.backends.base import LoadSpec, ProgressCallback
from tabby.backends.registry import BackendEntry, BackendRegistry, default_registry
from tabby.backends.scripted import ScriptedBackend
from tabby.config import NetworkConfig, TabbyConfig
from tabby.config.schema import (
    DeveloperConfig,
    LoggingConfig,
    ModelConfigSection,
    SamplingConfig,
)

REPO = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HELLO = [{"role": "user", "content": "Hello"}]


def scripted_registry(backends: list[ScriptedBackend]) -> BackendRegistry:
    def load(spec: LoadSpec, _progress: ProgressCallback) -> ScriptedBackend:
        backend = ScriptedBackend(name=spec.name, path=str(spec.path), max_seq_len=512)
        backends.append(backend)
        return backend

    return default_registry().with_entry(BackendEntry("reference", load))


def scripted_config(tmp_path: Path, **developer: Any) -> TabbyConfig:
    return TabbyConfig(
        network=NetworkConfig(host="127.0.0.1", port=0, shutdown_grace=1.0),
        model=ModelConfigSection(
            model_dir=str(tmp_path / "models"),
            templates_dir=str(REPO / "templates"),
            prompt_template="chatml",
        ),
        sampling=SamplingConfig(overrides_dir=str(REPO / "sampler_overrides")),
        developer=DeveloperConfig(**developer),
        base_dir=tmp_path,
    )


Case = tuple[str, Any, int, str | None, str | None]  # path, body, status, param, code

BAD_BODIES: list[Case] = [
    (CHAT, {}, 400, "messages", None),
    (CHAT, {"messages": "Hello"}, 400, "messages", None),
    (CHAT, {"messages": []}, 400, "messages", None),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    (CHAT, {"messages": [{"role": 1, "content": "x"}]}, 400, "messages[0].role", None),
    (COMPLETIONS, {}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": 12}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, 400, "temperature", None),
    (COMPLETIONS, {"prompt": "x", "temperature": -1}, 400, "temperature", None),
    (COMPLETIONS, {"prompt": "x", "temperature": 1e9}, 400, "temperature", None),
    (COMPLETIONS, {"prompt": "x", "top_p": 1.5}, 400, "top_p", None),
    (COMPLETIONS, {"prompt": "x", "max_tokens": -5}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "x", "max_completion_tokens": "many"}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "x", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens", None),
    (COMPLETIONS, {"prompt": "x", "n": 0}, 400, "n", None),
    (COMPLETIONS, {"prompt": "x", "n": 10_000}, 400, "n", None),
    (COMPLETIONS, {"prompt": ["a"] * 5, "n": 16}, 400, "n", None),
    (COMPLETIONS, {"prompt": "x", "top_logprobs": 100}, 400, "top_logprobs", None),
    (COMPLETIONS, {"prompt": "x", "stream": "yes"}, 400, "stream", None),
    (COMPLETIONS, {"prompt": "x", "frequency_penalty": -1}, 400, "frequency_penalty", None),
    (COMPLETIONS, {"prompt": "x", "seed": 2**70}, 400, "seed", None),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
    (COMPLETIONS, {"prompt": "x", "stop": 7}, 400, "stop", None),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": 1}}, 400,
     "stream_options.include_usage", None),
    (COMPLETIONS, [1, 2], 400, None, "invalid_body"),
    (COMPLETIONS, {"prompt": "x" * 600}, 400, "prompt", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": ["ok", "x" * 600]}, 400, "prompt[1]", "context_length_exceeded"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 600}], "stream": True}, 400,
     "messages", "context_length_exceeded"),
    (CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]}]}, 400, "messages[0].content[1]", "vision_not_supported"),
    (CHAT, {"messages": HELLO, "continue_final_message": True}, 422,
     "continue_final_message", None),
]  # fmt: skip


async def test_bad_input_matrix(live_server: Callable[..., Awaitable[Any]], tmp_path: Path) -> None:
    server = await live_server(scripted_config(tmp_path), registry=scripted_registry([]))
    async with server.client() as http:
        for path, body, status, param, code in BAD_BODIES:
            r = await http.post(path, json=body, headers=server.auth())
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert error["param"] == param, (body, error)
            if code is not None:
                assert error["code"] == code, (body, error)
            assert error["message"]
        raw_cases = [
            (b'{"prompt": "x",', "application/json", "invalid_json"),
            (b"prompt=x", "application/x-www-form-urlencoded", "unsupported_content_type"),
            (b'{"prompt": "x"}', "text/plain", "unsupported_content_type"),
        ]
        for content, content_type, code in raw_cases:
            headers = {**server.auth(), "Content-Type": content_type}
            r = await http.post(COMPLETIONS, content=content, headers=headers)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == code
        r = await http.post(COMPLETIONS, json={"prompt": "x"})
        assert r.status_code == 401
        # Still healthy and serving.
        assert (await http.get("/health")).status_code == 200
        r = await http.post(
            COMPLETIONS, json={"prompt": "x", "max_tokens": 3}, headers=server.auth()
        )
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == "The"


async def test_scripted_answers_and_usage(
    live_server: Callable[..., Awaitable[Any]], tmp_path: Path
) -> None:
    server = await live_server(scripted_config(tmp_path), registry=scripted_registry([]))
    async with server.client() as http:
        body = {"messages": HELLO, "max_tokens": 9, "n": 2, "stop": ["brown"]}
        r = await http.post(CHAT, json=body, headers=server.auth())
        assert r.status_code == 200
        data = r.json()
        assert data["object"] == "chat.completion"
        assert data["model"] == "SmolLM2-135M-Instruct"
        for index, choice in enumerate(data["choices"]):
            assert choice == {
                "index": index,
                "message": {
                    "content": "The quick",
                    "role": "assistant",
                    "reasoning_content": None,
                    "tool_calls": None,
                },
                "finish_reason": "length",
                "stop_str": None,
                "logprobs": None,
            }
        usage = data["usage"]
        assert usage["completion_tokens"] == 18
        assert usage["total_tokens"] == usage["prompt_tokens"] + 18
        assert usage["prompt_tokens_details"] == {"cached_tokens": 0}
        for key in ("prompt_time", "completion_time", "total_time", "queue_time"):
            assert isinstance(usage[key], float)
        r = await http.post(CHAT, json={**body, "max_tokens": 50}, headers=server.auth())
        choice = r.json()["choices"][0]
        assert (choice["message"]["content"], choice["finish_reason"], choice["stop_str"]) == (
            "The quick ",
            "stop",
            "brown",
        )
        # Fields OpenAI defines but tabby ignores are accepted.
        r = await http.post(
            COMPLETIONS, json={"prompt": "abc", "max_tokens": 4, "echo": True, "user": "u"},
            headers=server.auth(),
        )  # fmt: skip
        assert r.json()["choices"][0]["text"] == "The "
        assert r.json()["id"].startswith("cmpl-")


async def test_error_during_stream_is_one_event(
    live_server: Callable[..., Awaitable[Any]], tmp_path: Path
) -> None:
    backends: list[ScriptedBackend] = []
    server = await live_server(scripted_config(tmp_path), registry=scripted_registry(backends))
    backends[0].fail_next_steps(RuntimeError("device lost"))
    async with server.client() as http:
        body = {"messages": HELLO, "max_tokens": 5, "stream": True}
        async with http.stream("POST", CHAT, json=body, headers=server.auth()) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        events = [json.loads(line[len("data: ") :]) for line in lines]
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[-1]["error"]["code"] == "generation_failed"
        assert "device lost" in events[-1]["error"]["message"]
        assert len(events) == 2  # no [DONE] after an error
        r = await http.post(CHAT, json={**body, "stream": False}, headers=server.auth())
        assert r.status_code == 200


@pytest.mark.parametrize("stream", [True, False])
async def test_streaming_can_be_disabled(
    live_server: Callable[..., Awaitable[Any]], tmp_path: Path, stream: bool
) -> None:
    config = scripted_config(tmp_path, disable_request_streaming=True)
    server = await live_server(config, registry=scripted_registry([]))
    async with server.client() as http:
        body = {"prompt": "x", "max_tokens": 4, "stream": stream}
        r = await http.post(COMPLETIONS, json=body, headers=server.auth())
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["choices"][0]["text"] == "The "
        assert "usage" in r.json()


class Records(logging.Handler):
    """Collects records of tabby's loggers (which may not propagate to the root)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.name, record.getMessage()))


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(n) for n in ("tabby.metrics", "tabby.requests", "tabby.http.openai.routes")]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


async def test_logging_switches_and_metrics_line(
    live_server: Callable[..., Awaitable[Any]], tmp_path: Path, records: Records
) -> None:
    base = scripted_config(tmp_path)
    quiet = await live_server(base, registry=scripted_registry([]))
    body = {"prompt": "secret prompt", "max_tokens": 3}
    async with quiet.client() as http:
        assert (await http.post(COMPLETIONS, json=body, headers=quiet.auth())).status_code == 200
    metrics = [m for name, m in records.messages if name == "tabby.metrics"]
    assert len(metrics) == 1
    assert "3 generated" in metrics[0]
    assert not any("secret prompt" in m for _, m in records.messages)
    records.messages.clear()
    loud = attrs.evolve(
        base,
        logging=LoggingConfig(log_prompt=True, log_generation_params=True),
        base_dir=tmp_path / "loud",
    )
    server = await live_server(loud, registry=scripted_registry([]))
    async with server.client() as http:
        assert (await http.post(COMPLETIONS, json=body, headers=server.auth())).status_code == 200
    messages = [m for _, m in records.messages]
    assert any("secret prompt" in m for m in messages)
    assert any("max_new_tokens=3" in m for m in messages)
