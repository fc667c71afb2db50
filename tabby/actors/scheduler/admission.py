"""Admission: which submitted jobs the scheduler takes, and which it refuses at once."""

from __future__ import annotations

from collections.abc import Container

from tabby.actors.mailbox import answer
from tabby.actors.scheduler.attachment import Attachment
from tabby.actors.scheduler.messages import RETRY_AFTER_S, Submit
from tabby.actors.scheduler.stats import Counters
from tabby.errors import Conflict, ServiceUnavailable, TabbyError, TooManyRequests

__all__ = ["Admission"]


class Admission:
    """The accepted submits that wait for the next hand-over to the backend."""

    def __init__(self, max_queued: int | None, counters: Counters) -> None:
        self._max_queued = max_queued
        self._counters = counters
        self._new: list[Submit] = []

    def __len__(self) -> int:
        return len(self._new)

    def __contains__(self, job_id: object) -> bool:
        return any(s.job.job_id == job_id for s in self._new)

    def take(
        self, message: Submit, attachment: Attachment, live: Container[str], waiting: int
    ) -> None:
        """Accept ``message`` or answer it with its refusal; ``waiting``: jobs the backend
        holds that wait for a batch slot."""
        if message.reply.statistics().open_receive_channels == 0:
            message.reply.close()  # the caller left before we got to it
            message.admitted.close()
            return
        error = self._refusal(message, attachment, live, waiting)
        if error is not None:
            self._counters.rejected += 1
            answer(message.admitted, error=error)
            message.reply.close()
            return
        self._new.append(message)

    def _refusal(
        self, message: Submit, attachment: Attachment, live: Container[str], waiting: int
    ) -> TabbyError | None:
        refusal = attachment.refusal(message.model_epoch)
        if refusal is not None:
            return refusal
        job_id = message.job.job_id
        if job_id in live or job_id in self:
            return Conflict(f"a job with id {job_id!r} is already running")
        queued = waiting + len(self._new)
        if self._max_queued is not None and queued >= self._max_queued:
            return TooManyRequests(
                f"the server is busy: {queued} requests are queued", retry_after=RETRY_AFTER_S
            )
        return None

    def take_all(self) -> list[Submit]:
        """The accepted submits, for the backend; none wait afterwards."""
        new, self._new = self._new, []
        return new

    def refuse_all(self, error: ServiceUnavailable) -> None:
        for submit in self.take_all():
            answer(submit.admitted, error=error)
            submit.reply.close()
