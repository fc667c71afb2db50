"""Admin routes on a real server with tiny real models: permissions, listings, the model
card, templates, sampler overrides, LoRAs and tokenization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.admin_rig import admin_config
from tests.conftest import LiveServer, StartServer

# (method, path, body): body None = no body.
API_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/v1/models", None),
    ("GET", "/v1/model/list", None),
    ("GET", "/v1/model", None),
    ("GET", "/v1/model/draft/list", None),
    ("GET", "/props", None),
    ("GET", "/v1/loras", None),
    ("GET", "/v1/lora/list", None),
    ("GET", "/v1/lora", None),
    ("GET", "/v1/templates", None),
    ("GET", "/v1/template/list", None),
    ("GET", "/v1/sampling/overrides", None),
    ("GET", "/v1/sampling/override/list", None),
    ("POST", "/v1/token/encode", {"text": "Hello"}),
    ("POST", "/v1/token/decode", {"tokens": [300, 301]}),
]
# Bodies that fail validation, so an accepted key changes nothing.
ADMIN_ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/v1/model/load", {"model_name": 5}),
    ("POST", "/v1/model/unload", {"skip_queue": "yes"}),
    ("POST", "/v1/lora/load", {"loras": "style"}),
    ("POST", "/v1/template/switch", {"prompt_template_name": 1}),
    ("POST", "/v1/sampling/override/switch", {"preset": 3}),
    ("POST", "/v1/lora/unload", None),
    ("POST", "/v1/template/unload", None),
    ("POST", "/v1/sampling/override/unload", None),
]


async def call(
    client: httpx.AsyncClient, method: str, path: str, body: Any, headers: dict[str, str]
) -> httpx.Response:
    if body is None:
        return await client.request(method, path, headers=headers)
    return await client.request(method, path, json=body, headers=headers)


def assert_error(response: httpx.Response, status: int, *, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error


@pytest.fixture
async def server(live_server: StartServer, tmp_path: Path) -> LiveServer:
    return await live_server(admin_config(tmp_path))


async def test_permission_matrix(server: LiveServer) -> None:
    async with server.client() as client:
        for method, path, body in API_ROUTES + ADMIN_ROUTES:
            r = await call(client, method, path, body, {})
            assert_error(r, 401)
            r = await call(client, method, path, body, {"Authorization": "Bearer wrong"})
            assert_error(r, 401)
        for method, path, body in API_ROUTES:
            for kind in ("api", "admin"):
                r = await call(client, method, path, body, server.auth(kind))  # type: ignore[arg-type]
                assert r.status_code == 200, (kind, path, r.text)
        for method, path, body in ADMIN_ROUTES:
            r = await call(client, method, path, body, server.auth("api"))
            assert_error(r, 403)
            r = await call(client, method, path, body, server.auth("admin"))
            assert r.status_code not in (401, 403), (path, r.text)
            if body is not None:
                assert_error(r, 400)  # validated after the key was accepted
        # The documentation is public.
        assert (await client.get("/openapi.json")).status_code == 200
        assert (await client.get("/docs")).status_code == 200


async def test_listings_show_admins_the_folders_and_others_what_is_loaded(
    server: LiveServer,
) -> None:
    async with server.client() as client:

        async def ids(path: str, kind: str) -> list[Any]:
            r = await client.get(path, headers=server.auth(kind))  # type: ignore[arg-type]
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["object"] == "list"
            return [item["id"] if isinstance(item, dict) else item for item in body["data"]]

        admin_models = await ids("/v1/models", "admin")
        assert admin_models[:2] == ["tiny", "tiny2"]
        assert await ids("/v1/model/list", "admin") == admin_models
        assert await ids("/v1/models", "api") == ["tiny"]
        assert await ids("/v1/model/draft/list", "admin") == ["draft"]
        assert await ids("/v1/model/draft/list", "api") == []
        assert await ids("/v1/loras", "admin") == ["style"]
        assert await ids("/v1/lora/list", "api") == []
        assert {"alpaca", "chatml", "llama3", "mistral"} <= set(await ids("/v1/templates", "admin"))
        assert await ids("/v1/template/list", "api") == ["tokenizer_config.json"]
        card = (await client.get("/v1/models", headers=server.auth())).json()["data"][0]
        assert card["object"] == "model"
        assert card["owned_by"] == "tabby"
        assert isinstance(card["created"], int)


async def test_dummy_models_are_listed_for_everyone(
    live_server: StartServer, tmp_path: Path
) -> None:
    config = admin_config(
        tmp_path, model_name="", model={"use_dummy_models": True, "dummy_model_names": ["gpt-4"]}
    )
    server = await live_server(config)
    async with server.client() as client:
        r = await client.get("/v1/models", headers=server.auth())
        assert [c["id"] for c in r.json()["data"]] == ["gpt-4"]
        r = await client.get("/v1/models", headers=server.auth("admin"))
        assert [c["id"] for c in r.json()["data"]][:3] == ["gpt-4", "tiny", "tiny2"]


async def test_model_card_and_props(server: LiveServer) -> None:
    async with server.client() as client:
        card = (await client.get("/v1/model", headers=server.auth())).json()
        assert card["id"] == "tiny"
        params = card["parameters"]
        assert params["backend"] == "reference"
        assert (params["max_seq_len"], params["cache_size"]) == (256, 1024)
        assert params["prompt_template_content"].startswith("{% for message in messages %}")
        assert (params["loras"], params["draft"], params["use_vision"]) == ([], None, False)
        props = (await client.get("/props", headers=server.auth())).json()
        assert props == {
            "total_slots": params["max_batch_size"],
            "chat_template": params["prompt_template_content"],
            "default_generation_settings": {"n_ctx": 256},
        }


async def test_without_a_model(live_server: StartServer, tmp_path: Path) -> None:
    server = await live_server(admin_config(tmp_path, model_name=""))
    async with server.client() as client:
        for method, path, body in [
            ("GET", "/v1/model", None),
            ("GET", "/props", None),
            ("GET", "/v1/lora", None),
            ("POST", "/v1/token/encode", {"text": "x"}),
            ("POST", "/v1/token/decode", {"tokens": [1]}),
        ]:
            assert_error(await call(client, method, path, body, server.auth()), 503)
        for path in ("/v1/model/unload", "/v1/template/unload", "/v1/lora/unload"):
            assert_error(await client.post(path, headers=server.auth("admin")), 503)
        r = await client.post(
            "/v1/template/switch", json={"name": "chatml"}, headers=server.auth("admin")
        )
        assert_error(r, 503)
        assert (await client.get("/v1/models", headers=server.auth())).json()["data"] == []
        assert (await client.get("/v1/templates", headers=server.auth())).json()["data"] == []


async def test_template_switch_and_unload(server: LiveServer) -> None:
    admin = server.auth("admin")
    async with server.client() as client:
        r = await client.post("/v1/template/switch", json={"name": "alpaca"}, headers=admin)
        assert r.json() == {"status": "switched"}
        listed = await client.get("/v1/template/list", headers=server.auth())
        assert listed.json()["data"] == ["alpaca"]
        props = (await client.get("/props", headers=server.auth())).json()
        assert "Instruction" in props["chat_template"]
        r = await client.post(
            "/v1/template/switch", json={"prompt_template_name": "nope"}, headers=admin
        )
        assert_error(r, 404, param="prompt_template_name")
        r = await client.post("/v1/template/switch", json={}, headers=admin)
        assert_error(r, 400, param="prompt_template_name")
        r = await client.post("/v1/template/switch", json={"name": "../x"}, headers=admin)
        assert_error(r, 400, param="prompt_template_name")
        assert (await client.get("/v1/templates", headers=server.auth())).json()["data"] == [
            "alpaca"
        ]
        assert (await client.post("/v1/template/unload", headers=admin)).status_code == 200
        assert (await client.get("/v1/templates", headers=server.auth())).json()["data"] == []
        assert (await client.get("/props", headers=server.auth())).json()["chat_template"] == ""
        r = await client.post(
            "/v1/token/encode",
            json={"text": [{"role": "user", "content": "Hi"}]},
            headers=server.auth(),
        )
        assert_error(r, 422)


async def test_sampling_overrides(server: LiveServer) -> None:
    admin, api = server.auth("admin"), server.auth()
    async with server.client() as client:

        async def listing(headers: dict[str, str]) -> dict[str, Any]:
            r = await client.get("/v1/sampling/overrides", headers=headers)
            assert r.status_code == 200
            again = await client.get("/v1/sampling/override/list", headers=headers)
            assert again.json() == r.json()
            body: dict[str, Any] = r.json()
            return body

        assert await listing(api) == {"selected_preset": None, "overrides": {}, "presets": []}
        assert (await listing(admin))["presets"] == ["safe_defaults", "sample_preset"]
        r = await client.post(
            "/v1/sampling/override/switch", json={"preset": "safe_defaults"}, headers=admin
        )
        assert r.status_code == 200, r.text
        state = await listing(api)
        assert state["selected_preset"] == "safe_defaults"
        assert state["overrides"]["temperature"] == {
            "override": 0.8, "force": False, "additive": False
        }
        inline = {"top_k": {"override": 20, "force": True}}
        r = await client.post(
            "/v1/sampling/override/switch", json={"overrides": inline}, headers=admin
        )
        assert r.status_code == 200, r.text
        state = await listing(api)
        assert state["selected_preset"] is None
        assert state["overrides"] == {"top_k": {"override": 20, "force": True, "additive": False}}
        r = await client.post("/v1/sampling/override/switch", json={}, headers=admin)
        assert_error(r, 400, param="preset")
        r = await client.post(
            "/v1/sampling/override/switch", json={"preset": "missing"}, headers=admin
        )
        assert_error(r, 404, param="preset")
        r = await client.post(
            "/v1/sampling/override/switch",
            json={"overrides": {"temperature": {"override": "hot"}}},
            headers=admin,
        )
        assert_error(r, 400)
        assert (await client.post("/v1/sampling/override/unload", headers=admin)).status_code == 200
        assert await listing(api) == {"selected_preset": None, "overrides": {}, "presets": []}


async def test_loras_on_a_backend_without_them(server: LiveServer) -> None:
    async with server.client() as client:
        r = await client.post(
            "/v1/lora/load", json={"loras": [{"name": "style"}]}, headers=server.auth("admin")
        )
        assert_error(r, 422)
        assert r.json()["error"]["code"] == "not_supported"
        assert "not supported by the reference backend" in r.json()["error"]["message"]
        assert_error(await client.post("/v1/lora/unload", headers=server.auth("admin")), 422)
        r = await client.get("/v1/lora", headers=server.auth())
        assert r.json() == {"object": "list", "data": []}


async def test_token_encode_decode(server: LiveServer) -> None:
    api = server.auth()
    async with server.client() as client:

        async def encode(body: dict[str, Any]) -> list[int]:
            r = await client.post("/v1/token/encode", json=body, headers=api)
            assert r.status_code == 200, r.text
            data = r.json()
            assert data["length"] == len(data["tokens"])
            tokens: list[int] = data["tokens"]
            return tokens

        async def decode(tokens: list[int], **options: Any) -> str:
            r = await client.post(
                "/v1/token/decode", json={"tokens": tokens, **options}, headers=api
            )
            assert r.status_code == 200, r.text
            text: str = r.json()["text"]
            return text

        text = "The quick brown fox: 42!"
        plain = await encode({"text": text, "add_bos_token": False})
        assert await decode(plain) == text
        with_bos = await encode({"text": text})
        assert with_bos == [1, *plain]  # the tiny model's BOS id
        assert await decode(with_bos, decode_special_tokens=False) == text
        assert await decode(with_bos) == "<|im_start|>" + text
        # Messages: rendered with the chat template, no generation prompt.
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
        rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
        by_messages = await encode({"text": messages, "add_bos_token": False})
        assert by_messages == await encode({"text": rendered, "add_bos_token": False})
        assert await decode(by_messages) == rendered
        # The template's BOS is not doubled when the tokenizer adds one.
        assert await encode({"text": messages}) == by_messages
        # Bad input names the field.
        r = await client.post("/v1/token/decode", json={"tokens": [5, 10**9]}, headers=api)
        assert_error(r, 400, param="tokens[1]")
        r = await client.post("/v1/token/decode", json={"tokens": ["a"]}, headers=api)
        assert_error(r, 400, param="tokens[0]")
        r = await client.post("/v1/token/encode", json={"text": []}, headers=api)
        assert_error(r, 400, param="text")
        r = await client.post("/v1/token/encode", json={"txt": "x"}, headers=api)
        assert_error(r, 400, param="text")
        r = await client.post(
            "/v1/token/encode", content=b"{not json", headers={**api, "Content-Type": "application/json"}
        )
        assert_error(r, 400)
