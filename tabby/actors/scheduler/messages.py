"""What the GenerationScheduler accepts: its commands, with their reply channels."""

from __future__ import annotations

from typing import Literal

import attrs
import trio

from tabby.actors.mailbox import Reply
from tabby.actors.scheduler.stats import SchedulerStats
from tabby.backends.base import Backend
from tabby.jobs import GenerationJob
from tabby.jobs.events import JobEvent

__all__ = [
    "INBOX_BUFFER",
    "JOB_EVENT_BUFFER",
    "RETRY_AFTER_S",
    "Attach",
    "Cancel",
    "Detach",
    "DetachMode",
    "GetSchedulerStats",
    "SchedulerMessage",
    "Stop",
    "Submit",
]

# Commands from request handlers and the ModelManager. Submits beyond this are refused
# with 429 at once (the inbox only fills while one step runs, so this is generous).
INBOX_BUFFER = 1024
# Events a client may lag behind before its output is merged into larger chunks.
JOB_EVENT_BUFFER = 64
# What a refused client is told to wait: about the time the queue needs to move on.
RETRY_AFTER_S = 1.0

DetachMode = Literal["drain", "cancel"]


@attrs.frozen
class Submit:
    """Run ``job``; its events go to ``reply``.

    ``admitted`` gets one answer: None once the backend accepted the job, or the error
    that refused it. ``model_epoch``, when given, must match the epoch of the attached
    backend (the job was tokenized for that model).
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
class Stop:
    """Close the inbox and end ``run`` once the messages already queued are handled.

    Sent by the owner after ``Detach``: the model is gone, so is its scheduler. Callers
    still holding the handle are told the model was unloaded. ``reply`` is answered when
    the scheduler has finished; Conflict while a backend is still attached.
    """

    reply: Reply[None]


@attrs.frozen
class GetSchedulerStats:
    reply: Reply[SchedulerStats]


SchedulerMessage = Submit | Cancel | Attach | Detach | Stop | GetSchedulerStats
