"""Running a request's jobs: admission, one merged event stream, and the totals.

:func:`submit_all` hands every job of a :class:`~tabby.serving.planning.GenerationPlan` to
the scheduler and returns once all were admitted, so a refused job (queue full, prompt
too long for the backend) is an error before any stream starts. The returned
:class:`RunningGeneration` is entered as an async context manager (or with
:meth:`RunningGeneration.open` / :meth:`RunningGeneration.aclose`): that starts one small
forwarding task per job (in its own nursery) that moves the job's events into one
merged stream of :class:`ChoiceEvent` (a single job's own channel is read directly);
leaving it, or :meth:`RunningGeneration.close`, closes every job channel, which the
scheduler takes as "cancel this job" (its cache pages are freed). That is how a client
disconnect cancels all ``n`` jobs.

:class:`ChoiceAccumulator` collects one choice's output for non-streaming answers
and the usage figures for both.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AsyncExitStack
from types import TracebackType

import attrs
import trio

from tabby.errors import ServiceUnavailable
from tabby.jobs import JobStats, TokenLogprob
from tabby.jobs.events import Failed, Finished, JobEvent, TextChunk
from tabby.serving.planning import GenerationPlan

__all__ = ["ChoiceAccumulator", "ChoiceEvent", "JobSource", "RunningGeneration", "submit_all"]

# Events waiting between the forwarders and the response writer; the scheduler already
# buffers per job, so a small merge buffer only smooths the hand-over.
MERGE_BUFFER = 16


@attrs.frozen
class ChoiceEvent:
    index: int
    event: JobEvent


# What an opened generation is read from: a single job's own channel (its events are
# choice 0's) or the merged events of several jobs.
JobSource = trio.MemoryReceiveChannel[JobEvent] | trio.MemoryReceiveChannel[ChoiceEvent]


class RunningGeneration:
    """The admitted jobs of one request; see the module docstring."""

    def __init__(self, channels: list[trio.MemoryReceiveChannel[JobEvent]]) -> None:
        self._channels = channels
        self._stack = AsyncExitStack()

    @property
    def jobs(self) -> int:
        return len(self._channels)

    def close(self) -> None:
        """Cancel every job that is still running (idempotent)."""
        for channel in self._channels:
            channel.close()

    async def open(self) -> JobSource:
        """Start reading: the one job's channel, or the merged channel of several (then
        the forwarding tasks run until :meth:`aclose`, which must come from this task)."""
        self._stack.callback(self.close)
        if len(self._channels) == 1:
            # Nothing to merge: skip the forwarding task (one hop less per token).
            return self._channels[0]
        merged_send, merged_receive = trio.open_memory_channel[ChoiceEvent](MERGE_BUFFER)
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._stack.callback(nursery.cancel_scope.cancel)
        async with merged_send:
            for index, channel in enumerate(self._channels):
                nursery.start_soon(_forward, index, channel, merged_send.clone())
        return merged_receive

    async def aclose(self) -> None:
        """Cancel every job still running and stop the forwarding tasks."""
        self.close()
        await self._stack.aclose()

    async def __aenter__(self) -> AsyncIterator[ChoiceEvent]:
        source = await self.open()
        if len(self._channels) > 1:
            return source  # type: ignore[return-value]  # the merged ChoiceEvents
        single = _single(self._channels[0])
        # Closed on exit, not left suspended for the garbage collector to finalize.
        self._stack.push_async_callback(single.aclose)
        return single

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def _single(
    events: trio.MemoryReceiveChannel[JobEvent],
) -> AsyncGenerator[ChoiceEvent, None]:
    async for event in events:
        yield ChoiceEvent(0, event)


async def _forward(
    index: int,
    events: trio.MemoryReceiveChannel[JobEvent],
    merged: trio.MemorySendChannel[ChoiceEvent],
) -> None:
    async with events, merged:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async for event in events:
                await merged.send(ChoiceEvent(index, event))


async def submit_all(plan: GenerationPlan) -> RunningGeneration:
    """Admit every job of ``plan`` to its model's scheduler; on any refusal the admitted
    ones are cancelled."""
    scheduler = plan.scheduler
    if scheduler is None:
        raise ServiceUnavailable("the generation scheduler is not running")
    channels: list[trio.MemoryReceiveChannel[JobEvent]] = []
    try:
        for job in plan.jobs:
            channels.append(await scheduler.submit(job, model_epoch=plan.epoch))
    except BaseException:
        for channel in channels:
            channel.close()
        raise
    return RunningGeneration(channels)


@attrs.define
class ChoiceAccumulator:
    """One choice's output so far, and how it ended."""

    index: int
    parts: list[str] = attrs.Factory(list)
    length: int = 0  # characters of text so far
    tokens: int = 0
    logprobs: list[TokenLogprob] = attrs.Factory(list)
    finished: Finished | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, event: JobEvent) -> None:
        """Take one event; a Failed event raises its error."""
        if isinstance(event, TextChunk):
            self.parts.append(event.text)
            self.length += len(event.text)
            self.tokens += len(event.token_ids)
            self.logprobs.extend(event.logprobs)
        elif isinstance(event, Finished):
            self.finished = event
        else:
            assert isinstance(event, Failed)
            raise event.error

    @property
    def stats(self) -> JobStats | None:
        return self.finished.stats if self.finished is not None else None

    @property
    def generated_tokens(self) -> int:
        stats = self.stats
        return stats.generated_tokens if stats is not None else self.tokens
