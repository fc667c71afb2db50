"""SSE responses: events, keep-alive pings, errors mid-stream, client disconnects."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import attrs
import quart
import trio
from conftest import StartServer

from tabby.errors import ContextLengthExceeded
from tabby.http.sse import SSEEvent, SSEItem, encode_event, sse_response


@attrs.define
class Probe:
    """What the streaming routes saw, for the test to check."""

    finished: trio.Event = attrs.field(factory=trio.Event)
    cancelled: bool = False
    release: trio.Event = attrs.field(factory=trio.Event)


def stream_blueprint(probe: Probe) -> quart.Blueprint:
    bp = quart.Blueprint("stream", __name__)

    async def counted(n: int, pause: float) -> AsyncIterator[SSEItem]:
        try:
            for i in range(n):
                if pause:
                    await trio.sleep(pause)
                yield {"index": i}
            yield SSEEvent({"done": True}, event="summary")
            yield "[DONE]"
        except trio.Cancelled:
            probe.cancelled = True
            raise
        finally:
            probe.finished.set()

    async def failing() -> AsyncIterator[SSEItem]:
        yield {"index": 0}
        raise ContextLengthExceeded("the prompt is too long")

    async def crashing() -> AsyncIterator[SSEItem]:
        yield {"index": 0}
        raise RuntimeError("hidden detail")

    async def endless() -> AsyncIterator[SSEItem]:
        try:
            yield {"index": 0}
            await probe.release.wait()  # never set: only a disconnect ends this
            yield {"index": 1}
        except trio.Cancelled:
            probe.cancelled = True
            raise
        finally:
            probe.finished.set()

    @bp.get("/t/count")
    async def count() -> quart.Response:
        pause = float(quart.request.args.get("pause", "0"))
        return sse_response(counted(3, pause))

    @bp.get("/t/fail")
    async def fail() -> quart.Response:
        return sse_response(failing())

    @bp.get("/t/crash")
    async def crash() -> quart.Response:
        return sse_response(crashing())

    @bp.get("/t/endless")
    async def endless_route() -> quart.Response:
        return sse_response(endless())

    return bp


async def read_stream(client: Any, path: str) -> tuple[Any, str]:
    async with client.stream("GET", path) as response:
        text = "".join([chunk async for chunk in response.aiter_text()])
    return response, text


def test_encode_event() -> None:
    assert encode_event({"a": "é"}) == 'data: {"a": "é"}\n\n'.encode()
    assert encode_event("[DONE]") == b"data: [DONE]\n\n"
    assert (
        encode_event(SSEEvent("line1\nline2", event="x"))
        == b"event: x\ndata: line1\ndata: line2\n\n"
    )


async def test_events_and_headers(live_server: StartServer) -> None:
    probe = Probe()
    server = await live_server(extra_blueprints=[stream_blueprint(probe)])
    async with server.client() as client:
        response, text = await read_stream(client, "/t/count")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert len(response.headers["X-Request-Id"]) == 32
    assert text == (
        'data: {"index": 0}\n\ndata: {"index": 1}\n\ndata: {"index": 2}\n\n'
        'event: summary\ndata: {"done": true}\n\n'
        "data: [DONE]\n\n"
    )
    assert probe.finished.is_set()
    assert not probe.cancelled


async def test_pings_while_waiting(live_server: StartServer) -> None:
    server = await live_server(
        extra_blueprints=[stream_blueprint(Probe())], network={"sse_ping_interval": 0.05}
    )
    async with server.client() as client:
        _, text = await read_stream(client, "/t/count?pause=0.2")
    events = [block for block in text.split("\n\n") if block]
    assert [e for e in events if not e.startswith(":")] == [
        'data: {"index": 0}',
        'data: {"index": 1}',
        'data: {"index": 2}',
        'event: summary\ndata: {"done": true}',
        "data: [DONE]",
    ]
    assert events.count(": ping") >= 3  # one 0.05 s ping interval at least per 0.2 s pause


async def test_no_pings_while_events_flow(live_server: StartServer) -> None:
    server = await live_server(
        extra_blueprints=[stream_blueprint(Probe())], network={"sse_ping_interval": 0.5}
    )
    async with server.client() as client:
        _, text = await read_stream(client, "/t/count?pause=0.05")
    assert ": ping" not in text
    assert text.endswith("data: [DONE]\n\n")  # nothing after the last event either


async def test_error_mid_stream_ends_with_error_event(live_server: StartServer) -> None:
    server = await live_server(extra_blueprints=[stream_blueprint(Probe())])
    async with server.client() as client:
        _, failed = await read_stream(client, "/t/fail")
        _, crashed = await read_stream(client, "/t/crash")
    first, error, rest = failed.split("\n\n", 2)
    assert first == 'data: {"index": 0}'
    assert json.loads(error.removeprefix("data: ")) == {
        "error": {
            "message": "the prompt is too long",
            "type": "invalid_request_error",
            "param": None,
            "code": "context_length_exceeded",
        }
    }
    assert rest == ""
    assert "[DONE]" not in crashed
    assert "hidden detail" not in crashed
    assert '"code": "internal_error"' in crashed


async def test_client_disconnect_cancels_the_producer(live_server: StartServer) -> None:
    probe = Probe()
    server = await live_server(extra_blueprints=[stream_blueprint(probe)])
    async with server.client() as client, client.stream("GET", "/t/endless") as response:
        async for line in response.aiter_lines():
            assert line == 'data: {"index": 0}'
            break
    with trio.fail_after(5):
        await probe.finished.wait()
    assert probe.cancelled
