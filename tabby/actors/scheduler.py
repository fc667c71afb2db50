"""GenerationScheduler: the only code that drives the attached generation backend.

The loop (DESIGN.md, "Scheduler loop"): while no job is live, block on the inbox;
otherwise take every waiting message without blocking, hand new jobs and cancellations
to the backend, run ONE backend step in a worker thread (all live jobs advance together),
route each result to its job's reply channel with ``send_nowait``, repeat.

* A full reply buffer is a slow client: its undelivered output is merged into its next
  event, so it receives larger chunks, nothing is lost and nobody else waits. Once the job
  has finished, the remaining events go out through a small delivery task in the actor's
  own nursery.
* A closed reply channel is a client that left: the job is cancelled in the backend
  before the next step, which frees its cache pages.
* Admission is bounded: ``submit`` raises :class:`TooManyRequests` at once when
  ``max_queued`` jobs already wait for a batch slot, and :class:`NoModelLoaded` while no
  backend is attached. ``submit`` returns only after the backend accepted the job, so a
  prompt that does not fit is an exception before any stream starts.
* Hand-off: with a backend that has a hand-off point in its step (the reference engine:
  right before its LM head, milliseconds of one native kernel) and at least
  ``HOLD_MIN_STREAMS`` streams, a step's results are held back and routed while the
  next step runs through that point. Formatting and sending every stream's token holds
  the GIL; done between steps it delays the next one, and done anywhere else in a step
  it stalls the engine's Python between its short kernels, about the same loss (4–5 %
  of a batch-8 CPU step, measured). The cost is latency: each token after a job's first
  reaches its client one step later (a few tens of ms on CPU); a step with a job's first
  token, or with fewer streams, goes out at once.
* A backend exception fails only the jobs it concerns (an ``enqueue`` error: that job;
  a ``step`` error: every job of that step), is reported to the HealthMonitor, and the
  scheduler keeps serving; the problem clears after a few successful steps.

The module is one actor: its messages, the loop and its handle (much of it docstrings);
the worker-thread calls already live in ``backend_calls``. The handle stays here because
it builds this module's messages, and moving it out would make an import cycle.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import Literal

import attrs
import trio

from tabby.actors.backend_calls import (
    NO_STATS,
    WorkerCalls,
    apply_in_thread,
    as_tabby_error,
    step_in_thread,
)
from tabby.actors.health import HealthHandle
from tabby.actors.mailbox import Mailbox, Reply, answer
from tabby.backends.base import Backend, handoff_step
from tabby.errors import (
    Conflict,
    GenerationFailed,
    NoModelLoaded,
    ServiceUnavailable,
    TabbyError,
    TooManyRequests,
)
from tabby.jobs import GenerationJob, JobResult
from tabby.jobs.events import Failed, Finished, JobEvent, TextChunk

__all__ = [
    "INBOX_BUFFER",
    "JOB_EVENT_BUFFER",
    "Attach",
    "Cancel",
    "Detach",
    "DetachMode",
    "GenerationScheduler",
    "GetStats",
    "SchedulerHandle",
    "SchedulerStats",
    "Submit",
]

log = logging.getLogger(__name__)

# Commands from request handlers and the ModelManager. Submits beyond this are refused
# with 429 at once (the inbox only fills while one step runs, so this is generous).
INBOX_BUFFER = 1024
# Events a client may lag behind before its output is merged into larger chunks.
JOB_EVENT_BUFFER = 64
# What a refused client is told to wait: about the time the queue needs to move on.
RETRY_AFTER_S = 1.0
# Tokens/s is measured over this recent window.
RATE_WINDOW_S = 5.0
# Consecutive successful steps after a step failure before the health problem clears.
HEALTHY_STEPS_TO_CLEAR = 3
HEALTH_SOURCE = "scheduler"
# Results for at least this many streams in one step are held for the next step's
# hand-off; below it the per-step event-loop work is too small to be worth a step of
# latency.
HOLD_MIN_STREAMS = 4

DetachMode = Literal["drain", "cancel"]


# -- messages ---------------------------------------------------------------------------


@attrs.frozen
class Submit:
    """Run ``job``; its events go to ``reply``.

    ``admitted`` receives exactly one item, None once the backend accepted the job or
    the error that refused it, and is then closed. ``model_epoch``, when given, must match
    the epoch of the attached backend (the job was tokenized for that model).
    """

    job: GenerationJob
    reply: trio.MemorySendChannel[JobEvent]
    admitted: Reply[None]
    model_epoch: int | None = None


@attrs.frozen
class Cancel:
    """Stop ``job_id``; its stream ends with ``Finished(stop_reason="cancelled")``."""

    job_id: str


@attrs.frozen
class Attach:
    """Serve ``backend`` from now on; ``reply`` gets None, or Conflict if one is attached."""

    backend: Backend
    epoch: int
    reply: Reply[None]


@attrs.frozen
class Detach:
    """Stop serving the attached backend and hand it back through ``reply``.

    ``drain`` waits until every accepted job has finished (new submits are refused
    meanwhile); ``cancel`` ends every job at once with a ``Failed`` event.
    ``reply`` gets the backend, or None when none was attached.
    """

    mode: DetachMode
    reply: Reply[Backend | None]


@attrs.frozen
class GetStats:
    reply: Reply[SchedulerStats]


SchedulerMessage = Submit | Cancel | Attach | Detach | GetStats


@attrs.frozen
class SchedulerStats:
    """A snapshot of the scheduler; backend figures are those after its latest call."""

    attached: bool
    model_name: str | None
    model_epoch: int
    draining: bool
    queued: int  # accepted jobs waiting for a batch slot
    live: int  # jobs in the running batch
    last_batch_size: int
    tokens_per_second: float  # over the last RATE_WINDOW_S seconds
    cache_pages_used: int
    cache_pages_free: int
    steps: int
    tokens_generated: int
    jobs_submitted: int
    jobs_finished: int
    jobs_failed: int
    jobs_cancelled: int
    jobs_rejected: int


# -- handle -----------------------------------------------------------------------------


@attrs.frozen
class SchedulerHandle:
    """What request handlers and the ModelManager hold: the scheduler's inbox."""

    _mailbox: Mailbox[SchedulerMessage]

    async def submit(
        self, job: GenerationJob, *, model_epoch: int | None = None
    ) -> trio.MemoryReceiveChannel[JobEvent]:
        """Admit ``job`` and return its event stream.

        Returns once the backend has accepted the job. Raises :class:`TooManyRequests`
        when the queue is full, :class:`NoModelLoaded` when no model is attached (or the
        model changed since ``model_epoch``), and whatever the backend's ``enqueue``
        raised (e.g. :class:`ContextLengthExceeded`). Closing the returned channel
        cancels the job; use it as ``async with await handle.submit(job) as events``.
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

    async def statistics(self) -> SchedulerStats:
        return await self._mailbox.ask(GetStats)


def _queue_full() -> TooManyRequests:
    return TooManyRequests(
        "the server is busy: too many requests are queued", retry_after=RETRY_AFTER_S
    )


# -- actor ------------------------------------------------------------------------------


@attrs.define
class _LiveJob:
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


@attrs.define
class _Counters:
    steps: int = 0
    tokens: int = 0
    submitted: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0


class GenerationScheduler:
    """Owns the attached backend and every live job; see the module docstring."""

    def __init__(
        self,
        *,
        max_queued: int | None = None,
        health: HealthHandle | None = None,
        limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self._max_queued = max_queued
        self._health = health
        # One worker thread at a time per device: two steps never touch one model.
        self._calls = WorkerCalls(limiter if limiter is not None else trio.CapacityLimiter(1))
        self._inbox_send, self._inbox = trio.open_memory_channel[SchedulerMessage](INBOX_BUFFER)
        self._backend: Backend | None = None
        self._epoch = 0
        self._backend_stats = NO_STATS
        self._jobs: dict[str, _LiveJob] = {}
        self._new: list[Submit] = []
        self._to_cancel: set[str] = set()
        self._cancel_requests: set[str] = set()
        self._detaching: Detach | None = None
        self._cancel_all = False
        self._failing_since_clear = False
        self._good_steps = 0
        self._rate: deque[tuple[float, int]] = deque()
        self._counters = _Counters()
        self._nursery: trio.Nursery | None = None
        # A step's results held back until the next step's hand-off (see HOLD_MIN_STREAMS).
        self._held: list[JobResult] = []

    @property
    def handle(self) -> SchedulerHandle:
        return SchedulerHandle(Mailbox(self._inbox_send, "generation scheduler"))

    def statistics(self) -> SchedulerStats:
        stats = self._backend_stats
        now = trio.current_time()
        self._trim_rate(now)
        window_tokens = sum(n for _, n in self._rate)
        span = (now - self._rate[0][0]) if self._rate else 0.0
        rate = window_tokens / max(span, 1e-3) if window_tokens else 0.0
        backend = self._backend
        c = self._counters
        return SchedulerStats(
            attached=backend is not None,
            model_name=backend.info.name if backend is not None else None,
            model_epoch=self._epoch,
            draining=self._detaching is not None,
            queued=stats.waiting_jobs + len(self._new),
            live=stats.live_jobs,
            last_batch_size=stats.last_batch_size,
            tokens_per_second=rate,
            cache_pages_used=stats.cache_pages_used,
            cache_pages_free=stats.cache_pages_total - stats.cache_pages_used,
            steps=c.steps,
            tokens_generated=c.tokens,
            jobs_submitted=c.submitted,
            jobs_finished=c.finished,
            jobs_failed=c.failed,
            jobs_cancelled=c.cancelled,
            jobs_rejected=c.rejected,
        )

    def _trim_rate(self, now: float) -> None:
        while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
            self._rate.popleft()

    async def run(
        self, *, task_status: trio.TaskStatus[SchedulerHandle] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started(self.handle)
                await self._serve()
        finally:
            self._shut_down()
            self._calls.close()

    # -- the loop -----------------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            if not self._jobs:
                self._take(await self._inbox.receive())
            while True:
                try:
                    message = self._inbox.receive_nowait()
                except trio.WouldBlock:
                    break
                self._take(message)
            self._find_departed_clients()
            await self._apply()
            if self._jobs and self._backend is not None:
                await self._step(self._backend)
            self._flush_pending()
            self._finish_detach_if_drained()

    def _take(self, message: SchedulerMessage) -> None:
        if isinstance(message, Submit):
            self._take_submit(message)
        elif isinstance(message, Cancel):
            if message.job_id in self._jobs or any(
                s.job.job_id == message.job_id for s in self._new
            ):
                self._cancel_requests.add(message.job_id)
        elif isinstance(message, Attach):
            self._take_attach(message)
        elif isinstance(message, Detach):
            self._take_detach(message)
        else:
            answer(message.reply, self.statistics())

    def _take_submit(self, message: Submit) -> None:
        job_id = message.job.job_id
        if message.reply.statistics().open_receive_channels == 0:
            message.reply.close()  # the caller left before we got to it
            message.admitted.close()
            return
        error: TabbyError | None = None
        if self._backend is None:
            error = NoModelLoaded("no model is loaded")
        elif self._detaching is not None:
            error = NoModelLoaded("the model is being unloaded")
        elif message.model_epoch is not None and message.model_epoch != self._epoch:
            error = NoModelLoaded("the model changed while the request was prepared; retry")
        elif job_id in self._jobs or any(s.job.job_id == job_id for s in self._new):
            error = Conflict(f"a job with id {job_id!r} is already running")
        elif self._max_queued is not None and self._queued() >= self._max_queued:
            error = TooManyRequests(
                f"the server is busy: {self._queued()} requests are queued",
                retry_after=RETRY_AFTER_S,
            )
        if error is not None:
            self._counters.rejected += 1
            answer(message.admitted, error=error)
            message.reply.close()
            return
        self._new.append(message)

    def _queued(self) -> int:
        return self._backend_stats.waiting_jobs + len(self._new)

    def _take_attach(self, message: Attach) -> None:
        if self._backend is not None or self._detaching is not None:
            answer(message.reply, error=Conflict("a model is already attached to the scheduler"))
            return
        self._backend = message.backend
        self._epoch = message.epoch
        self._backend_stats = NO_STATS
        log.info("scheduler: serving %s", message.backend.info.name)
        answer(message.reply, None)

    def _take_detach(self, message: Detach) -> None:
        if self._backend is None:
            answer(message.reply, None)
            return
        if self._detaching is not None:
            # A second detach joins the first one; the stronger mode wins.
            answer(self._detaching.reply, None)
        self._detaching = message
        if message.mode == "cancel":
            self._cancel_all = True

    def _find_departed_clients(self) -> None:
        for job_id, live in list(self._jobs.items()):
            if live.reply.statistics().open_receive_channels == 0:
                del self._jobs[job_id]
                live.reply.close()
                self._to_cancel.add(job_id)
                self._counters.cancelled += 1

    async def _apply(self) -> None:
        """Hand cancellations and new jobs to the backend, then answer the submitters."""
        new, self._new = self._new, []
        cancel_all, self._cancel_all = self._cancel_all, False
        backend = self._backend
        if backend is None:
            return
        if not (new or self._to_cancel or self._cancel_requests or cancel_all):
            return
        to_cancel = set(self._to_cancel)
        self._to_cancel.clear()
        outcomes, self._backend_stats = await self._calls(
            partial(apply_in_thread, backend, sorted(to_cancel), [s.job for s in new])
        )
        for submit, outcome in zip(new, outcomes, strict=True):
            if outcome is None:
                self._counters.submitted += 1
                self._jobs[submit.job.job_id] = _LiveJob(submit.job, submit.reply)
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
        live = [self._jobs.pop(j) for j in sorted(job_ids) if j in self._jobs]
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
            self._finish(job, final)

    async def _step(self, backend: Backend) -> None:
        # The previous step's results, if held back, go out at this step's hand-off.
        held, self._held = self._held, []
        results, has_work, self._backend_stats = await self._calls(
            partial(step_in_thread, backend, self._calls.signal if held else None),
            on_signal=partial(self._route_all, held) if held else None,
        )
        self._counters.steps += 1
        if isinstance(results, Exception):
            await self._step_failed(backend, results)
            return
        self._step_succeeded()
        tokens = sum(len(result.token_ids) for result in results)
        if has_work and len(results) >= HOLD_MIN_STREAMS and self._may_hold(backend, results):
            self._held = results
        else:
            self._route_all(results)
        if tokens:
            self._counters.tokens += tokens
            now = trio.current_time()
            self._rate.append((now, tokens))
            # Trimmed here too: nobody may ask for statistics while a server runs for days.
            self._trim_rate(now)
        if not has_work and self._jobs:
            # The backend forgot jobs without finishing them; never spin on them.
            error = GenerationFailed("the backend dropped the job without finishing it")
            for job_id in list(self._jobs):
                self._counters.failed += 1
                self._finish(self._jobs.pop(job_id), Failed(error))

    def _may_hold(self, backend: Backend, results: list[JobResult]) -> bool:
        """Hold a step's results only with a hand-off point to send them at, and never a
        job's first token (time to first token is worth the one-off stall)."""
        if handoff_step(backend) is None:
            return False
        return all((live := self._jobs.get(r.job_id)) is None or live.routed for r in results)

    def _route_all(self, results: list[JobResult]) -> None:
        for result in results:
            self._route(result)

    def _route(self, result: JobResult) -> None:
        live = self._jobs.get(result.job_id)
        if live is None:
            return  # cancelled meanwhile
        live.routed = True
        live.pending = _merge(live.pending, result)
        if not result.finished:
            self._deliver(live)
            return
        del self._jobs[result.job_id]
        if result.error is not None:
            # The backend failed this job alone (the others of the step go on).
            self._counters.failed += 1
            self._finish(live, Failed(GenerationFailed(f"generation failed: {result.error}")))
            return
        self._counters.finished += 1
        self._finish(
            live,
            Finished(
                finish_reason=result.finish_reason or "stop",
                stop_reason=result.stop_reason,
                stop_str=result.stop_str,
                stats=result.stats,
            ),
        )

    def _deliver(self, live: _LiveJob) -> None:
        if live.pending is None:
            return
        try:
            live.reply.send_nowait(live.pending)
        except trio.WouldBlock:
            return  # slow client: the text stays pending and grows
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # found gone before the next step
        live.pending = None

    def _flush_pending(self) -> None:
        for live in self._jobs.values():
            if live.pending is not None:
                self._deliver(live)

    def _finish(self, live: _LiveJob, final: JobEvent) -> None:
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

    async def _step_failed(self, backend: Backend, exc: Exception) -> None:
        log.error("backend step failed", exc_info=exc)
        error = as_tabby_error(exc, "generation step")
        self._good_steps = 0
        self._failing_since_clear = True
        if self._health is not None:
            self._health.report(HEALTH_SOURCE, "step", f"{type(exc).__name__}: {exc}")
        failed = list(self._jobs.values())
        self._jobs.clear()
        # The backend may still hold them: free their pages before anyone hears of it.
        _, self._backend_stats = await self._calls(
            partial(apply_in_thread, backend, [f.job.job_id for f in failed], [])
        )
        for live in failed:
            self._counters.failed += 1
            self._finish(live, Failed(error))

    def _step_succeeded(self) -> None:
        if not self._failing_since_clear:
            return
        self._good_steps += 1
        if self._good_steps >= HEALTHY_STEPS_TO_CLEAR:
            self._failing_since_clear = False
            if self._health is not None:
                self._health.clear(HEALTH_SOURCE, "step")

    def _finish_detach_if_drained(self) -> None:
        detach = self._detaching
        if detach is None or self._jobs or self._new:
            return
        backend, self._backend = self._backend, None
        self._detaching = None
        self._backend_stats = NO_STATS
        log.info("scheduler: detached (%s)", detach.mode)
        answer(detach.reply, backend)

    def _shut_down(self) -> None:
        """Every open stream ends with a final error; every waiting caller gets an answer."""
        error = ServiceUnavailable("server shutting down")
        for live in self._jobs.values():
            self._finish_quietly(live.reply, [live.pending, Failed(error)])
        self._jobs.clear()
        for submit in self._new:
            answer(submit.admitted, error=error)
            submit.reply.close()
        self._new.clear()
        while True:
            try:
                message = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if isinstance(message, Submit):
                answer(message.admitted, error=error)
                message.reply.close()
            elif isinstance(message, Attach | Detach | GetStats):
                message.reply.close()
        if self._detaching is not None:
            self._detaching.reply.close()
        self._inbox.close()

    @staticmethod
    def _finish_quietly(
        reply: trio.MemorySendChannel[JobEvent], events: Sequence[JobEvent | None]
    ) -> None:
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
