"""Stream items that several actors and the HTTP layer share.

A generation job's events are :mod:`tabby.jobs.events`. A model load's progress channel carries :data:`LoadEvent` items:
``LoadProgress`` events of the backend, then exactly one :class:`ModelLoaded` or
:class:`LoadFailed`, then the channel closes.

Consumers never need to look at anything but these classes; every error they see is a
:class:`tabby.errors.TabbyError`, so the HTTP layer can map it without inspecting text.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Generic, TypeVar

import attrs
import trio

from tabby.backends.base import LoadProgress
from tabby.errors import TabbyError

if TYPE_CHECKING:
    from tabby.serving.state import ServingState

__all__ = [
    "Answer",
    "LoadEvent",
    "LoadFailed",
    "LoadProgress",
    "ModelLoaded",
    "Reply",
    "answer",
]

T = TypeVar("T")


@attrs.frozen
class ModelLoaded:
    """A load finished; ``state`` is the ServingState published with the new model."""

    state: ServingState


@attrs.frozen
class LoadFailed:
    """A load failed after it was accepted; the last event of the progress stream."""

    error: TabbyError


LoadEvent = LoadProgress | ModelLoaded | LoadFailed


@attrs.frozen
class Answer(Generic[T]):
    """A one-shot reply: a value or the error that prevented it."""

    value: T | None = None
    error: TabbyError | None = None


Reply = trio.MemorySendChannel[Answer[T]]


def answer(reply: Reply[T], value: T | None = None, error: TabbyError | None = None) -> None:
    """Send the one answer to a request and close its reply channel.

    The asker may have gone away meanwhile (e.g. a client disconnect): that is fine.
    """
    with contextlib.suppress(trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
        reply.send_nowait(Answer(value, error))
    reply.close()
