"""The Downloader actor against the fake hub on 127.0.0.1."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest
import trio

from tabby.actors.downloader import (
    DownloadDone,
    Downloader,
    DownloaderHandle,
    DownloaderStats,
    DownloadEvent,
    DownloadFailed,
    DownloadProgress,
    DownloadStarted,
)
from tabby.actors.hub import DownloadSpec, resolve_endpoint
from tabby.errors import (
    AuthenticationError,
    Conflict,
    InvalidRequest,
    NotFound,
    RequestCancelled,
    ServiceUnavailable,
)
from tests.fakehub import FakeHub, FakeRepo, running_hub

FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": bytes(range(256)) * 300,
    "tokenizer.json": b'{"version": "1.0"}',
    "sub/extra.txt": b"nested file",
    "README.md": b"# readme",
}
TOKEN = "hf_secret_token_123"


@attrs.frozen
class Env:
    hub: FakeHub
    handle: DownloaderHandle
    actor: Downloader
    models: Path
    loras: Path

    def spec(self, repo_id: str = "org/tiny", **kwargs: object) -> DownloadSpec:
        return DownloadSpec(repo_id, endpoint=self.hub.url, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def env(nursery: trio.Nursery, tmp_path: Path) -> Env:
    hub = FakeHub()
    hub.add(FakeRepo("org/tiny", dict(FILES), revisions=("main", "v2")))
    await running_hub(hub, nursery)
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    loras.mkdir()
    actor = Downloader(model_dir=models, lora_dir=loras)
    handle = await nursery.start(actor.run)
    return Env(hub, handle, actor, models, loras)


async def collect(handle: DownloaderHandle, spec: DownloadSpec) -> list[DownloadEvent]:
    events = await handle.download(spec)
    async with events:
        return [event async for event in events]


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def test_full_download_with_include_exclude(env: Env) -> None:
    spec = env.spec(include=("*.json", "*.safetensors", "sub/*"), exclude=("tokenizer*",))
    events = await collect(env.handle, spec)
    started, *progress, done = events
    assert isinstance(started, DownloadStarted)
    assert sorted(started.files) == ["config.json", "model.safetensors", "sub/extra.txt"]
    assert started.info.total_bytes == sum(len(FILES[f]) for f in started.files)
    assert progress
    assert all(isinstance(p, DownloadProgress) for p in progress)
    assert isinstance(done, DownloadDone)
    assert done.path == (env.models / "tiny").resolve()
    assert leftovers(env.models) == [
        "tiny",
        "tiny/config.json",
        "tiny/model.safetensors",
        "tiny/sub",
        "tiny/sub/extra.txt",
    ]
    for name in started.files:
        assert (done.path / name).read_bytes() == FILES[name]
    last = progress[-1]
    assert isinstance(last, DownloadProgress)
    assert last.progress.done_bytes == last.progress.total_bytes == started.info.total_bytes
    assert env.actor.statistics().completed == 1


async def test_lora_goes_to_lora_dir_with_folder_name(env: Env) -> None:
    events = await collect(
        env.handle, env.spec(repo_type="lora", folder_name="my-lora", revision="v2")
    )
    assert isinstance(events[-1], DownloadDone)
    assert (env.loras / "my-lora" / "config.json").is_file()
    assert leftovers(env.models) == []


async def test_gated_repo_needs_token(env: Env) -> None:
    env.hub.add(FakeRepo("org/gated", {"a.txt": b"secret"}, token=TOKEN))
    [failed] = await collect(env.handle, env.spec("org/gated"))
    assert isinstance(failed, DownloadFailed)
    assert isinstance(failed.error, AuthenticationError)
    assert failed.error.code == "hub_gated_repo"
    assert "token" in failed.error.message
    events = await collect(env.handle, env.spec("org/gated", token=TOKEN))
    assert isinstance(events[-1], DownloadDone)
    assert (env.models / "gated" / "a.txt").read_bytes() == b"secret"
    assert any(TOKEN in line for line in env.hub.repos["org/gated"].requests)
    # the token is in no event, no listing and no repr
    assert all(TOKEN not in repr(e) for e in events)
    assert TOKEN not in repr(env.spec("org/gated", token=TOKEN))


async def test_missing_revision_and_repo(env: Env) -> None:
    [failed] = await collect(env.handle, env.spec(revision="nope"))
    assert isinstance(failed, DownloadFailed)
    assert isinstance(failed.error, NotFound)
    assert (failed.error.code, failed.error.param) == ("hub_revision_not_found", "revision")
    [failed] = await collect(env.handle, env.spec("org/absent"))
    assert isinstance(failed, DownloadFailed)
    assert failed.error.code == "hub_repo_not_found"
    assert leftovers(env.models) == []


async def test_dropped_connection_is_resumed(env: Env) -> None:
    repo = env.hub.repos["org/tiny"]
    repo.drop_after, repo.drops_left = 20_000, 1
    events = await collect(env.handle, env.spec(include=("model.safetensors",)))
    assert isinstance(events[-1], DownloadDone)
    assert (env.models / "tiny" / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    gets = [r for r in repo.requests if r.startswith("GET /org/tiny/resolve")]
    assert len(gets) == 2  # the cut transfer and its resumption


async def test_connection_that_keeps_dropping_leaves_nothing(env: Env) -> None:
    repo = env.hub.repos["org/tiny"]
    repo.drop_after, repo.drops_left = 10_000, 100
    events = await collect(env.handle, env.spec())
    failed = events[-1]
    assert isinstance(failed, DownloadFailed)
    assert isinstance(failed.error, ServiceUnavailable)
    assert failed.error.code == "hub_connection_failed"
    assert leftovers(env.models) == []


async def test_cancel_by_id_leaves_nothing(env: Env) -> None:
    env.hub.add(
        FakeRepo(
            "org/big", {"small.txt": b"x", "big.bin": os.urandom(400_000)}, slow_file="big.bin"
        )
    )
    events = await env.handle.download(env.spec("org/big"))
    async with events:
        started = await events.receive()
        assert isinstance(started, DownloadStarted)
        [info] = await env.handle.list()
        assert info.download_id == started.info.download_id
        assert (info.repo_id, info.state) == ("org/big", "downloading")
        assert isinstance(await events.receive(), DownloadProgress)
        await env.handle.cancel(started.info.download_id)
        rest = [e async for e in events]
    assert isinstance(rest[-1], DownloadFailed)
    assert isinstance(rest[-1].error, RequestCancelled)
    assert leftovers(env.models) == []
    assert await env.handle.list() == ()
    with pytest.raises(NotFound):
        await env.handle.cancel(started.info.download_id)


async def test_statistics_through_the_handle(env: Env) -> None:
    env.hub.add(FakeRepo("org/big", {"big.bin": os.urandom(400_000)}, slow_file="big.bin"))
    await collect(env.handle, env.spec(include=("README.md",)))
    events = await env.handle.download(env.spec("org/big"))
    async with events:
        assert isinstance(await events.receive(), DownloadStarted)
        progress = await events.receive()
        assert isinstance(progress, DownloadProgress)
        busy = await env.handle.statistics()
        assert (busy.running, busy.started, busy.completed, busy.failed) == (1, 2, 1, 0)
        assert busy.bytes_downloaded >= progress.progress.done_bytes > 0
    with trio.fail_after(5):
        while (await env.handle.statistics()).running:
            await trio.sleep(0.02)
    assert await env.handle.statistics() == DownloaderStats(
        running=0, started=2, completed=1, failed=1, bytes_downloaded=0
    )


async def test_consumer_leaving_cancels(env: Env) -> None:
    env.hub.add(FakeRepo("org/big", {"big.bin": os.urandom(400_000)}, slow_file="big.bin"))
    events = await env.handle.download(env.spec("org/big"))
    async with events:
        assert isinstance(await events.receive(), DownloadStarted)
    with trio.fail_after(5):
        while await env.handle.list():
            await trio.sleep(0.02)
    assert leftovers(env.models) == []


async def test_existing_folder_conflicts_unless_overwrite(env: Env) -> None:
    (env.models / "tiny").mkdir()
    (env.models / "tiny" / "old.txt").write_text("old")
    [failed] = await collect(env.handle, env.spec())
    assert isinstance(failed, DownloadFailed)
    assert isinstance(failed.error, Conflict)
    events = await collect(env.handle, env.spec(include=("README.md",), overwrite=True))
    assert isinstance(events[-1], DownloadDone)
    assert leftovers(env.models) == ["tiny", "tiny/README.md"]


@pytest.mark.parametrize("folder", ["../escape", "a/b", "..", ".hidden"])
async def test_folder_name_cannot_escape(env: Env, folder: str) -> None:
    [failed] = await collect(env.handle, env.spec(folder_name=folder))
    assert isinstance(failed, DownloadFailed)
    assert isinstance(failed.error, InvalidRequest)
    assert failed.error.param == "folder_name"
    assert leftovers(env.models.parent) == ["loras", "models"]


async def test_several_downloads_at_once(env: Env) -> None:
    env.hub.add(FakeRepo("org/other", {"w.bin": bytes(50_000)}))
    results: dict[str, DownloadEvent] = {}

    async def one(repo_id: str) -> None:
        results[repo_id] = (await collect(env.handle, env.spec(repo_id)))[-1]

    async with trio.open_nursery() as nursery:
        for repo_id in ("org/tiny", "org/other"):
            nursery.start_soon(one, repo_id)
    assert all(isinstance(e, DownloadDone) for e in results.values())
    assert sorted(p.name for p in env.models.iterdir()) == ["other", "tiny"]


def test_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert resolve_endpoint(DownloadSpec("a/b"), None) == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.local/")
    assert resolve_endpoint(DownloadSpec("a/b"), None) == "http://mirror.local"
    assert resolve_endpoint(DownloadSpec("a/b"), "http://config.local") == "http://config.local"
    spec = DownloadSpec("a/b", endpoint="http://request.local")
    assert resolve_endpoint(spec, "http://config.local") == "http://request.local"


async def test_local_disk_error_fails_only_that_download(env: Env, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the model dir should be")
    actor = Downloader(model_dir=blocked, lora_dir=env.loras)
    async with trio.open_nursery() as nursery:
        handle = await nursery.start(actor.run)
        failed = (await collect(handle, env.spec()))[-1]
        assert isinstance(failed, DownloadFailed)
        assert failed.error.code == "download_failed"
        done = (await collect(handle, env.spec(repo_type="lora")))[-1]
        assert isinstance(done, DownloadDone)  # the actor kept serving
        nursery.cancel_scope.cancel()


def test_saved_hub_token_never_goes_to_a_mirror() -> None:
    from tabby.actors.hub import PUBLIC_HUB, DownloadSpec, _token_for

    anonymous = DownloadSpec(repo_id="org/name")
    assert _token_for(anonymous, "http://127.0.0.1:9/") is False
    assert _token_for(anonymous, PUBLIC_HUB) is None  # the hub may use the saved token
    assert _token_for(DownloadSpec(repo_id="org/name", token="hf_x"), "http://m") == "hf_x"
