"""Which backend a scheduler serves: attaching, detaching (drain or cancel) and stopping."""

from __future__ import annotations

import logging

import trio

from tabby.actors.mailbox import answer
from tabby.actors.scheduler.messages import Attach, Detach, SchedulerMessage, Stop
from tabby.backends.base import Backend
from tabby.errors import Conflict, NoModelLoaded, TabbyError

__all__ = ["Attachment"]

log = logging.getLogger(__name__)

# A refused request may retry at once: the next one waits for the switch to end.
_RETRY_AFTER_S = 1.0


class Attachment:
    """The attached backend and its epoch, with the detach or stop in progress.

    The scheduler's loop asks it what to do; it answers the ``Attach``, ``Detach`` and
    ``Stop`` messages itself.
    """

    def __init__(self, inbox: trio.MemorySendChannel[SchedulerMessage]) -> None:
        self._inbox = inbox
        self.backend: Backend | None = None
        self.epoch = 0
        self.detaching: Detach | None = None
        self.stopping: Stop | None = None

    def refusal(self, model_epoch: int | None) -> TabbyError | None:
        """Why a job for ``model_epoch`` cannot be admitted now (None: it can)."""
        if self.backend is None:
            return NoModelLoaded("no model is loaded")
        if self.detaching is not None:
            # Requests wait for a switch before they are planned; this one was planned
            # just before it began.
            return NoModelLoaded("the model is being unloaded", retry_after=_RETRY_AFTER_S)
        if model_epoch is not None and model_epoch != self.epoch:
            return NoModelLoaded(
                "the model changed while the request was prepared; retry",
                retry_after=_RETRY_AFTER_S,
            )
        return None

    def attach(self, message: Attach) -> bool:
        """Serve ``message.backend``; False (answered with Conflict) when that cannot be."""
        if self.backend is not None or self.detaching is not None:
            answer(message.reply, error=Conflict("a model is already attached to the scheduler"))
            return False
        if self.stopping is not None:
            answer(message.reply, error=Conflict("the scheduler is stopping"))
            return False
        self.backend = message.backend
        self.epoch = message.epoch
        log.info("scheduler: serving %s", message.backend.info.name)
        answer(message.reply, None)
        return True

    def detach(self, message: Detach) -> bool:
        """Begin a detach; True when every job must be cancelled now (``cancel`` mode)."""
        if self.backend is None:
            answer(message.reply, None)
            return False
        if self.detaching is not None:
            # A second detach joins the first one; the stronger mode wins.
            answer(self.detaching.reply, None)
        self.detaching = message
        return message.mode == "cancel"

    def finish_detach(self) -> None:
        """Hand the backend back to the detach in progress (its jobs are all done)."""
        detach = self.detaching
        if detach is None:
            return
        backend, self.backend = self.backend, None
        self.detaching = None
        log.info("scheduler: detached (%s)", detach.mode)
        answer(detach.reply, backend)

    def stop(self, message: Stop) -> None:
        if self.backend is not None:
            answer(message.reply, error=Conflict("detach the backend before stopping"))
            return
        if self.stopping is not None:
            answer(self.stopping.reply, None)
        self.stopping = message
        # What is queued still gets its answer; anything sent later is refused at the
        # handle, and the loop ends when the inbox is empty.
        self._inbox.close()

    def stopped(self) -> None:
        """The loop has ended after a stop: the stop is done."""
        if self.stopping is not None:
            answer(self.stopping.reply, None)
            self.stopping = None

    def shut_down(self) -> None:
        """The scheduler has ended: whoever waits on a detach hears so."""
        if self.detaching is not None:
            self.detaching.reply.close()
        self.stopped()
