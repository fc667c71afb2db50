"""The auth header matrix against a real server: header kind x key kind x route kind."""

from __future__ import annotations

import stat
from typing import Literal

import httpx
from conftest import StartServer

from tabby.actors.keyfile import add_api_key

HeaderKind = Literal["X-Api-Key", "X-Admin-Key", "Bearer", "bearer (lower-case)"]
HEADER_KINDS: tuple[HeaderKind, ...] = ("X-Api-Key", "X-Admin-Key", "Bearer", "bearer (lower-case)")
PERMISSION_ROUTE = ("GET", "/v1/auth/permission")  # needs an API key
ADMIN_ROUTE = ("POST", "/v1/auth/keys/reload")  # needs the admin key
PUBLIC_ROUTE = ("GET", "/health")


def header(kind: HeaderKind, key: str) -> dict[str, str]:
    if kind == "Bearer":
        return {"Authorization": f"Bearer {key}"}
    if kind == "bearer (lower-case)":
        return {"Authorization": f"bearer {key}"}
    return {kind: key}


async def call(
    client: httpx.AsyncClient, route: tuple[str, str], headers: dict[str, str]
) -> tuple[int, str]:
    response = await client.request(route[0], route[1], headers=headers)
    body = response.json()
    if response.status_code >= 400:
        return response.status_code, body["error"]["type"]
    return response.status_code, str(body.get("permission", "ok"))


async def test_header_matrix(live_server: StartServer) -> None:
    server = await live_server()
    keys = {"api": server.api_key, "admin": server.admin_key, "invalid": "0" * 32}
    expected = {
        ("api", PERMISSION_ROUTE): (200, "api"),
        ("api", ADMIN_ROUTE): (403, "permission_error"),
        ("api", PUBLIC_ROUTE): (200, "ok"),
        ("admin", PERMISSION_ROUTE): (200, "admin"),
        ("admin", ADMIN_ROUTE): (200, "ok"),
        ("admin", PUBLIC_ROUTE): (200, "ok"),
        ("invalid", PERMISSION_ROUTE): (401, "authentication_error"),
        ("invalid", ADMIN_ROUTE): (401, "authentication_error"),
        ("invalid", PUBLIC_ROUTE): (200, "ok"),
    }
    got = {}
    want = {}
    async with server.client() as client:
        for kind in HEADER_KINDS:
            for (key_kind, route), outcome in expected.items():
                got[kind, key_kind, route] = await call(client, route, header(kind, keys[key_kind]))
                want[kind, key_kind, route] = outcome
        assert got == want

        # No key at all, and headers that carry no usable key.
        for headers in ({}, {"Authorization": "Basic YWRtaW46YWRtaW4="}, {"X-Api-Key": ""}):
            assert await call(client, PERMISSION_ROUTE, headers) == (401, "authentication_error")
            assert await call(client, ADMIN_ROUTE, headers) == (401, "authentication_error")
            assert await call(client, PUBLIC_ROUTE, headers) == (200, "ok")


async def test_error_bodies_and_headers(live_server: StartServer) -> None:
    server = await live_server()
    async with server.client() as client:
        missing = await client.get("/v1/auth/permission")
        invalid = await client.get("/v1/auth/permission", headers={"X-Api-Key": "wrong"})
        forbidden = await client.post("/v1/auth/keys/reload", headers=server.auth("api"))
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json() == {
        "error": {
            "message": "Please provide an API key (Authorization: Bearer, X-Api-Key or X-Admin-Key)",
            "type": "authentication_error",
            "param": None,
            "code": "missing_api_key",
        }
    }
    assert invalid.json()["error"] == {
        "message": "Invalid API key",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "admin_required"


async def test_valid_key_in_any_header_wins(live_server: StartServer) -> None:
    server = await live_server()
    headers = {"X-Api-Key": "wrong", "Authorization": f"Bearer {server.admin_key}"}
    async with server.client() as client:
        assert await call(client, ADMIN_ROUTE, headers) == (200, "ok")


async def test_disabled_auth(live_server: StartServer) -> None:
    server = await live_server(network={"disable_auth": True})
    assert server.info.auth_disabled
    assert not server.keys_file.exists()
    async with server.client() as client:
        assert await call(client, PERMISSION_ROUTE, {}) == (200, "admin")
        assert await call(client, ADMIN_ROUTE, {"X-Api-Key": "whatever"}) == (200, "ok")


async def test_keys_file_and_reload_route(live_server: StartServer) -> None:
    server = await live_server()
    assert stat.S_IMODE(server.keys_file.stat().st_mode) == 0o600
    new_key = add_api_key(server.keys_file)
    async with server.client() as client:
        reloaded = await client.post("/v1/auth/keys/reload", headers=server.auth("admin"))
        assert reloaded.json() == {"status": "reloaded", "api_keys": 2}
        allowed = await client.get("/v1/auth/permission", headers={"X-Api-Key": new_key})
        assert allowed.json() == {"permission": "api"}

        server.keys_file.write_text("admin_key = ")
        refused = await client.post("/v1/auth/keys/reload", headers=server.auth("admin"))
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "invalid_keys_file"
        health = await client.get("/health")
        assert health.status_code == 503
        still = await client.get("/v1/auth/permission", headers={"X-Api-Key": new_key})
        assert still.json() == {"permission": "api"}
