"""``reasoning_content`` split from ``content`` on the embedded SmolLM2, with the
official ``openai`` client, streaming and not.

SmolLM2 does not think in tags by itself, so the replies are made deterministic in
shape: a ``regex_pattern`` that spells out the tags (a constraint that names the tags
covers the whole reply, reasoning included), or a ``response_prefix`` that opens the
reasoning (the prompt then ends inside ``<think>``, which turns the split on even
without ``reasoning = true``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import openai
import trio
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import start_smollm2

ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Is the sky blue?"}]
WORDS = r"[a-z ]{1,20}"
TAGGED = rf"<think>{WORDS}</think>{WORDS}"


async def test_reasoning_split(nursery: trio.Nursery, tmp_path: Path) -> None:
    info = await start_smollm2(nursery, tmp_path, reasoning=True)
    client = openai.AsyncOpenAI(base_url=info.urls[0] + "/v1", api_key="unused", max_retries=0)

    async def both(**extra: Any) -> tuple[tuple[str | None, str | None], tuple[str, str]]:
        """(reasoning, content) of the non-streaming answer and of the streamed one."""
        args: dict[str, Any] = {"model": "m", "messages": ASK, "seed": 4, "temperature": 1, **extra}
        answer = await client.chat.completions.create(**args)
        message = answer.choices[0].message
        reasoning = getattr(message, "reasoning_content", None)
        stream = await client.chat.completions.create(**args, stream=True)
        parts: tuple[list[str], list[str]] = ([], [])
        async for chunk in stream:
            for choice in chunk.choices:
                parts[0].append(getattr(choice.delta, "reasoning_content", None) or "")
                parts[1].append(choice.delta.content or "")
        return (reasoning, message.content), ("".join(parts[0]), "".join(parts[1]))

    # The model writes the tags itself (forced by the regex): split, streaming and not.
    for seed in (4, 5):
        whole, streamed = await both(seed=seed, max_tokens=60, extra_body={"regex_pattern": TAGGED})
        reasoning, content = whole
        assert reasoning is not None
        assert content is not None
        assert re.fullmatch(WORDS, reasoning)
        assert re.fullmatch(WORDS, content)
        assert "<think>" not in reasoning + content
        assert streamed == (reasoning, content)

    # A prompt that ends inside <think>: everything generated until </think> is reasoning.
    prefilled = {"response_prefix": "<think>"}
    whole, streamed = await both(
        max_tokens=60,
        extra_body={**prefilled, "regex_pattern": rf"{WORDS}</think>{WORDS}"},
    )  # fmt: skip
    assert whole[0] is not None
    assert re.fullmatch(WORDS, whole[0])
    assert whole[1] is not None
    assert re.fullmatch(WORDS, whole[1])
    assert streamed == whole

    # A constraint on the answer leaves the reasoning alone: greedy reasoning with a
    # JSON schema equals the same reasoning without one (cut by max_tokens before it ends).
    free, _ = await both(max_tokens=10, temperature=0, extra_body=prefilled)
    constrained, streamed = await both(
        max_tokens=10, temperature=0,
        extra_body={**prefilled, "json_schema": {"type": "object"}},
    )  # fmt: skip
    assert free[0]
    assert constrained[0] == free[0]
    assert not constrained[1]
    assert streamed[0] == free[0]
    info.shutdown()
