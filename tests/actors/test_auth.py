from __future__ import annotations

import os
import re
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from tabby.actors.auth import (
    AuthHandle,
    AuthStats,
    AuthStore,
    ReloadOutcome,
    presented_keys,
)
from tabby.actors.health import HealthHandle, HealthMonitor
from tabby.actors.keyfile import KeyFileError, add_api_key, read_key_file
from tabby.errors import ServiceUnavailable
from tabby.serving.permission import Permission

# Real time: the store stats the file in a worker thread, which a virtual clock would
# race past. 50 ms keeps the hot-reload test short.
POLL = 0.05


@pytest.fixture
async def health(nursery: trio.Nursery) -> HealthHandle:
    handle: HealthHandle = await nursery.start(HealthMonitor().run)
    return handle


async def start_store(
    nursery: trio.Nursery, path: Path | None, health: HealthHandle
) -> tuple[AuthStore, AuthHandle]:
    store = AuthStore(path, health, poll_interval=POLL)
    handle: AuthHandle = await nursery.start(store.run)
    return store, handle


async def eventually(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until ``predicate()`` holds; the file is polled every POLL seconds."""
    with trio.move_on_after(100 * POLL):
        while not await predicate():
            await trio.sleep(POLL / 4)
    assert await predicate(), what


def test_presented_keys_reads_every_header_kind() -> None:
    headers = {
        "X-Admin-Key": " a ",
        "X-Api-Key": "b",
        "Authorization": "bEaReR   c ",
    }
    assert presented_keys(headers) == ("a", "b", "c")
    assert presented_keys({"Authorization": "Basic Zm9v"}) == ()
    assert presented_keys({"Authorization": "Bearer"}) == ()
    assert presented_keys({}) == ()


async def test_first_start_creates_private_file(
    nursery: trio.Nursery, health: HealthHandle, tmp_path: Path
) -> None:
    path = tmp_path / "sub" / "api_tokens.toml"
    store, auth = await start_store(nursery, path, health)
    created = store.created_keys
    assert created is not None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path) == created
    (api_key,) = created.api_keys
    for key in (api_key, created.admin_key):
        assert re.fullmatch(r"[0-9a-f]{32}", key)  # 128 random bits
    assert api_key != created.admin_key
    assert await auth.check_keys((api_key,)) is Permission.API
    assert await auth.check_keys((created.admin_key,)) is Permission.ADMIN
    assert await auth.check_keys(("nope",)) is Permission.NONE
    assert await auth.check_keys(()) is Permission.NONE
    # The highest permission among the presented keys wins.
    assert await auth.check_keys(("nope", created.admin_key)) is Permission.ADMIN

    # A second start reads the same file and creates nothing.
    again, auth2 = await start_store(nursery, path, health)
    assert again.created_keys is None
    assert await auth2.check_keys((api_key,)) is Permission.API


async def test_several_api_keys(
    nursery: trio.Nursery, health: HealthHandle, tmp_path: Path
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('admin_key = "adm"\napi_keys = ["k1", "k2", "k3"]\n')
    store, auth = await start_store(nursery, path, health)
    assert store.created_keys is None
    for key in ("k1", "k2", "k3"):
        assert await auth.check_keys((key,)) is Permission.API
    assert await auth.check_keys(("k4",)) is Permission.NONE
    assert store.statistics().api_keys == 3


async def test_disabled_auth_makes_everyone_admin(
    nursery: trio.Nursery, health: HealthHandle, tmp_path: Path
) -> None:
    store, auth = await start_store(nursery, None, health)
    assert await auth.check_keys(()) is Permission.ADMIN
    assert await auth.check_keys(("anything",)) is Permission.ADMIN
    assert store.created_keys is None
    assert await trio.to_thread.run_sync(os.listdir, tmp_path) == []
    assert await auth.reload() == ReloadOutcome(True, 0, ())


async def test_invalid_file_at_startup_is_an_error(
    nursery: trio.Nursery, health: HealthHandle, tmp_path: Path
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('admin_key = 42\napi_keys = ["ok", ""]\nextra = 1\n')
    with pytest.raises(KeyFileError) as info:
        await start_store(nursery, path, health)
    assert info.value.lines == [
        f"{path}: admin_key: expected a string, got 42",
        f"{path}: extra: unknown key",
    ]
    path.write_text('admin_key = "a"\napi_keys = ["ok", ""]\n')
    with pytest.raises(KeyFileError) as info:
        await start_store(nursery, path, health)
    assert info.value.lines == [
        f"{path}: api_keys: expected a list of non-empty keys without surrounding spaces, "
        "got ('ok', '')"
    ]
    path.write_text('admin_key = "a"\napi_keys = "k"\n')
    with pytest.raises(KeyFileError, match="expected a list of keys, got a string"):
        await start_store(nursery, path, health)
    path.write_text("admin_key = [\n")
    with pytest.raises(KeyFileError, match=r"keys\.toml:\d+: "):
        await start_store(nursery, path, health)


async def test_hot_reload_valid_and_invalid_edits(
    nursery: trio.Nursery,
    health: HealthHandle,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "api_tokens.toml"
    store, auth = await start_store(nursery, path, health)
    assert store.created_keys is not None
    old_key = store.created_keys.api_keys[0]

    # A valid edit (as `tabby keys add` makes it) is picked up by the poll.
    new_key = await trio.to_thread.run_sync(add_api_key, path)

    async def new_key_works() -> bool:
        return await auth.check_keys((new_key,)) is Permission.API

    await eventually(new_key_works, "the added key was not loaded")
    assert await auth.check_keys((old_key,)) is Permission.API
    assert (await health.get()).healthy

    # An invalid edit keeps the previous keys and opens a health problem.
    path.write_text('admin_key = "x"\napi_keys = "not a list"\n')

    async def problem_open() -> bool:
        return not (await health.get()).healthy

    await eventually(problem_open, "no health problem for the broken file")
    (problem,) = (await health.get()).problems
    assert problem.source == "auth"
    assert "previous keys still in force" in problem.description
    # /health shows problems to anyone: what is wrong, not the file or its contents; the
    # server log has the details.
    assert "api_keys" not in problem.description
    assert str(tmp_path) not in problem.description
    assert any("api_keys" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    assert await auth.check_keys((new_key,)) is Permission.API
    assert await auth.check_keys(("x",)) is Permission.NONE

    # Fixing the file applies it and clears the problem.
    path.write_text('admin_key = "fixed-admin"\napi_keys = ["fixed-api"]\n')

    async def recovered() -> bool:
        return (await health.get()).healthy

    await eventually(recovered, "the problem was not cleared")
    assert await auth.check_keys(("fixed-api",)) is Permission.API
    assert await auth.check_keys(("fixed-admin",)) is Permission.ADMIN
    assert await auth.check_keys((new_key,)) is Permission.NONE
    stats = store.statistics()
    assert (stats.reloads, stats.failed_reloads) == (3, 1)


async def test_deleted_file_keeps_keys_until_restored(
    nursery: trio.Nursery, health: HealthHandle, tmp_path: Path
) -> None:
    path = tmp_path / "api_tokens.toml"
    store, auth = await start_store(nursery, path, health)
    assert store.created_keys is not None
    admin = store.created_keys.admin_key
    saved = path.read_text()
    os.unlink(path)
    outcome = await auth.reload()
    assert not outcome.ok
    assert "cannot read the keys file" in outcome.problems[0]
    assert await auth.check_keys((admin,)) is Permission.ADMIN
    assert not (await health.get()).healthy
    path.write_text(saved)
    assert (await auth.reload()).ok
    assert (await health.get()).healthy


async def test_statistics_through_the_handle(
    nursery: trio.Nursery, health: HealthHandle, tmp_path: Path
) -> None:
    path = tmp_path / "api_tokens.toml"
    path.write_text('admin_key = "adm"\napi_keys = ["k1", "k2"]\n')
    _, auth = await start_store(nursery, path, health)
    assert await auth.check_keys(("k1",)) is Permission.API
    assert await auth.check_keys(("nope",)) is Permission.NONE
    path.write_text('admin_key = "x"\napi_keys = "not a list"\n')
    assert not (await auth.reload()).ok
    assert await auth.statistics() == AuthStats(
        auth_disabled=False,
        api_keys=2,
        checks=2,
        refused=1,
        reloads=1,
        failed_reloads=1,
        keys_file_problem=True,
    )


async def test_handle_after_store_stopped(health: HealthHandle) -> None:
    async with trio.open_nursery() as nursery:
        _, auth = await start_store(nursery, None, health)
        nursery.cancel_scope.cancel()
    with pytest.raises(ServiceUnavailable, match="the key store is not running"):
        await auth.check_keys(("k",))
    with pytest.raises(ServiceUnavailable):
        await auth.statistics()
