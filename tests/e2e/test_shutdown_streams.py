"""A graceful shutdown ends running streams cleanly, within the grace.

Streams still generating when the grace is about to run out get a final error event and
a complete body (the chunked terminator), not a cut connection.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio

from tests.conftest import start_smollm2


async def test_a_stream_running_at_shutdown_ends_with_an_error_event(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    info = await start_smollm2(nursery, tmp_path)  # shutdown_grace = 1.0
    body = {
        "prompt": "Count from one to a thousand: one, two,",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    events: list[str] = []
    started = 0.0
    async with (
        httpx.AsyncClient(base_url=info.urls[0], timeout=30) as client,
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line.removeprefix("data: "))
            if len(events) == 3:
                info.shutdown()
                started = trio.current_time()
        ended_after = trio.current_time() - started
    # The body ended cleanly (httpx raises on a cut chunked body) with one error event.
    last = json.loads(events[-1])
    assert last["error"]["type"] == "service_unavailable", last
    assert all("error" not in json.loads(e) for e in events[:-1] if e != "[DONE]")
    assert "[DONE]" not in events
    assert ended_after < 1.0
