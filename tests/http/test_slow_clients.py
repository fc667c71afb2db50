"""A client that stalls its body gets a 408 and loses its connection; one client cannot
hold more than its share of requests in flight."""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import trio

from tests.conftest import LiveServer, StartServer


async def _stalled_post(server: LiveServer) -> trio.SocketStream:
    """A request whose body never arrives past its first bytes."""
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {server.api_key}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n{\"messages\""
    )
    await stream.send_all(head.encode())
    return stream


async def _read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    while True:
        try:
            chunk = await stream.receive_some(65536)
        except trio.BrokenResourceError:
            break
        if not chunk:
            break
        data += chunk
    return data


async def test_a_stalled_body_is_a_408_and_the_connection_closes(
    live_server: StartServer,
) -> None:
    server = await live_server(network={"body_timeout": 0.5})
    stream = await _stalled_post(server)
    async with stream:
        with trio.fail_after(10):
            answer = await _read_all(stream)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b"request_timeout" in body


async def test_one_client_cannot_hold_every_request(live_server: StartServer) -> None:
    server = await live_server(network={"max_requests_per_client": 2, "body_timeout": 30})
    stalled = [await _stalled_post(server), await _stalled_post(server)]
    await trio.sleep(0.2)  # both are in flight now
    async with server.client() as client:
        refused = await client.get("/health")
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "too_many_client_requests"
        for stream in stalled:
            await stream.aclose()
        with trio.fail_after(10):
            while (await client.get("/health")).status_code == 429:
                await trio.sleep(0.05)
        assert (await client.get("/health")).status_code == 200


async def test_the_limit_counts_requests_not_idle_connections(live_server: StartServer) -> None:
    server = await live_server(network={"max_requests_per_client": 2})
    clients = [httpx.AsyncClient(base_url=server.url) for _ in range(4)]
    try:
        for client in clients:  # four keep-alive connections, one request at a time
            assert (await client.get("/health")).status_code == 200
        for client in clients:
            assert (await client.get("/health")).status_code == 200
    finally:
        for client in clients:
            await client.aclose()
