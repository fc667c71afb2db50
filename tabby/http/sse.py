"""Server-Sent Events responses with keep-alive pings.

``sse_response(events)`` turns an async iterator into a ``text/event-stream`` response;
``events`` may also be an async context manager yielding the iterator, entered when the
body starts and exited after it ends (so the producer can own a nursery).
Each item becomes one event: a mapping is sent as JSON (``data: {...}``), a string as
is (``data: [DONE]``), an :class:`SSEEvent` with its event name. A comment line
(``: ping``) goes out whenever no event was ready for ``network.sse_ping_interval``
seconds, so proxies keep long prefills alive.

If the iterator raises, the client gets one final error event in the format of
``tabby.http.errors`` and the stream ends (no ``[DONE]``). If the client goes away,
the iterator is cancelled (``trio.Cancelled`` at its ``await``) and closed, so its
``finally`` blocks run: that is how generation jobs get cancelled.

The iterator runs in a task of a nursery that quart's ``async with response.response``
opens and closes around the sending loop, so no cancel scope spans a ``yield``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import traceback
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from types import TracebackType
from typing import Any

import attrs
import quart
import trio
from quart.wrappers.response import ResponseBody

from tabby.errors import TabbyError
from tabby.http.app import current_services
from tabby.http.errors import error_body

__all__ = ["SSEEvent", "SSEEvents", "SSEItem", "encode_event", "sse_response"]

log = logging.getLogger(__name__)

PING = b": ping\n\n"
CLOSE_TIMEOUT = 5.0  # seconds an abandoned event iterator gets to run its cleanup


@attrs.frozen
class SSEEvent:
    data: str | Mapping[str, Any]
    event: str | None = None


SSEItem = str | Mapping[str, Any] | SSEEvent
# The events, or an async context manager that yields them and is exited after the stream.
SSEEvents = AsyncIterable[SSEItem] | AbstractAsyncContextManager[AsyncIterable[SSEItem]]


def encode_event(item: SSEItem) -> bytes:
    event: str | None = None
    if isinstance(item, SSEEvent):
        event, data = item.event, item.data
    else:
        data = item
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    lines = [f"event: {event}"] if event else []
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


@attrs.frozen
class _Failure:
    error: TabbyError
    trace: str | None


class _SSEBody(ResponseBody):
    """Runs the event iterator in its own task while quart sends what it produces."""

    def __init__(
        self, events: SSEEvents, ping_interval: float, send_tracebacks: bool
    ) -> None:
        self._events = events
        self._ping_interval = ping_interval if ping_interval > 0 else math.inf
        self._send_tracebacks = send_tracebacks
        self._stack = AsyncExitStack()
        # Unbuffered: the producer waits for the client instead of running ahead of it.
        self._item_send, self._item_receive = trio.open_memory_channel[SSEItem | _Failure](0)
        self._done = False

    async def __aenter__(self) -> _SSEBody:
        if isinstance(self._events, AbstractAsyncContextManager):
            # Entered here, in the sending task, so the producer may own a nursery
            # (e.g. one task per merged job stream) without a cancel scope over a yield.
            self._events = await self._stack.enter_async_context(self._events)
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        self._stack.callback(nursery.cancel_scope.cancel)
        nursery.start_soon(self._pump)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The stream is over either way; stop the producer and let the original
        # exception (if any) carry on from quart's own `async with`.
        self._item_receive.close()
        await self._stack.aclose()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        item: SSEItem | _Failure | None = None
        with trio.move_on_after(self._ping_interval):
            try:
                item = await self._item_receive.receive()
            except trio.EndOfChannel:
                raise StopAsyncIteration from None
        if item is None:
            return PING
        if isinstance(item, _Failure):
            self._done = True
            return encode_event(error_body(item.error, trace=item.trace))
        return encode_event(item)

    async def _pump(self) -> None:
        events = self._events
        assert not isinstance(events, AbstractAsyncContextManager)  # entered in __aenter__
        async with self._item_send:
            try:
                async for item in events:
                    await self._item_send.send(item)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the client is gone
            except Exception as exc:
                # Every failure becomes an error event; it must not cancel the sender.
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._item_send.send(self._failure(exc))
            finally:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    # Let the producer's cleanup (cancelling its jobs) finish, within reason.
                    with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                        await aclose()

    def _failure(self, exc: Exception) -> _Failure:
        trace = "".join(traceback.format_exception(exc)) if self._send_tracebacks else None
        if isinstance(exc, TabbyError):
            return _Failure(exc, trace)
        log.error("stream failed", exc_info=exc)
        return _Failure(TabbyError("internal server error", code="internal_error"), trace)


def sse_response(
    events: SSEEvents,
    *,
    status: int = 200,
    ping_interval: float | None = None,
) -> quart.Response:
    """An SSE response streaming ``events``; ``ping_interval`` defaults to the config's."""
    network = current_services().config.network
    interval = network.sse_ping_interval if ping_interval is None else ping_interval
    body = _SSEBody(events, interval, network.send_tracebacks)
    response = quart.Response(body, status=status, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response
