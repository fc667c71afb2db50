"""The scheduler's live jobs, and the routing of backend results to their clients.

Every event goes out with ``send_nowait``: the scheduler never waits for a client.

* A full reply buffer is a slow client: its undelivered output is merged into its next
  event, so it receives larger chunks, nothing is lost and nobody else waits. Once the job
  has finished, the remaining events go out through a small delivery task in the
  scheduler's own nursery.
* A closed reply channel is a client that left: :meth:`JobTable.departed` finds it
  before the next step, and the scheduler cancels the job in the backend.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import attrs
import trio

from tabby.actors.scheduler.stats import Counters
from tabby.errors import GenerationFailed, TabbyError
from tabby.jobs import GenerationJob, JobResult
from tabby.jobs.events import Failed, Finished, JobEvent, TextChunk

__all__ = ["JobTable", "LiveJob", "end_stream"]


@attrs.define
class LiveJob:
    """The scheduler's record of one accepted job."""

    job: GenerationJob
    reply: trio.MemorySendChannel[JobEvent]
    pending: TextChunk | None = None  # output the client has not taken yet
    routed: bool = False  # a result of this job was routed: its first token went out


def _merge(pending: TextChunk | None, result: JobResult) -> TextChunk | None:
    if not (result.text or result.token_ids or result.logprobs):
        return pending
    if pending is None:
        return TextChunk(result.text, result.token_ids, result.logprobs)
    return TextChunk(
        pending.text + result.text,
        pending.token_ids + result.token_ids,
        pending.logprobs + result.logprobs,
    )


class JobTable:
    """The accepted jobs by id; routes their results and ends their streams."""

    def __init__(self, counters: Counters) -> None:
        self._jobs: dict[str, LiveJob] = {}
        self._counters = counters
        self._nursery: trio.Nursery | None = None

    def serve_in(self, nursery: trio.Nursery) -> None:
        """Where lagging clients get the last events of their finished jobs."""
        self._nursery = nursery

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._jobs))

    def add(self, job: GenerationJob, reply: trio.MemorySendChannel[JobEvent]) -> None:
        self._jobs[job.job_id] = LiveJob(job, reply)

    def pop(self, job_id: str) -> LiveJob | None:
        return self._jobs.pop(job_id, None)

    def pop_all(self) -> list[LiveJob]:
        jobs = list(self._jobs.values())
        self._jobs.clear()
        return jobs

    def departed(self) -> list[str]:
        """Forget the jobs whose client closed its channel; their ids, to cancel."""
        gone = [j for j, live in self._jobs.items() if _client_left(live.reply)]
        for job_id in gone:
            self._jobs.pop(job_id).reply.close()
            self._counters.cancelled += 1
        return gone

    def all_started(self, results: Sequence[JobResult]) -> bool:
        """Whether every job of ``results`` already had its first token routed."""
        return all((live := self._jobs.get(r.job_id)) is None or live.routed for r in results)

    def route_all(self, results: Sequence[JobResult]) -> None:
        for result in results:
            self._route(result)

    def _route(self, result: JobResult) -> None:
        live = self._jobs.get(result.job_id)
        if live is None:
            return  # cancelled meanwhile
        live.routed = True
        live.pending = _merge(live.pending, result)
        if not result.finished:
            _deliver(live)
            return
        del self._jobs[result.job_id]
        if result.error is not None:
            # The backend failed this job alone (the others of the step go on).
            self._counters.failed += 1
            self.finish(live, Failed(GenerationFailed(f"generation failed: {result.error}")))
            return
        self._counters.finished += 1
        self.finish(
            live,
            Finished(
                finish_reason=result.finish_reason or "stop",
                stop_reason=result.stop_reason,
                stop_str=result.stop_str,
                stats=result.stats,
            ),
        )

    def flush_pending(self) -> None:
        """Offer held-back output again to clients that lagged behind."""
        for live in self._jobs.values():
            _deliver(live)

    def fail(self, jobs: Sequence[LiveJob], error: TabbyError) -> None:
        """End ``jobs`` (already taken out of the table) with ``error``."""
        for live in jobs:
            self._counters.failed += 1
            self.finish(live, Failed(error))

    def finish(self, live: LiveJob, final: JobEvent) -> None:
        """Send the job's last events, handing them to a delivery task if the client lags."""
        events: list[JobEvent] = [final] if live.pending is None else [live.pending, final]
        live.pending = None
        for index, event in enumerate(events):
            try:
                live.reply.send_nowait(event)
            except trio.WouldBlock:
                assert self._nursery is not None
                self._nursery.start_soon(_deliver_rest, live.reply, events[index:])
                return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
        live.reply.close()


def _client_left(reply: trio.MemorySendChannel[JobEvent]) -> bool:
    return reply.statistics().open_receive_channels == 0


def _deliver(live: LiveJob) -> None:
    if live.pending is None:
        return
    try:
        live.reply.send_nowait(live.pending)
    except trio.WouldBlock:
        return  # slow client: the text stays pending and grows
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return  # found gone before the next step
    live.pending = None


def end_stream(reply: trio.MemorySendChannel[JobEvent], events: Sequence[JobEvent | None]) -> None:
    """Send what fits of ``events`` without waiting and close the stream (shutdown)."""
    for event in events:
        if event is None:
            continue
        try:
            reply.send_nowait(event)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            break
    reply.close()


async def _deliver_rest(reply: trio.MemorySendChannel[JobEvent], events: list[JobEvent]) -> None:
    """Deliver a finished job's last events to a client that lags behind."""
    async with reply:
        for event in events:
            try:
                await reply.send(event)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
