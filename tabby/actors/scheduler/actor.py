"""GenerationScheduler: the only code that drives its model's generation backend.

The loop (DESIGN.md, "Scheduler loop"): while no job is live, block on the inbox;
otherwise take every waiting message without blocking, hand new jobs and cancellations
to the backend, run ONE backend step in a worker thread (all live jobs advance together),
route each result to its job's reply channel (``delivery``), repeat.

* Admission is bounded: ``submit`` raises :class:`TooManyRequests` at once when
  ``max_queued`` jobs already wait for a batch slot, and :class:`NoModelLoaded` while no
  backend is attached. ``submit`` returns only after the backend accepted the job, so a
  prompt that does not fit is an exception before any stream starts.
* Hand-off: with a backend that declares a hand-off point in its step
  (``capabilities.handoff``; the reference engine: right before its LM head, milliseconds
  of one native kernel) and at least ``HOLD_MIN_STREAMS`` streams, a step's results are
  held back and routed while the next step runs through that point. Formatting and
  sending every stream's token holds the GIL; done between steps it delays the next one,
  and done anywhere else in a step it stalls the engine's Python between its short
  kernels, about the same loss (4–5 % of a batch-8 CPU step, measured). The cost is
  latency: each token after a job's first reaches its client one step later (a few tens
  of ms on CPU); a step with a job's first token, or with fewer streams, goes out at once.
* A backend exception fails only the jobs it concerns (an ``enqueue`` error: that job;
  a ``step`` error: every job of that step), is reported to the HealthMonitor, and the
  scheduler keeps serving (``step_health``).
* The ModelManager runs one scheduler per loaded model: ``Attach`` after the load,
  ``Detach`` (drain or cancel) and ``Stop`` when the model goes.
"""

from __future__ import annotations

import logging
from functools import partial

import trio

from tabby.actors.health import HealthHandle
from tabby.actors.mailbox import answer
from tabby.actors.scheduler.admission import Admission
from tabby.actors.scheduler.attachment import Attachment
from tabby.actors.scheduler.backend_calls import (
    NO_STATS,
    WorkerCalls,
    apply_in_thread,
    as_tabby_error,
    step_in_thread,
)
from tabby.actors.scheduler.delivery import JobTable, end_stream
from tabby.actors.scheduler.handle import SchedulerHandle, scheduler_mailbox
from tabby.actors.scheduler.messages import (
    INBOX_BUFFER,
    Attach,
    Cancel,
    Detach,
    GetSchedulerStats,
    SchedulerMessage,
    Stop,
    Submit,
)
from tabby.actors.scheduler.stats import Counters, RateWindow, SchedulerStats, snapshot
from tabby.actors.scheduler.step_health import StepHealth
from tabby.backends.base import Backend, handoff_step
from tabby.errors import (
    GenerationFailed,
    ServiceUnavailable,
)
from tabby.jobs import JobResult
from tabby.jobs.events import Failed, Finished, JobEvent

__all__ = ["HOLD_MIN_STREAMS", "GenerationScheduler"]

log = logging.getLogger(__name__)

# Results for at least this many streams in one step are held for the next step's
# hand-off; below it the per-step event-loop work is too small to be worth a step of
# latency.
HOLD_MIN_STREAMS = 4


