"""Keep-alive comments on idle event streams, as ASGI middleware.

A ``text/event-stream`` response that has sent nothing for ``interval`` seconds gets a
comment line (``: ping``), so proxies and clients keep long prefills, tool passes and
model loads alive. This lives around the app, where the ASGI ``send`` is, rather than
in the SSE body: the body then iterates its producer directly in the sending task,
with no second task, channel or timeout per event. Streaming one token costs one
task switch less that way, which matters because every per-token instruction on the
event loop holds the GIL the engine thread needs between its kernels.

The pinger sends only while the response is idle: a ping never interleaves with an
event (the app's next send waits for a ping in flight) and none follows the last
body message.
"""

from __future__ import annotations

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPResponseBodyEvent,
    Scope,
)

__all__ = ["PING", "SSEKeepAlive"]

PING = b": ping\n\n"
_PING_EVENT: HTTPResponseBodyEvent = {"type": "http.response.body", "body": PING, "more_body": True}


class SSEKeepAlive:
    """Wraps ``app``; ``interval`` <= 0 disables the pings."""

    def __init__(self, app: ASGIFramework, interval: float) -> None:
        self._app = app
        self._interval = interval

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or self._interval <= 0:
            await self._app(scope, receive, send)
            return
        async with trio.open_nursery() as nursery:
            response = _Response(send, self._interval, nursery)
            await self._app(scope, receive, response.send)
            nursery.cancel_scope.cancel()


def _is_event_stream(message: ASGISendEvent) -> bool:
    for name, value in message.get("headers", ()):  # type: ignore[attr-defined]
        if name.lower() == b"content-type":
            return bool(value.split(b";", 1)[0].strip().lower() == b"text/event-stream")
    return False


class _Response:
    """One response's sends, with a pinger once it turns out to be an event stream."""

    def __init__(self, send: ASGISendCallable, interval: float, nursery: trio.Nursery) -> None:
        self._send = send
        self._interval = interval
        self._nursery = nursery
        self._pinger: trio.CancelScope | None = None
        self._ping_in_flight: trio.Event | None = None
        self._sending = False
        self._last = 0.0

    async def send(self, message: ASGISendEvent) -> None:
        if self._ping_in_flight is not None:
            await self._ping_in_flight.wait()
        kind = message["type"]
        if kind == "http.response.start" and _is_event_stream(message):
            self._pinger = trio.CancelScope()
            self._last = trio.current_time()
            self._nursery.start_soon(self._ping_while_idle, self._pinger)
        elif (
            kind == "http.response.body"
            and self._pinger is not None
            and not message.get("more_body", False)
        ):
            self._pinger.cancel()  # the stream ends with this message
        self._sending = True
        try:
            await self._send(message)
        finally:
            self._sending = False
            self._last = trio.current_time()

    async def _ping_while_idle(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.sleep_until(self._last + self._interval)
                if self._sending:
                    # A send stalled on a slow client: the stream is not idle; look later.
                    await trio.sleep(self._interval)
                    continue
                if trio.current_time() < self._last + self._interval:
                    continue  # something went out meanwhile
                done = self._ping_in_flight = trio.Event()
                try:
                    await self._send(_PING_EVENT)
                except Exception:
                    return  # the client is gone; the app finds out on its own send
                finally:
                    self._ping_in_flight = None
                    self._last = trio.current_time()
                    done.set()
