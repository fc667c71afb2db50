"""Event streams that start before their generation can: while a model loads.

A streaming request that arrives during a model switch gets its response (headers and
``: loading`` comments) at once, so the client sees the server alive while the request
waits for the new model; the generation then starts and its events follow in the same
stream. A failure while waiting or starting (the load failed, the wait timed out, the
queue is full) is the stream's one error event.

The producer runs in a task of the body's own nursery (entered in the sending task, see
``tabby.http.sse``) and hands its items over a channel, so the comments are timed in the
sending task without a cancel scope across a ``yield``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress

import trio

from tabby.errors import TabbyError
from tabby.http.sse import SSEComment, SSEItem

__all__ = ["COMMENT_INTERVAL_S", "LOADING", "Producer", "while_loading"]

LOADING = SSEComment("loading")
# Often enough that proxies with short idle timeouts keep the stream open.
COMMENT_INTERVAL_S = 2.0

Handoff = trio.MemorySendChannel[SSEItem | TabbyError]
# Starts the generation (waiting for the model) and sends its items; returns at its end.
Producer = Callable[[Handoff], Awaitable[None]]


def while_loading(produce: Producer) -> AbstractAsyncContextManager[AsyncIterator[SSEItem]]:
    """An SSE body: ``: loading`` comments until ``produce`` sends its first item, then
    its items."""

    @asynccontextmanager
    async def body() -> AsyncIterator[AsyncIterator[SSEItem]]:
        # Unbuffered: the producer runs no further ahead than the client reads.
        item_send, item_receive = trio.open_memory_channel[SSEItem | TabbyError](0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_produce, produce, item_send)
            try:
                yield _relay(item_receive)
            finally:
                # The client left or the stream ended: the producer's jobs end with it.
                nursery.cancel_scope.cancel()

    return body()


async def _produce(produce: Producer, send: Handoff) -> None:
    async with send:
        try:
            await produce(send)
        except TabbyError as exc:
            # The stream renders it as its error event, in the route's protocol shape.
            with suppress(trio.BrokenResourceError):
                await send.send(exc)


async def _relay(
    receive: trio.MemoryReceiveChannel[SSEItem | TabbyError],
) -> AsyncIterator[SSEItem]:
    async with receive:
        yield LOADING
        started = False
        while True:
            with trio.move_on_after(COMMENT_INTERVAL_S) as idle:
                try:
                    item = await receive.receive()
                except trio.EndOfChannel:
                    return
            if idle.cancelled_caught:
                if not started:
                    yield LOADING
                continue
            if isinstance(item, TabbyError):
                raise item
            started = True
            yield item
