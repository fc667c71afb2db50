"""The OpenAI endpoints with the embedded default model (SmolLM2-135M-Instruct).

One server for the whole module's checks: loading the model is the expensive part.
Greedy decoding keeps every answer exact and comparable between the streaming and the
non-streaming path.
"""

from __future__ import annotations

from pathlib import Path

import openai
import trio
from openai.types.chat import ChatCompletionMessageParam

from tabby.config import NetworkConfig, TabbyConfig
from tabby.config.schema import SamplingConfig
from tabby.engine.embedded import DEFAULT_MODEL_NAME
from tabby.server import ServerInfo, serve

REPO = Path(__file__).resolve().parents[2]
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


async def test_default_model_chat_and_completions(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = TabbyConfig(
        network=NetworkConfig(host="127.0.0.1", port=0, disable_auth=True, shutdown_grace=1.0),
        sampling=SamplingConfig(overrides_dir=str(REPO / "sampler_overrides")),
        base_dir=tmp_path,
    )
    info: ServerInfo = await nursery.start(
        lambda task_status: serve(config, quiet=True, task_status=task_status)
    )
    client = openai.AsyncOpenAI(base_url=info.urls[0] + "/v1", api_key="unused", max_retries=0)

    answer = await client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=QUESTION, max_tokens=8, temperature=0
    )  # fmt: skip
    content = answer.choices[0].message.content
    assert content is not None
    assert "Paris" in content
    assert answer.model == DEFAULT_MODEL_NAME
    assert answer.usage is not None
    assert answer.usage.completion_tokens <= 8
    assert answer.usage.prompt_tokens > 10

    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=QUESTION, max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    parts: list[str] = []
    finish = None
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == content
    assert finish == answer.choices[0].finish_reason
    assert usage is not None
    assert usage.completion_tokens == answer.usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    # The same prompt again: the engine's prefix cache serves whole pages of it.
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    assert 0 < cached < usage.prompt_tokens

    streamed = await client.completions.create(
        model=DEFAULT_MODEL_NAME, prompt="The capital of Germany is", max_tokens=4,
        temperature=0, stream=True,
    )  # fmt: skip
    texts = [chunk.choices[0].text async for chunk in streamed if chunk.choices]
    assert "Berlin" in "".join(texts)
    info.shutdown()