class GenerationScheduler:
    """Owns the attached backend and every live job; see the module docstring."""

    def __init__(
        self,
        *,
        max_queued: int | None = None,
        health: HealthHandle | None = None,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        # One worker thread at a time per device: two steps never touch one model.
        self._calls = WorkerCalls(limiter if limiter is not None else trio.CapacityLimiter(1))
        self._inbox_send, self._inbox = trio.open_memory_channel[SchedulerMessage](INBOX_BUFFER)
        self._attachment = Attachment(self._inbox_send)
        self._backend_stats = NO_STATS
        self._counters = Counters()
        self._rate = RateWindow()
        self._step_health = StepHealth(health)
        self._jobs = JobTable(self._counters)
        self._admission = Admission(max_queued, self._counters)
        self._to_cancel: set[str] = set()
        self._cancel_requests: set[str] = set()
        self._cancel_all = False
        # A step's results held back until the next step's hand-off (see HOLD_MIN_STREAMS).
        self._held: list[JobResult] = []

    @property
    def handle(self) -> SchedulerHandle:
        return SchedulerHandle(scheduler_mailbox(self._inbox_send))

    def statistics(self) -> SchedulerStats:
        backend = self._attachment.backend
        return snapshot(
            model_name=backend.info.name if backend is not None else None,
            epoch=self._attachment.epoch,
            draining=self._attachment.detaching is not None,
            not_yet_enqueued=len(self._admission),
            backend=self._backend_stats,
            rate=self._rate,
            counters=self._counters,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[SchedulerHandle] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._jobs.serve_in(nursery)
                task_status.started(self.handle)
                await self._serve()
                # Stopped. Lagging clients may still be getting their last events from
                # delivery tasks; the stop does not wait for them (the task does).
                self._attachment.stopped()
        finally:
            self._shut_down()
            self._calls.close()

    # -- the loop -----------------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            if not self._jobs:
                try:
                    self._take(await self._inbox.receive())
                except trio.EndOfChannel:
                    return  # stopped, and every queued message was handled
            while True:
                try:
                    message = self._inbox.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                self._take(message)
            for job_id in self._jobs.departed():
                self._to_cancel.add(job_id)
            await self._apply()
            backend = self._attachment.backend
            if self._jobs and backend is not None:
                await self._step(backend)
            self._jobs.flush_pending()
            self._finish_detach_if_drained()

    def _take(self, message: SchedulerMessage) -> None:
        if isinstance(message, Submit):
            waiting = self._backend_stats.waiting_jobs
            self._admission.take(message, self._attachment, self._jobs, waiting)
        elif isinstance(message, Cancel):
            job_id = message.job_id
            if job_id in self._jobs or job_id in self._admission:
                self._cancel_requests.add(job_id)
        elif isinstance(message, Attach):
            if self._attachment.attach(message):
                self._backend_stats = NO_STATS
        elif isinstance(message, Detach):
            self._cancel_all |= self._attachment.detach(message)
        elif isinstance(message, Stop):
            self._attachment.stop(message)
        elif isinstance(message, GetSchedulerStats):
            answer(message.reply, self.statistics())

    async def _apply(self) -> None:
        """Hand cancellations and new jobs to the backend, then answer the submitters."""
        new = self._admission.take_all()
        cancel_all, self._cancel_all = self._cancel_all, False
        backend = self._attachment.backend
        if backend is None:
            return
        if not (new or self._to_cancel or self._cancel_requests or cancel_all):
            return
        to_cancel = sorted(self._to_cancel)
        self._to_cancel.clear()
        outcomes, self._backend_stats = await self._calls(
            partial(apply_in_thread, backend, to_cancel, [s.job for s in new])
        )
        for submit, outcome in zip(new, outcomes, strict=True):
            if outcome is None:
                self._counters.submitted += 1
                self._jobs.add(submit.job, submit.reply)
                answer(submit.admitted, None)
            else:
                self._counters.rejected += 1
                answer(submit.admitted, error=as_tabby_error(outcome, "enqueue"))
                submit.reply.close()
        requested, self._cancel_requests = self._cancel_requests, set()
        if cancel_all:
            requested |= set(self._jobs)
        if requested:
            await self._cancel_jobs(backend, requested, unload=cancel_all)

    async def _cancel_jobs(self, backend: Backend, job_ids: set[str], *, unload: bool) -> None:
        live = [j for j in (self._jobs.pop(i) for i in sorted(job_ids)) if j is not None]
        if not live:
            return
        _, self._backend_stats = await self._calls(
            partial(apply_in_thread, backend, [j.job.job_id for j in live], [])
        )
        for job in live:
            self._counters.cancelled += 1
            final: JobEvent
            if unload:
                final = Failed(ServiceUnavailable("the model was unloaded while the request ran"))
            else:
                final = Finished(finish_reason="stop", stop_reason="cancelled")
            self._jobs.finish(job, final)

    async def _step(self, backend: Backend) -> None:
        # The previous step's results, if held back, go out at this step's hand-off.
        held, self._held = self._held, []
        results, has_work, self._backend_stats = await self._calls(
            partial(step_in_thread, backend, self._calls.signal if held else None),
            on_signal=partial(self._jobs.route_all, held) if held else None,
        )
        self._counters.steps += 1
        if isinstance(results, Exception):
            await self._step_failed(backend, results)
            return
        self._step_health.succeeded()
        if has_work and len(results) >= HOLD_MIN_STREAMS and self._may_hold(backend, results):
            self._held = results
        else:
            self._jobs.route_all(results)
        tokens = sum(len(result.token_ids) for result in results)
        if tokens:
            self._counters.tokens += tokens
            self._rate.add(tokens)
        if not has_work and self._jobs:
            # The backend forgot jobs without finishing them; never spin on them.
            error = GenerationFailed("the backend dropped the job without finishing it")
            self._jobs.fail(self._jobs.pop_all(), error)

    def _may_hold(self, backend: Backend, results: list[JobResult]) -> bool:
        """Hold a step's results only with a hand-off point to send them at, and never a
        job's first token (time to first token is worth the one-off stall)."""
        return handoff_step(backend) is not None and self._jobs.all_started(results)

    async def _step_failed(self, backend: Backend, exc: Exception) -> None:
        log.error("backend step failed", exc_info=exc)
        error = as_tabby_error(exc, "generation step")
        self._step_health.failed(f"{type(exc).__name__}: {exc}")
        failed = self._jobs.pop_all()
        # The backend may still hold them: free their pages before anyone hears of it.
        _, self._backend_stats = await self._calls(
            partial(apply_in_thread, backend, [f.job.job_id for f in failed], [])
        )
        self._jobs.fail(failed, error)

    def _finish_detach_if_drained(self) -> None:
        if self._attachment.detaching is None or self._jobs or self._admission:
            return
        self._attachment.finish_detach()
        self._backend_stats = NO_STATS

    def _shut_down(self) -> None:
        """Every open stream ends with a final error; every waiting caller gets an answer."""
        error = ServiceUnavailable("server shutting down")
        for live in self._jobs.pop_all():
            end_stream(live.reply, [live.pending, Failed(error)])
        self._admission.refuse_all(error)
        _refuse_queued(self._inbox, error)
        self._attachment.shut_down()


def _refuse_queued(
    inbox: trio.MemoryReceiveChannel[SchedulerMessage], error: ServiceUnavailable
) -> None:
    """Answer every message still in ``inbox`` (the scheduler has ended), then close it."""
    while True:
        try:
            message = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        if isinstance(message, Submit):
            answer(message.admitted, error=error)
            message.reply.close()
        elif not isinstance(message, Cancel):
            message.reply.close()  # the asker hears that the scheduler is gone
    inbox.close()
