"""Answers sent before the request body arrived do not wedge the connection.

A wrong key (401), an unknown route (404) or a wrong method (405) is answered before the
body is read. The answer says ``Connection: close`` and the server closes the socket, so
the client's next request goes out on a fresh connection and no socket is left behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from tests.conftest import LiveServer, StartServer

BODY = b'{"messages": [{"role": "user", "content": "hi"}]}'


def _address(server: LiveServer) -> tuple[str, int]:
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


async def _late_body_request(
    server: LiveServer, method: str, path: str, *, key: str = "wrong", length: int = len(BODY)
) -> tuple[bytes, bool]:
    """Headers first, the body 50 ms later; (the answer's head, whether the server closed)."""
    stream = await trio.open_tcp_stream(*_address(server))
    async with stream:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
        await stream.send_all(head.encode())
        await trio.sleep(0.05)
        with contextlib.suppress(trio.BrokenResourceError):  # closed already: fine
            await stream.send_all(BODY)
        data = b""
        closed = False
        with trio.move_on_after(5):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                data += chunk
    return data.split(b"\r\n\r\n", 1)[0].lower(), closed


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v1/chat/completions", b"401"),
        ("POST", "/v1/no-such-route", b"404"),
        ("POST", "/health", b"405"),
    ],
)
async def test_an_early_answer_closes_the_connection(
    live_server: StartServer, method: str, path: str, status: bytes
) -> None:
    server = await live_server()
    head, closed = await _late_body_request(server, method, path)
    assert head.startswith(b"http/1.1 " + status)
    assert b"connection: close" in head
    assert closed


async def test_a_body_over_the_limit_closes_the_connection(live_server: StartServer) -> None:
    server = await live_server(network={"max_body_size": 1000})
    head, closed = await _late_body_request(
        server, "POST", "/v1/chat/completions", key=server.api_key, length=10**9
    )
    assert head.startswith(b"http/1.1 413")
    assert b"connection: close" in head
    assert closed


async def test_a_read_body_keeps_the_connection(live_server: StartServer) -> None:
    server = await live_server()
    async with server.client(headers=server.auth()) as client:
        # The body is read and checked (no model is loaded: 503), then the next request
        # goes out on the same connection.
        first = await client.post("/v1/chat/completions", content=BODY,
                                  headers={"Content-Type": "application/json"})
        second = await client.get("/health")
    assert first.status_code == 503
    assert "close" not in first.headers.get("connection", "")
    assert second.status_code == 200


async def _slow_body() -> AsyncIterator[bytes]:
    await trio.sleep(0.05)
    yield BODY


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_one_client_keeps_working_after_wrong_keys(live_server: StartServer) -> None:
    server = await live_server()
    before = _open_fds()
    async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as client:
        for _ in range(15):
            refused = await client.post(
                "/v1/chat/completions",
                headers={"Authorization": "Bearer wrong", "Content-Type": "application/json"},
                content=_slow_body(),
            )
            assert refused.status_code == 401
            ok = await client.get("/v1/auth/permission", headers=server.auth())
            assert ok.status_code == 200
    # Every connection the refusals used is closed on the server's side too.
    with trio.fail_after(5):
        while _open_fds() > before + 2:
            await trio.sleep(0.05)
