"""A prompt that cannot fit the context is refused by its size, before it is tokenized."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from tabby.serving.planning import tail_within
from tests.conftest import start_smollm2

HUGE = "tabby " * 2_000_000  # 12 MB


async def test_a_huge_prompt_is_refused_by_its_size(nursery: trio.Nursery, tmp_path: Path) -> None:
    info = await start_smollm2(nursery, tmp_path)
    async with httpx.AsyncClient(base_url=info.urls[0], timeout=60) as client:
        completion = await client.post("/v1/completions", json={"prompt": HUGE, "max_tokens": 4})
        chat = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": HUGE}], "max_tokens": 4},
        )
        batch = await client.post(
            "/v1/completions", json={"prompt": ["hi", HUGE], "max_tokens": 4}
        )
        ok = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    for response, param in ((completion, "prompt"), (chat, "messages"), (batch, "prompt[1]")):
        assert response.status_code == 400
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("context_length_exceeded", param)
        # Refused by the byte bound, not after tokenizing millions of characters.
        assert "bytes" in error["message"]
    assert ok.status_code == 200


def test_trimming_keeps_the_end_within_the_bound() -> None:
    assert tail_within("short", 100) == "short"
    tail = tail_within("é" * 100 + "end", 11)
    assert tail.endswith("end")
    assert len(tail.encode()) <= 11
    assert tail == "éééé" + "end"
