"""The GenerationScheduler: one per loaded model, the only code that drives its backend.

Modules, one concept each:

* ``messages`` — what it accepts (``Submit``, ``Cancel``, ``Attach``, ``Detach``, ``Stop``,
  ``GetSchedulerStats``) and its buffer sizes;
* ``handle`` — :class:`SchedulerHandle`, what request handlers and the ModelManager hold;
* ``actor`` — :class:`GenerationScheduler`, the loop: batching and stepping;
* ``admission`` and ``attachment`` — which jobs it takes; which backend it serves
  (attach, detach, stop);
* ``delivery`` — the live jobs and the routing of results to their clients;
* ``backend_calls`` — the calls into the backend, made in a worker thread;
* ``stats`` and ``step_health`` — its figures and its health reports.
"""

from tabby.actors.scheduler.actor import HOLD_MIN_STREAMS, GenerationScheduler
from tabby.actors.scheduler.handle import SchedulerHandle
from tabby.actors.scheduler.messages import (
    INBOX_BUFFER,
    JOB_EVENT_BUFFER,
    Attach,
    Cancel,
    Detach,
    DetachMode,
    GetSchedulerStats,
    Stop,
    Submit,
)
from tabby.actors.scheduler.stats import RATE_WINDOW_S, SchedulerStats

__all__ = [
    "HOLD_MIN_STREAMS",
    "INBOX_BUFFER",
    "JOB_EVENT_BUFFER",
    "RATE_WINDOW_S",
    "Attach",
    "Cancel",
    "Detach",
    "DetachMode",
    "GenerationScheduler",
    "GetSchedulerStats",
    "SchedulerHandle",
    "SchedulerStats",
    "Stop",
    "Submit",
]
