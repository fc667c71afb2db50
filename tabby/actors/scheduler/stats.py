"""The GenerationScheduler's figures: running counters, the recent token rate, snapshots."""

from __future__ import annotations

from collections import deque

import attrs
import trio

from tabby.backends.base import BackendStats

__all__ = ["RATE_WINDOW_S", "Counters", "RateWindow", "SchedulerStats", "snapshot"]

# Tokens/s is measured over this recent window.
RATE_WINDOW_S = 5.0


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


@attrs.define
class Counters:
    """Totals since the scheduler started."""

    steps: int = 0
    tokens: int = 0
    submitted: int = 0
    finished: int = 0
    failed: int = 0
    cancelled: int = 0
    rejected: int = 0


class RateWindow:
    """Tokens generated over the last RATE_WINDOW_S seconds (trio's clock)."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, tokens: int) -> None:
        now = trio.current_time()
        self.samples.append((now, tokens))
        # Trimmed here too: nobody may ask for statistics while a server runs for days.
        self._trim(now)

    def per_second(self) -> float:
        now = trio.current_time()
        self._trim(now)
        tokens = sum(n for _, n in self.samples)
        if not tokens:
            return 0.0
        span = now - self.samples[0][0]
        return tokens / max(span, 1e-3)

    def _trim(self, now: float) -> None:
        while self.samples and self.samples[0][0] < now - RATE_WINDOW_S:
            self.samples.popleft()


def snapshot(
    *,
    model_name: str | None,
    epoch: int,
    draining: bool,
    not_yet_enqueued: int,
    backend: BackendStats,
    rate: RateWindow,
    counters: Counters,
) -> SchedulerStats:
    return SchedulerStats(
        attached=model_name is not None,
        model_name=model_name,
        model_epoch=epoch,
        draining=draining,
        queued=backend.waiting_jobs + not_yet_enqueued,
        live=backend.live_jobs,
        last_batch_size=backend.last_batch_size,
        tokens_per_second=rate.per_second(),
        cache_pages_used=backend.cache_pages_used,
        cache_pages_free=backend.cache_pages_total - backend.cache_pages_used,
        steps=counters.steps,
        tokens_generated=counters.tokens,
        jobs_submitted=counters.submitted,
        jobs_finished=counters.finished,
        jobs_failed=counters.failed,
        jobs_cancelled=counters.cancelled,
        jobs_rejected=counters.rejected,
    )
