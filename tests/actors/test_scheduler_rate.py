"""The scheduler's tokens/s window stays bounded on a server nobody asks for statistics."""

from __future__ import annotations

import trio
import trio.testing

from tabby.actors.scheduler import RATE_WINDOW_S, GenerationScheduler, SchedulerHandle
from tabby.backends.scripted import ScriptedBackend
from tabby.jobs import GenerationJob


async def test_rate_window_is_trimmed_without_statistics_calls(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    scheduler = GenerationScheduler()
    handle: SchedulerHandle = await nursery.start(scheduler.run)
    await handle.attach(ScriptedBackend(script="x" * 1000), epoch=1)
    seconds = int(4 * RATE_WINDOW_S)
    async with await handle.submit(GenerationJob("a", (1, 2, 3), 1000)) as events:
        for _ in range(seconds):
            await events.receive()
            mock_clock.jump(1.0)
        await events.receive()
    times = [t for t, _ in scheduler._rate.samples]
    assert trio.current_time() >= seconds
    assert times
    assert times[-1] - times[0] <= RATE_WINDOW_S
