"""SchedulerHandle: what request handlers and the ModelManager hold of one scheduler."""

from __future__ import annotations

import contextlib
from functools import partial

import attrs
import trio

from tabby.actors.mailbox import Mailbox
from tabby.actors.scheduler.messages import (
    JOB_EVENT_BUFFER,
    RETRY_AFTER_S,
    Attach,
    Cancel,
    Detach,
    DetachMode,
    GetSchedulerStats,
    SchedulerMessage,
    Stop,
    Submit,
)
from tabby.actors.scheduler.stats import SchedulerStats
from tabby.backends.base import Backend
from tabby.errors import NoModelLoaded, ServiceUnavailable, TooManyRequests
from tabby.jobs import GenerationJob
from tabby.jobs.events import JobEvent

__all__ = ["SchedulerHandle", "scheduler_mailbox"]


def _stopped() -> ServiceUnavailable:
    # A scheduler stops when its model goes: whoever still holds its handle was
    # preparing a request for a model that is not loaded any more.
    return NoModelLoaded("the model changed while the request was prepared; retry")


def scheduler_mailbox(inbox: trio.MemorySendChannel[SchedulerMessage]) -> Mailbox[SchedulerMessage]:
    return Mailbox(inbox, "generation scheduler", gone=_stopped)


def _queue_full() -> TooManyRequests:
    return TooManyRequests(
        "the server is busy: too many requests are queued", retry_after=RETRY_AFTER_S
    )


@attrs.frozen
class SchedulerHandle:
    """The scheduler's inbox; satisfies ``tabby.serving.ports.JobSubmitter``."""

    _mailbox: Mailbox[SchedulerMessage]

    async def submit(
        self, job: GenerationJob, *, model_epoch: int | None = None
    ) -> trio.MemoryReceiveChannel[JobEvent]:
        """Admit ``job`` and return its event stream.

        Returns once the backend has accepted the job. Raises :class:`TooManyRequests`
        when the queue is full, :class:`NoModelLoaded` when no model is attached (or the
        model changed since ``model_epoch``, or the scheduler stopped with its model), and
        whatever the backend's ``enqueue`` raised (e.g. :class:`ContextLengthExceeded`).
        Closing the returned channel cancels the job; use it as
        ``async with await handle.submit(job) as events``.
        """
        event_send, event_receive = trio.open_memory_channel[JobEvent](JOB_EVENT_BUFFER)
        try:
            await self._mailbox.ask(
                partial(Submit, job, event_send, model_epoch=model_epoch), when_full=_queue_full
            )
        except BaseException:
            # Refused, or cancelled while waiting: a closed receiver makes the scheduler
            # drop the job.
            event_send.close()
            event_receive.close()
            raise
        return event_receive

    async def cancel(self, job_id: str) -> None:
        """Stop a job by id (unknown ids are ignored)."""
        # A stopped scheduler runs nothing any more.
        with contextlib.suppress(ServiceUnavailable):
            await self._mailbox.post(Cancel(job_id))

    async def attach(self, backend: Backend, *, epoch: int) -> None:
        """Start serving ``backend``; raises Conflict if another one is attached."""
        await self._mailbox.ask(partial(Attach, backend, epoch))

    async def detach(self, mode: DetachMode) -> Backend | None:
        """Stop serving and return the backend that was attached (None if none)."""
        return await self._mailbox.ask(partial(Detach, mode))

    async def stop(self) -> None:
        """End the scheduler (after ``detach``); returns once it has finished."""
        await self._mailbox.ask(Stop)

    async def statistics(self) -> SchedulerStats:
        return await self._mailbox.ask(GetSchedulerStats)
