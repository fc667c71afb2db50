"""The GenerationScheduler's calls into a backend, made in its worker thread.

Each function does one batch of backend calls and returns plain values (exceptions
included) to the event loop, so nothing raised in the thread escapes unclassified.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tabby.backends.base import Backend, BackendStats, GenerationJob, JobResult
from tabby.errors import GenerationFailed, TabbyError

__all__ = ["NO_STATS", "apply_in_thread", "as_tabby_error", "stats_of", "step_in_thread"]

log = logging.getLogger(__name__)

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
