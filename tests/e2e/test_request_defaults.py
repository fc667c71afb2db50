"""Defaults that keep a request bounded, and token ids that must exist."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import trio

from tests.conftest import start_smollm2


async def test_a_request_without_max_tokens_gets_the_default(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    info = await start_smollm2(nursery, tmp_path, default_max_tokens=12)
    client = openai.AsyncOpenAI(base_url=info.urls[0] + "/v1", api_key="unused")
    prompt = "List every number from one to a thousand: one, two, three,"
    unset = await client.completions.create(
        model="m", prompt=prompt, extra_body={"ignore_eos": True}
    )
    zero = await client.completions.create(
        model="m", prompt=prompt, max_tokens=0, extra_body={"ignore_eos": True}
    )
    asked = await client.completions.create(
        model="m", prompt=prompt, max_tokens=20, extra_body={"ignore_eos": True}
    )
    assert unset.usage is not None
    assert zero.usage is not None
    assert asked.usage is not None
    assert (unset.usage.completion_tokens, unset.choices[0].finish_reason) == (12, "length")
    assert zero.usage.completion_tokens == 12
    assert asked.usage.completion_tokens == 20  # an explicit value still wins
    await client.close()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logit_bias", {"999999": 5}),
        ("banned_tokens", [1, 999999]),
        ("allowed_tokens", "3,999999"),
    ],
)
async def test_token_ids_outside_the_vocabulary_are_400(
    nursery: trio.Nursery, tmp_path: Path, field: str, value: object
) -> None:
    info = await start_smollm2(nursery, tmp_path)
    async with httpx.AsyncClient(base_url=info.urls[0], timeout=30) as client:
        response = await client.post(
            "/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: value}
        )
        inside = await client.post(
            "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": 1}}
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field
    assert "999999" in error["message"]
    assert inside.status_code == 200
