"""`tabby serve` as a real process: startup banner, /health, SIGTERM, busy port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

# A server with one extra slow route, built through the public serve() API.
SLOW_SERVER = """
import sys, quart, trio
from tabby.config.loader import load_config
from tabby.server import serve

bp = quart.Blueprint("slow", __name__)

@bp.get("/slow")
async def slow():
    print("slow request started", flush=True)
    await trio.sleep(float(quart.request.args["seconds"]))
    return {"done": True}

config = load_config(cli_args=sys.argv[1:])
trio.run(lambda: serve(config, handle_signals=True, extra_blueprints=[bp]))
"""

STARTUP_TIMEOUT = 20


class Server:
    def __init__(self, process: trio.Process, stderr_path: Path) -> None:
        self.process = process
        self.stderr_path = stderr_path
        self._buffer = b""
        self.lines: list[str] = []

    async def read_line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            if not chunk:
                raise AssertionError(
                    f"server exited early; stdout={self.lines} stderr={self.stderr_path.read_text()}"
                )
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        self.lines.append(line.decode())
        return self.lines[-1]

    async def wait_for(self, pattern: str) -> re.Match[str]:
        with trio.fail_after(STARTUP_TIMEOUT):
            while True:
                match = re.search(pattern, await self.read_line())
                if match:
                    return match


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TABBY_")}


@asynccontextmanager
async def running(args: Sequence[str], cwd: Path) -> AsyncIterator[Server]:
    stderr_path = cwd / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, *args],
            cwd=cwd,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    try:
        yield Server(process, stderr_path)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# No startup model (loading one takes seconds) and no sampler preset (none in tmp_path).
NO_MODEL = (
    "--model.model_name",
    "",
    "--embeddings.embedding_model_name",
    "",
    "--sampling.override_preset",
    "",
)


async def test_serve_prints_keys_answers_and_exits_on_sigterm(tmp_path: Path) -> None:
    args = ["-m", "tabby", "serve", "--port", "0", "--network.api_tokens_file", "keys.toml"]
    args += NO_MODEL
    async with running(args, tmp_path) as server:
        url = (await server.wait_for(r"listening on (http://127\.0\.0\.1:\d+)"))[1]
        admin_key = (await server.wait_for(r"admin key: ([0-9a-f]{32})"))[1]
        async with httpx.AsyncClient(base_url=url) as client:
            health = await client.get("/health")
            assert (health.status_code, health.json()["status"]) == (200, "healthy")
            permission = await client.get(
                "/v1/auth/permission", headers={"Authorization": f"Bearer {admin_key}"}
            )
            assert permission.json() == {"permission": "admin"}
        server.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await server.process.wait() == 0
    assert any("auth: API keys required" in line for line in server.lines)
    assert (tmp_path / "keys.toml").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("grace", "outcome"),
    [(5.0, "finished"), (0.2, "cut")],
)
async def test_sigterm_with_a_request_in_flight(tmp_path: Path, grace: float, outcome: str) -> None:
    args = [
        "-c",
        SLOW_SERVER,
        "--port",
        "0",
        "--network.api_tokens_file",
        "keys.toml",
        "--network.shutdown_grace",
        str(grace),
        *NO_MODEL,
    ]
    async with running(args, tmp_path) as server:
        url = (await server.wait_for(r"listening on (http://127\.0\.0\.1:\d+)"))[1]
        result: dict[str, object] = {}

        async def slow_request() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                try:
                    response = await client.get("/slow", params={"seconds": "1.0"})
                    result["body"] = response.json()
                except httpx.HTTPError as exc:
                    result["error"] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_request)
            await server.wait_for("slow request started")
            server.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await server.process.wait() == 0
    if outcome == "finished":
        assert result == {"body": {"done": True}}
    else:
        assert isinstance(result.get("error"), httpx.HTTPError)


async def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        completed = await trio.run_process(
            [sys.executable, "-m", "tabby", "serve", "--port", str(port), "--disable-auth", *NO_MODEL],
            cwd=tmp_path,
            env=clean_env(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert completed.returncode == 1
    stderr = completed.stderr.decode()
    assert f"error: cannot listen on 127.0.0.1:{port}: the address is already in use" in stderr
    assert "listening on" not in completed.stdout.decode()
