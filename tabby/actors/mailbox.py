"""The one request/reply helper every actor handle uses.

A request that needs an answer carries its own reply channel (DESIGN.md, principle 2).
The asker opens a one-slot channel of :class:`Answer`, builds the message around its send
end, posts it and awaits the one answer; the actor answers with :func:`answer`. What can
go wrong on the way is the same for every actor, so it is mapped here once:

* the inbox is closed or its actor gone → the mailbox's *gone* error (by default
  ``ServiceUnavailable("the <actor> is not running")``);
* the actor closed the reply channel without answering (it stopped meanwhile) → the same;
* the answer carries an error → that error is raised.

The actor side never waits on an asker: :func:`answer` sends without blocking and a
departed asker is fine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar, cast

import attrs
import trio

from tabby.errors import ServiceUnavailable, TabbyError

__all__ = ["Answer", "Mailbox", "Reply", "answer"]

M = TypeVar("M")
T = TypeVar("T")


@attrs.frozen
class Answer(Generic[T]):
    """A one-shot reply: a value, or the error that prevented it."""

    value: T | None = None
    error: TabbyError | None = None


Reply = trio.MemorySendChannel[Answer[T]]


def answer(reply: Reply[T], value: T | None = None, error: TabbyError | None = None) -> bool:
    """Send the one answer to a request and close its reply channel.

    Returns False when the asker has gone away meanwhile (e.g. a client disconnect),
    which is fine: nobody waits for it any more.
    """
    with reply:
        try:
            reply.send_nowait(Answer(value, error))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
    return True


@attrs.frozen
class Mailbox(Generic[M]):
    """The send end of an actor's inbox, as its handle uses it.

    ``actor`` names the actor in the error a caller gets when it is not running;
    ``gone`` replaces that error where the actor has a more precise one.
    """

    _inbox: trio.MemorySendChannel[M]
    actor: str
    gone: Callable[[], ServiceUnavailable] | None = None

    def unavailable(self) -> ServiceUnavailable:
        if self.gone is not None:
            return self.gone()
        return ServiceUnavailable(f"the {self.actor} is not running")

    async def post(self, message: M) -> None:
        """Send ``message`` (waiting for room in the inbox); no answer expected."""
        try:
            await self._inbox.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise self.unavailable() from None

    def try_post(self, message: M) -> bool:
        """Send ``message`` without waiting; False when the inbox is full or closed."""
        try:
            self._inbox.send_nowait(message)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True

    async def ask(
        self,
        make: Callable[[Reply[T]], M],
        *,
        when_full: Callable[[], TabbyError] | None = None,
    ) -> T:
        """Post ``make(reply)`` and return the one answer's value (or raise its error).

        With ``when_full`` the message is posted without waiting: a full inbox raises
        ``when_full()`` at once instead (admission control). An asker cancelled while it
        waits closes its reply channel, which tells the actor nobody listens any more.
        """
        reply_send, reply_receive = trio.open_memory_channel[Answer[T]](1)
        with reply_receive:
            message = make(reply_send)
            try:
                if when_full is None:
                    await self._inbox.send(message)
                else:
                    self._inbox.send_nowait(message)
            except trio.WouldBlock:
                reply_send.close()
                assert when_full is not None
                raise when_full() from None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                reply_send.close()
                raise self.unavailable() from None
            try:
                outcome = await reply_receive.receive()
            except trio.EndOfChannel:
                raise self.unavailable() from None
        if outcome.error is not None:
            raise outcome.error
        # None is a value only for Answer[None]; the actor answers every other T with one.
        return cast(T, outcome.value)

