"""What the ModelManager's load task is given to do, and how it reports back: the queued
operations, the progress plumbing and the health problems of the ``models`` source."""

from __future__ import annotations

import contextlib
import logging

import attrs
import trio

from tabby.actors.health import HealthHandle
from tabby.actors.mailbox import Reply
from tabby.actors.messages import LoadEvent
from tabby.actors.models.planning import LoadPlan
from tabby.backends.base import LoadProgress, ProgressCallback
from tabby.errors import TabbyError
from tabby.serving.state import ServingState

__all__ = [
    "HEALTH_SOURCE",
    "LoadOp",
    "Operation",
    "Problems",
    "UnloadOp",
    "as_load_error",
    "progress_sender",
    "send_event",
    "send_final",
]

log = logging.getLogger(__name__)

HEALTH_SOURCE = "models"


@attrs.frozen
class LoadOp:
    plan: LoadPlan
    progress: trio.MemorySendChannel[LoadEvent] | None
    done: Reply[ServingState] | None
    force: bool = False  # reload even if the same model is loaded (LoRA changes)


@attrs.frozen
class UnloadOp:
    skip_queue: bool
    done: Reply[None]


Operation = LoadOp | UnloadOp


@attrs.frozen
class Problems:
    """The manager's health problems (the ``models`` source), opened and cleared by key."""

    health: HealthHandle | None

    def report(self, key: str, description: str) -> None:
        if self.health is not None:
            self.health.report(HEALTH_SOURCE, key, description)

    def clear(self, key: str) -> None:
        if self.health is not None:
            self.health.clear(HEALTH_SOURCE, key)


def as_load_error(exc: Exception, name: str) -> TabbyError:
    if isinstance(exc, TabbyError):
        return exc
    return TabbyError(f"loading model {name!r} failed: {type(exc).__name__}: {exc}")


def progress_sender(send: trio.MemorySendChannel[LoadEvent] | None) -> ProgressCallback:
    """A callback for the loading thread that forwards progress without ever waiting."""

    def progress(event: LoadProgress) -> None:
        if send is None:
            return
        # A slow or departed client must not hold up the load.
        with contextlib.suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            trio.from_thread.run_sync(send.send_nowait, event)

    return progress


def send_event(send: trio.MemorySendChannel[LoadEvent], event: LoadEvent) -> None:
    """Forward a progress event from the event loop; a slow or departed client misses it."""
    with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        send.send_nowait(event)


def send_final(send: trio.MemorySendChannel[LoadEvent] | None, event: LoadEvent) -> None:
    if send is None:
        return
    try:
        send.send_nowait(event)
    except trio.WouldBlock:
        log.warning("load client lags behind; its final event was dropped")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    send.close()
