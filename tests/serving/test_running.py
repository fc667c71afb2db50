"""RunningGeneration closes the stream it hands out when the request ends."""

from __future__ import annotations

import pytest
import trio

from tabby.jobs.events import JobEvent, TextChunk
from tabby.serving.running import RunningGeneration


async def test_single_job_stream_is_closed_on_exit() -> None:
    send, receive = trio.open_memory_channel[JobEvent](4)
    send.send_nowait(TextChunk("a", (1,), ()))
    send.send_nowait(TextChunk("b", (2,), ()))
    running = RunningGeneration([receive])
    async with running as events:
        first = await events.__anext__()
        assert first.event == TextChunk("a", (1,), ())
    # Finalized on exit, not left suspended for the garbage collector.
    with pytest.raises(StopAsyncIteration):
        await events.__anext__()
    with pytest.raises(trio.BrokenResourceError):
        send.send_nowait(TextChunk("c", (3,), ()))
