"""Close the connection after answering a request whose body was not read, as ASGI middleware.

Many answers go out before the body arrives: a wrong key (401/403), an unknown route (404),
a wrong method (405), a body over the limit (413), a CORS preflight. HTTP/1.1 cannot start
the next request on that connection until the unread body has passed, and hypercorn then
neither answers the next request nor closes the socket: the client waits forever and the
server keeps the socket. So such a response says ``Connection: close``: the client opens a
new connection for its next request, and the server closes this one once the answer is out.
A request whose body was read in full, or that has none, keeps its connection.

The last body message of such a response is sent shielded from cancellation: hypercorn
closes the socket inside that send, after telling the app the stream is over, and
quart-trio cancels the app's tasks when it hears that, which would stop the close halfway
and leave the socket open.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

__all__ = ["CloseUnreadBodies"]

_CLOSE = (b"connection", b"close")


def _has_body(scope: Scope) -> bool:
    headers = cast("Iterable[tuple[bytes, bytes]]", scope.get("headers", ()))
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            return True
        if lowered == b"content-length":
            return value.strip() not in (b"", b"0")
    return False


class CloseUnreadBodies:
    """Wraps ``app``; see the module docstring."""

    def __init__(self, app: ASGIFramework) -> None:
        self._app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self._app(scope, receive, send)
            return
        read = False

        async def tracked_receive() -> ASGIReceiveEvent:
            nonlocal read
            message = await receive()
            if message["type"] == "http.disconnect" or (
                message["type"] == "http.request" and not message.get("more_body", False)
            ):
                read = True
            return message

        closing = False

        async def guarded_send(message: ASGISendEvent) -> None:
            nonlocal closing
            if not read and message["type"] == "http.response.start":
                closing = True
                headers = [
                    (name, value)
                    for name, value in message.get("headers", ())
                    if name.lower() != b"connection"
                ]
                message = {**message, "headers": [*headers, _CLOSE]}
            if (
                closing
                and message["type"] == "http.response.body"
                and not message.get("more_body", False)
            ):
                with trio.CancelScope(shield=True):
                    await send(message)
                return
            await send(message)

        await self._app(scope, tracked_receive, guarded_send)
