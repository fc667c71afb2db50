"""The GenerationScheduler's calls into a backend, made in its worker thread.

Each function does one batch of backend calls and returns plain values (exceptions
included) to the event loop, so nothing raised in the thread escapes unclassified.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Sequence
from typing import TypeVar

import outcome
import trio

from tabby.backends.base import Backend, BackendStats, handoff_step
from tabby.errors import GenerationFailed, TabbyError
from tabby.jobs import GenerationJob, JobResult

__all__ = [
    "NO_STATS",
    "WorkerCalls",
    "apply_in_thread",
    "as_tabby_error",
    "stats_of",
    "step_in_thread",
]

log = logging.getLogger(__name__)

R = TypeVar("R")


class WorkerCalls:
    """One caller's calls into the backend, each in a worker thread.

    A call's thread starts before the caller yields: ``trio.to_thread.run_sync``
    checkpoints first, so every task the scheduler just woke (the clients it routed a
    step's text to, which then format and send it) would run while the device idles;
    starting the thread synchronously lets the next step overlap that work instead.

    The finished thread wakes the caller by writing one byte to a socket pair the
    caller waits on: one pass of trio's loop instead of ``run_sync_soon``'s entry-queue
    task and callback (about 80 µs less per call on a 2-core machine, with the event
    loop's caches cold after a step). Like ``to_thread.run_sync`` a call holds
    ``limiter`` and waits for its thread even when cancelled (the backend must never be
    left mid-call); a cancellation surfaces at the next checkpoint. Calls from one
    object are sequential (one task owns it).
    """

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self._limiter = limiter
        self._wake: tuple[socket.socket, socket.socket] | None = None  # made at first use
        self._signalled = False  # set by the worker thread through signal()

    def close(self) -> None:
        if self._wake is not None:
            for sock in self._wake:
                sock.close()
            self._wake = None

    def _wake_pair(self) -> tuple[socket.socket, socket.socket]:
        if self._wake is None:
            receive, send = socket.socketpair()
            receive.setblocking(False)
            send.setblocking(False)
            self._wake = (receive, send)
        return self._wake

    def signal(self) -> None:
        """From the worker thread, during a call: run the call's ``on_signal`` now."""
        self._signalled = True
        _, wake_send = self._wake_pair()
        with contextlib.suppress(BlockingIOError):  # a wake-up byte is pending already
            wake_send.send(b"\0")

    async def __call__(
        self, fn: Callable[[], R], *, on_signal: Callable[[], None] | None = None
    ) -> R:
        """Run ``fn`` in a worker thread; ``on_signal`` runs here (on the event loop) when
        the thread calls :meth:`signal`, or after ``fn`` returns if it never did."""
        # Not a yield unless cancelled: a cancelled caller must not start another call.
        await trio.lowlevel.checkpoint_if_cancelled()
        borrower = object()
        try:
            self._limiter.acquire_on_behalf_of_nowait(borrower)
        except trio.WouldBlock:
            await self._limiter.acquire_on_behalf_of(borrower)
        wake_receive, wake_send = self._wake_pair()
        done: list[outcome.Outcome[R]] = []

        def deliver(result: outcome.Outcome[R]) -> None:
            done.append(result)
            with contextlib.suppress(BlockingIOError):  # a wake-up byte is pending already
                wake_send.send(b"\0")

        self._signalled = False
        failure: Exception | None = None
        try:
            trio.lowlevel.start_thread_soon(fn, deliver, name="tabby backend call")
            with trio.CancelScope(shield=True):
                while not done:
                    await trio.lowlevel.wait_readable(wake_receive)
                    with contextlib.suppress(BlockingIOError):
                        wake_receive.recv(64)
                    if on_signal is not None and self._signalled:
                        run = on_signal
                        on_signal = None
                        try:
                            run()
                        except Exception as exc:  # raised once the thread is done
                            failure = exc
        finally:
            self._limiter.release_on_behalf_of(borrower)
        if failure is not None:
            raise failure
        if on_signal is not None:
            on_signal()
        return done[0].unwrap()


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


def step_in_thread(
    backend: Backend, handoff: Callable[[], None] | None = None
) -> tuple[list[JobResult] | Exception, bool, BackendStats]:
    """One step; ``handoff`` is called exactly once: at the backend's hand-off point
    (:class:`~tabby.backends.base.HandoffStep`), else before the step."""
    handed = False

    def hand_off_once() -> None:
        nonlocal handed
        if not handed and handoff is not None:
            handed = True
            handoff()

    stepper = handoff_step(backend)
    try:
        if stepper is not None:
            results: list[JobResult] | Exception = stepper.step_with_handoff(hand_off_once)
        else:
            hand_off_once()
            results = backend.step()
    except Exception as exc:
        results = exc
    finally:
        hand_off_once()  # a step with nothing to run, or one that failed, never got there
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
