"""The GenerationScheduler's calls into a backend, made in its worker thread.

Each function does one batch of backend calls and returns plain values (exceptions
included) to the event loop, so nothing raised in the thread escapes unclassified.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import outcome
import trio

from tabby.backends.base import Backend, BackendStats, GenerationJob, JobResult
from tabby.errors import GenerationFailed, TabbyError

__all__ = [
    "NO_STATS",
    "apply_in_thread",
    "as_tabby_error",
    "call_in_worker",
    "stats_of",
    "step_in_thread",
]

log = logging.getLogger(__name__)

R = TypeVar("R")


async def call_in_worker(fn: Callable[[], R], *, limiter: trio.CapacityLimiter) -> R:
    """Run ``fn`` in a worker thread that starts before this task yields.

    ``trio.to_thread.run_sync`` checkpoints before its thread starts, so every task the
    scheduler just woke (the clients it routed a step's text to, which then format and
    send it) runs first while the device idles. Starting the thread synchronously lets
    the next step overlap that work instead. Like ``to_thread.run_sync`` it holds
    ``limiter`` for the call and waits for the thread even when cancelled (the backend
    must never be left mid-call); a cancellation surfaces at the next checkpoint.
    """
    # Not a yield unless cancelled: a cancelled caller must not start another call.
    await trio.lowlevel.checkpoint_if_cancelled()
    borrower = object()
    try:
        limiter.acquire_on_behalf_of_nowait(borrower)
    except trio.WouldBlock:
        await limiter.acquire_on_behalf_of(borrower)
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[R]) -> None:
        def wake() -> None:
            limiter.release_on_behalf_of(borrower)
            trio.lowlevel.reschedule(task, result)

        token.run_sync_soon(wake)

    try:
        trio.lowlevel.start_thread_soon(fn, deliver, name="tabby backend call")
    except BaseException:
        limiter.release_on_behalf_of(borrower)
        raise

    def refuse_abort(_: object) -> trio.lowlevel.Abort:
        return trio.lowlevel.Abort.FAILED

    result: R = await trio.lowlevel.wait_task_rescheduled(refuse_abort)
    return result

def as_tabby_error(exc: Exception, doing: str) -> TabbyError:
    if isinstance(exc, TabbyError):
        return exc
    return GenerationFailed(f"{doing} failed: {type(exc).__name__}: {exc}")


NO_STATS = BackendStats(0, 0, 0, 0, 0, 0, 0)


def apply_in_thread(
    backend: Backend, cancel_ids: Sequence[str], jobs: Sequence[GenerationJob]
) -> tuple[list[Exception | None], BackendStats]:
    """Cancellations first (they free pages for the new jobs), then enqueues."""
    for job_id in cancel_ids:
        try:
            backend.cancel(job_id)
        except Exception:
            log.exception("backend.cancel(%r) failed", job_id)
    outcomes: list[Exception | None] = []
    for job in jobs:
        try:
            backend.enqueue(job)
        except Exception as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)
    return outcomes, stats_of(backend)


def step_in_thread(backend: Backend) -> tuple[list[JobResult] | Exception, bool, BackendStats]:
    try:
        results: list[JobResult] | Exception = backend.step()
    except Exception as exc:
        results = exc
    try:
        has_work = backend.has_work()
    except Exception:
        has_work = False
    return results, has_work, stats_of(backend)


def stats_of(backend: Backend) -> BackendStats:
    try:
        return backend.statistics()
    except Exception:
        log.exception("backend.statistics() failed")
        return NO_STATS
