"""Server-Sent Events responses.

``sse_response(events)`` turns an async iterator into a ``text/event-stream`` response;
``events`` may also be an async context manager yielding the iterator, entered when the
body starts and exited after it ends (so the producer can own a nursery).
Each item becomes one event: a mapping is sent as JSON (``data: {...}``), a string as
is (``data: [DONE]``), an :class:`SSEEvent` with its event name, an :class:`SSEComment`
as a comment line (``: loading``) that clients ignore. Keep-alive comments on
idle streams come from :mod:`tabby.http.keepalive`, around the app.

If the iterator raises, the client gets one final error event, rendered in the shape
of the route's protocol (``tabby.http.errors``), and the stream ends (no ``[DONE]``). If the client goes away,
the iterator is cancelled (``trio.Cancelled`` at its ``await``) or, when it was
waiting at a ``yield``, closed; either way its ``finally`` blocks run: that is how
generation jobs get cancelled.

The iterator runs in the task that sends the response, pulled one item per event:
a token costs no task switch or channel beyond the ones that brought it here. The
context manager form is entered by quart's own ``async with response.response``
around the sending loop, so no cancel scope spans a ``yield``.
"""

from __future__ import annotations

import json
import logging
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
from tabby.http.context import current_services
from tabby.http.errors import ErrorRenderer, error_renderer, internal_error

__all__ = ["SSEComment", "SSEEvent", "SSEEvents", "SSEItem", "encode_event", "sse_response"]

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 5.0  # seconds an abandoned event iterator gets to run its cleanup


@attrs.frozen
class SSEEvent:
    data: str | Mapping[str, Any]
    event: str | None = None


@attrs.frozen
class SSEComment:
    """A comment line: says the stream is alive (and why it is quiet) without an event."""

    text: str


SSEItem = str | Mapping[str, Any] | SSEEvent | SSEComment
# The events, or an async context manager that yields them and is exited after the stream.
SSEEvents = AsyncIterable[SSEItem] | AbstractAsyncContextManager[AsyncIterable[SSEItem]]


def encode_event(item: SSEItem) -> bytes:
    if isinstance(item, str) and "\n" not in item:
        return f"data: {item}\n\n".encode()  # a pre-rendered chunk: the common case
    if isinstance(item, SSEComment):
        return f": {item.text}\n\n".encode()
    event: str | None = None
    if isinstance(item, SSEEvent):
        event, data = item.event, item.data
    else:
        data = item
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    lines = [f"event: {event}"] if event else []
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


class _SSEBody(ResponseBody):
    """Pulls the event iterator from quart's sending loop, one event per item."""

    def __init__(self, events: SSEEvents, send_tracebacks: bool, render: ErrorRenderer) -> None:
        self._events = events
        self._send_tracebacks = send_tracebacks
        self._render = render
        self._stack = AsyncExitStack()
        self._iterator: AsyncIterator[SSEItem] | None = None  # None once it has ended

    async def __aenter__(self) -> _SSEBody:
        events = self._events
        if isinstance(events, AbstractAsyncContextManager):
            # Entered here, in the sending task, so the producer may own a nursery
            # (e.g. one task per merged job stream) without a cancel scope over a yield.
            events = await self._stack.enter_async_context(events)
        self._iterator = aiter(events)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # The stream is over either way; the original exception (if any) carries on
        # from quart's own `async with`.
        iterator, self._iterator = self._iterator, None
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            # An iterator left at a yield (the client went away while an event was being
            # sent) still cancels its jobs in its cleanup: let that finish, within reason.
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await aclose()
        # Not under a scope of its own: the stack may hold a nursery opened outside it.
        await self._stack.aclose()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._iterator is None:
            raise StopAsyncIteration
        try:
            item = await anext(self._iterator)
        except StopAsyncIteration:
            self._iterator = None
            raise
        except Exception as exc:
            # Every failure becomes one error event, and the stream ends after it.
            self._iterator = None
            error, trace = self._failure(exc)
            return encode_event(self._render(error, trace))
        return encode_event(item)

    def _failure(self, exc: Exception) -> tuple[TabbyError, str | None]:
        trace = "".join(traceback.format_exception(exc)) if self._send_tracebacks else None
        if isinstance(exc, TabbyError):
            return exc, trace
        log.error("stream failed", exc_info=exc)
        return internal_error(), trace


def sse_response(events: SSEEvents, *, status: int = 200) -> quart.Response:
    """An SSE response streaming ``events``."""
    send_tracebacks = current_services().config.network.send_tracebacks
    # The renderer is the route's, chosen now: the body is sent outside the handler.
    body = _SSEBody(events, send_tracebacks, error_renderer())
    response = quart.Response(body, status=status, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response
