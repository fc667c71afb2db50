"""The listening socket takes bursts: the configured backlog reaches the kernel, and a
burst of 500 connections is answered in full."""

from __future__ import annotations

import shutil
import subprocess
from urllib.parse import urlsplit

import pytest
import trio

from tests.conftest import StartServer

BURST = 500


def _listen_backlog(port: int) -> int:
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    # For a listening socket ss shows the backlog in the Send-Q column.
    return int(out.split()[2])


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
async def test_the_configured_backlog_reaches_the_socket(live_server: StartServer) -> None:
    server = await live_server(network={"backlog": 777})
    port = urlsplit(server.url).port
    assert port is not None
    assert await trio.to_thread.run_sync(_listen_backlog, port) == 777


async def _health_status(host: str, port: int) -> bytes:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while b"\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


async def test_a_burst_of_connections_is_answered(live_server: StartServer) -> None:
    server = await live_server()
    parts = urlsplit(server.url)
    assert parts.hostname is not None
    assert parts.port is not None
    statuses: list[bytes] = []

    async def one() -> None:
        try:
            statuses.append(await _health_status(parts.hostname or "", parts.port or 0))
        except OSError as exc:
            statuses.append(f"error {exc}".encode())

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(BURST):
                nursery.start_soon(one)
    answered = [s for s in statuses if s.startswith(b"HTTP/1.1 ")]
    assert len(answered) == BURST, sorted(set(statuses) - set(answered))[:3]
