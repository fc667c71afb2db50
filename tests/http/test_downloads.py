"""``/v1/download`` and friends on a live server, against the fake hub."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tabby.actors.downloader import downloader_from_config
from tabby.config import ModelConfigSection, NetworkConfig, TabbyConfig
from tabby.http.admin import downloads
from tabby.http.app import ROUTE_MODULES
from tabby.http.services import Services
from tests.fakehub import FakeHub, FakeRepo, running_hub

TOKEN = "hf_http_secret_456"
FILES = {"config.json": b"{}", "model.safetensors": os.urandom(200_000), "README.md": b"hi"}


@pytest.fixture
async def hub(nursery: trio.Nursery) -> FakeHub:
    hub = FakeHub()
    hub.add(FakeRepo("org/tiny", dict(FILES)))
    hub.add(FakeRepo("org/gated", {"w.bin": b"gated bytes"}, token=TOKEN))
    hub.add(FakeRepo("org/slow", {"big.bin": os.urandom(1_000_000)}, slow_file="big.bin"))
    await running_hub(hub, nursery)
    return hub


@pytest.fixture
async def server(live_server: Any, nursery: trio.Nursery, tmp_path: Path) -> Any:
    config = TabbyConfig(
        network=NetworkConfig(host="127.0.0.1", port=0, shutdown_grace=1.0),
        model=ModelConfigSection(model_name=None),  # no chat model: only this part runs
        base_dir=tmp_path,
    )
    (tmp_path / "models").mkdir()
    if any(name == "tabby.http.admin.downloads" for name, _ in ROUTE_MODULES):
        return await live_server(config)  # the server starts the Downloader itself
    handle = await nursery.start(downloader_from_config(config).run)
    services = Services(config=config, auth=None, health=None, downloader=handle)  # type: ignore[arg-type]
    return await live_server(config, extra_blueprints=[downloads.blueprint(services)])


def models(server: Any) -> Path:
    path: Path = server.config.resolve(server.config.model.model_dir)
    return path


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    return [
        json.loads(line[6:]) async for line in response.aiter_lines() if line.startswith("data: ")
    ]


async def test_streamed_download_reports_progress(server: Any, hub: FakeHub) -> None:
    body = {"repo_id": "org/tiny", "endpoint": hub.url, "exclude": "*.md", "stream": True}
    async with (
        server.client() as client,
        client.stream("POST", "/v1/download", json=body, headers=server.auth("admin")) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        events = await sse_events(r)
    kinds = [e["object"] for e in events]
    assert kinds[0] == "download.started"
    assert kinds[-1] == "download.done"
    assert set(kinds[1:-1]) == {"download.progress"}
    assert sorted(events[0]["files"]) == ["config.json", "model.safetensors"]
    total = len(FILES["config.json"]) + len(FILES["model.safetensors"])
    last = events[-2]
    assert last["done_bytes"] == last["total_bytes"] == total
    assert {f["path"]: f["done"] for f in last["files"]} == {
        "config.json": 2,
        "model.safetensors": 200_000,
    }
    assert events[-1]["download_path"] == str((models(server) / "tiny").resolve())
    assert tree(models(server)) == ["tiny", "tiny/config.json", "tiny/model.safetensors"]


async def test_plain_download_and_errors(
    server: Any, hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = server.auth("admin")
    async with server.client() as client:

        async def post(**body: Any) -> httpx.Response:
            r: httpx.Response = await client.post(
                "/v1/download", json={"endpoint": hub.url, **body}, headers=admin
            )
            return r

        gated = await post(repo_id="org/gated")
        assert (gated.status_code, gated.json()["error"]["code"]) == (401, "hub_gated_repo")
        ok = await post(repo_id="org/gated", token=TOKEN, folder_name="g")
        assert ok.status_code == 200
        assert ok.json()["download_path"] == str((models(server) / "g").resolve())
        assert (models(server) / "g" / "w.bin").read_bytes() == b"gated bytes"
        again = await post(repo_id="org/gated", token=TOKEN, folder_name="g")
        assert again.status_code == 409
        assert (
            await post(repo_id="org/gated", token=TOKEN, folder_name="g", overwrite=True)
        ).status_code == 200
        missing = await post(repo_id="org/tiny", revision="v9")
        assert (missing.status_code, missing.json()["error"]["param"]) == (404, "revision")
        escape = await post(repo_id="org/tiny", folder_name="../out")
        assert (escape.status_code, escape.json()["error"]["param"]) == (400, "folder_name")
        bad_bodies: list[tuple[dict[str, Any], str]] = [
            ({"repo_id": "not a repo"}, "repo_id"),
            ({"include": []}, "include"),
        ]
        for bad, param in bad_bodies:
            r = await post(**{"repo_id": "org/tiny", **bad})
            assert (r.status_code, r.json()["error"]["param"]) == (400, param)
        nothing = await post(repo_id="org/tiny", include="*.gguf")
        assert (nothing.status_code, nothing.json()["error"]["param"]) == (400, "include")
        bad_type = await post(repo_id="org/tiny", repo_type="dataset")
        assert (bad_type.status_code, bad_type.json()["error"]["param"]) == (400, "repo_type")
        api_key = await client.post(
            "/v1/download", json={"repo_id": "org/tiny"}, headers=server.auth()
        )
        assert api_key.status_code == 403
        texts = [r.text for r in (gated, ok, again, missing)]
    assert all(TOKEN not in t for t in texts)
    assert TOKEN not in caplog.text
    assert tree(models(server)) == ["g", "g/w.bin"]


async def test_list_and_cancel(server: Any, hub: FakeHub) -> None:
    admin = server.auth("admin")
    body = {"repo_id": "org/slow", "endpoint": hub.url, "stream": True}
    async with (
        server.client() as client,
        client.stream("POST", "/v1/download", json=body, headers=admin) as r,
    ):
        lines = r.aiter_lines()
        started = json.loads((await anext(lines))[6:])
        listed = (await client.get("/v1/downloads", headers=admin)).json()["data"]
        assert [(d["download_id"], d["repo_id"]) for d in listed] == [
            (started["download_id"], "org/slow")
        ]
        assert "token" not in listed[0]
        gone = await client.delete(f"/v1/downloads/{started['download_id']}", headers=admin)
        assert gone.json() == {"download_id": started["download_id"], "status": "cancelled"}
        rest = [json.loads(line[6:]) async for line in lines if line.startswith("data: ")]
        assert rest[-1]["error"]["code"] == "request_cancelled"
        again = await client.post(
            "/v1/download/cancel", json={"id": started["download_id"]}, headers=admin
        )
        assert again.status_code == 404
        assert (await client.get("/v1/downloads", headers=admin)).json()["data"] == []
    assert tree(models(server)) == []


async def test_client_leaving_cancels_the_download(server: Any, hub: FakeHub) -> None:
    admin = server.auth("admin")
    body = {"repo_id": "org/slow", "endpoint": hub.url}
    async with server.client(timeout=0.5) as client:
        with pytest.raises(httpx.TimeoutException):
            await client.post("/v1/download", json=body, headers=admin)
    async with server.client() as client:
        with trio.fail_after(5):
            while (await client.get("/v1/downloads", headers=admin)).json()["data"]:
                await trio.sleep(0.05)
    assert tree(models(server)) == []
