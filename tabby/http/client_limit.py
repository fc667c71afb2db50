"""At most N requests in flight per client address, as ASGI middleware.

One client (a runaway script, a slow-body attack) cannot take every connection the
server has: past the limit its requests are answered 429 with ``Retry-After`` at once,
and everyone else is served as before. Counting requests rather than sockets keeps idle
keep-alive connections free; a connection that never finishes its headers is closed by
hypercorn's idle timeout, one that stalls its body by the body timeout.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable

from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

from tabby.errors import TabbyError, TooManyRequests

__all__ = ["PerClientLimit"]

RETRY_AFTER_S = 1


class PerClientLimit:
    """Wraps ``app``; ``limit`` 0 turns the limit off. ``render`` gives the error body."""

    def __init__(
        self, app: ASGIFramework, limit: int, render: Callable[[TabbyError], object]
    ) -> None:
        self._app = app
        self._limit = limit
        self._render = render
        self._in_flight: Counter[str] = Counter()

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or self._limit <= 0:
            await self._app(scope, receive, send)
            return
        client = scope.get("client")
        address = client[0] if client else ""
        if self._in_flight[address] >= self._limit:
            await self._refuse(send)
            return
        self._in_flight[address] += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self._in_flight[address] -= 1
            if not self._in_flight[address]:
                del self._in_flight[address]

    async def _refuse(self, send: ASGISendCallable) -> None:
        error = TooManyRequests(
            f"this client has {self._limit} requests in flight already",
            retry_after=RETRY_AFTER_S,
            code="too_many_client_requests",
        )
        body = json.dumps(self._render(error)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"retry-after", str(RETRY_AFTER_S).encode()),
                    (b"content-length", str(len(body)).encode()),
                    # The request's body, if any, is never read: see unread_body.
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})
