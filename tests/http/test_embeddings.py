"""``/v1/embeddings`` and the embedding-model routes on a live server (real model)."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import trio

from tabby.actors.embedder import embedder_from_config
from tabby.backends.infinity import (
    EMBEDDED_MODEL_NAME,
    InfinityEngine,
    await_future,
    embedded_model_path,
    infinity_missing,
)
from tabby.config import EmbeddingsConfig, ModelConfigSection, NetworkConfig, TabbyConfig
from tabby.errors import ServiceUnavailable
from tabby.http import embeddings
from tabby.http.app import ROUTE_MODULES
from tabby.http.services import Services

needs_infinity = pytest.mark.skipif(infinity_missing(), reason="needs infinity-emb")

TEXTS = ["A quick brown fox.", "Vectors for everyone", "tabby serves embeddings"]
MAX_BATCH = 8


def make_config(base_dir: Path) -> TabbyConfig:
    return TabbyConfig(
        network=NetworkConfig(host="127.0.0.1", port=0, shutdown_grace=1.0),
        model=ModelConfigSection(model_name=None),  # no chat model: only this part runs
        embeddings=EmbeddingsConfig(max_batch=MAX_BATCH),
        base_dir=base_dir,
    )


@pytest.fixture
async def server(live_server: Any, nursery: trio.Nursery, tmp_path: Path) -> Any:
    config = make_config(tmp_path)
    if any(name == "tabby.http.embeddings" for name, _ in ROUTE_MODULES):
        return await live_server(config)  # the server starts the Embedder itself
    handle = await nursery.start(embedder_from_config(config).run)
    services = Services(config=config, auth=None, health=None, embedder=handle)  # type: ignore[arg-type]
    return await live_server(config, extra_blueprints=[embeddings.blueprint(services)])


@pytest.fixture(scope="module")
def reference() -> np.ndarray[Any, Any]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(embedded_model_path()), device="cpu")
    vectors: np.ndarray[Any, Any] = model.encode(TEXTS)
    return vectors


@needs_infinity
async def test_openai_client_both_encodings(server: Any, reference: np.ndarray[Any, Any]) -> None:
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)
    floats = await client.embeddings.create(input=TEXTS, model="ignored", encoding_format="float")
    assert floats.model == EMBEDDED_MODEL_NAME
    assert [d.index for d in floats.data] == [0, 1, 2]
    np.testing.assert_allclose(np.array([d.embedding for d in floats.data]), reference, atol=1e-5)
    raw = await client.embeddings.create(input=TEXTS, model="ignored", encoding_format="base64")
    decoded = np.array([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in raw.data])  # type: ignore[arg-type]
    np.testing.assert_allclose(decoded, reference, atol=1e-5)
    single = await client.embeddings.create(input=TEXTS[0], model="x")
    np.testing.assert_allclose(single.data[0].embedding, reference[0], atol=1e-5)
    assert 0 < floats.usage.prompt_tokens == floats.usage.total_tokens < sum(map(len, TEXTS))
    await client.close()


@needs_infinity
async def test_many_concurrent_requests(server: Any) -> None:
    answers: dict[int, list[float]] = {}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        r = await client.post("/v1/embeddings", json={"input": f"text {i}"}, headers=server.auth())
        assert r.status_code == 200, r.text
        answers[i] = r.json()["data"][0]["embedding"]

    async with server.client(timeout=60) as client, trio.open_nursery() as nursery:
        for i in range(32):
            nursery.start_soon(one, client, i)
    assert sorted(answers) == list(range(32))
    assert len({tuple(v[:4]) for v in answers.values()}) == 32


BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input[1]"),
    ({"input": ["t"] * (MAX_BATCH + 1)}, "input"),
    ({"input": 123}, "input"),
    ({}, "input"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
]


@needs_infinity
async def test_bad_requests_name_the_field(server: Any) -> None:
    async with server.client() as client:
        for body, param in BAD_BODIES:
            r = await client.post("/v1/embeddings", json=body, headers=server.auth())
            assert (r.status_code, r.json()["error"]["param"]) == (400, param), body


@needs_infinity
async def test_client_that_leaves_does_not_hurt(server: Any) -> None:
    texts = [f"a longer sentence to embed, number {i} " * 6 for i in range(MAX_BATCH)]
    async with server.client(timeout=0.05) as client:
        with pytest.raises(httpx.TimeoutException):
            await client.post("/v1/embeddings", json={"input": texts}, headers=server.auth())
    async with server.client() as client:
        r = await client.post("/v1/embeddings", json={"input": "after"}, headers=server.auth())
    assert r.status_code == 200


@needs_infinity
async def test_client_that_leaves_cancels_its_work(
    server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real engine answers a short text faster than a client can leave, so the work is
    # held open here: the engine's future stays pending until someone cancels it.
    held: list[concurrent.futures.Future[Any]] = []
    submitted = trio.Event()

    def submit(self: InfinityEngine, texts: list[str]) -> concurrent.futures.Future[Any]:
        held.append(concurrent.futures.Future())
        submitted.set()
        return held[-1]

    monkeypatch.setattr(InfinityEngine, "submit", submit)
    async with server.client(timeout=0.5) as client:
        with pytest.raises(httpx.TimeoutException):  # the client gives up and hangs up
            await client.post("/v1/embeddings", json={"input": "x"}, headers=server.auth())
    assert submitted.is_set()
    with trio.fail_after(10), pytest.raises(ServiceUnavailable):
        await await_future(held[0])  # raises once the server has cancelled the work
    assert held[0].cancelled()


@needs_infinity
async def test_model_routes(server: Any) -> None:
    async with server.client() as client:
        assert (await client.post("/v1/embeddings", json={"input": "x"})).status_code == 401
        card = (await client.get("/v1/model/embedding", headers=server.auth())).json()
        assert (card["id"], card["object"]) == (EMBEDDED_MODEL_NAME, "model")
        listed = await client.get("/v1/model/embedding/list", headers=server.auth())
        assert [m["id"] for m in listed.json()["data"]] == [EMBEDDED_MODEL_NAME]
        unload = await client.post("/v1/model/embedding/unload", headers=server.auth())
        assert unload.status_code == 403
        unload = await client.post("/v1/model/embedding/unload", headers=server.auth("admin"))
        assert unload.status_code == 200
        r = await client.post("/v1/embeddings", json={"input": "x"}, headers=server.auth())
        assert (r.status_code, r.json()["error"]["code"]) == (503, "embedding_model_not_loaded")
        assert (await client.get("/v1/model/embedding", headers=server.auth())).status_code == 503
        missing = await client.post(
            "/v1/model/embedding/load",
            json={"embedding_model_name": "nope"},
            headers=server.auth("admin"),
        )
        assert (missing.status_code, missing.json()["error"]["param"]) == (
            404,
            "embedding_model_name",
        )
        load = await client.post(
            "/v1/model/embedding/load",
            json={"embedding_model_name": EMBEDDED_MODEL_NAME, "embeddings_device": "cpu"},
            headers=server.auth("admin"),
        )
        assert load.json() == {
            "model_type": "embedding_model",
            "module": 1,
            "modules": 1,
            "status": "finished",
        }
        r = await client.post("/v1/embeddings", json={"input": "x"}, headers=server.auth())
        assert r.status_code == 200


WITHOUT_INFINITY = """
import json, sys
sys.modules["infinity_emb"] = None  # as if the embeddings extra were not installed
from pathlib import Path
import httpx, trio
from tabby.actors.embedder import embedder_from_config
from tabby.config import ModelConfigSection, NetworkConfig, TabbyConfig
from tabby.http import embeddings
from tabby.http.app import ROUTE_MODULES
from tabby.server import serve
from tabby.http.services import Services

async def main():
    config = TabbyConfig(
        network=NetworkConfig(host="127.0.0.1", port=0, disable_auth=True),
        model=ModelConfigSection(model_name=None),
        base_dir=Path(sys.argv[1]),
    )
    async with trio.open_nursery() as nursery:
        extra = []
        if not any(name == "tabby.http.embeddings" for name, _ in ROUTE_MODULES):
            handle = await nursery.start(embedder_from_config(config).run)
            services = Services(config=config, auth=None, health=None, embedder=handle)
            extra = [embeddings.blueprint(services)]
        info = await nursery.start(
            lambda task_status: serve(config, quiet=True, extra_blueprints=extra, task_status=task_status)
        )
        out = {}
        async with httpx.AsyncClient(base_url=info.urls[0]) as client:
            for method, path in [("POST", "/v1/embeddings"), ("GET", "/v1/model/embedding"),
                                 ("GET", "/v1/model/embedding/list"), ("GET", "/v1/auth/permission")]:
                r = await client.request(method, path, json={"input": "x"} if method == "POST" else None)
                out[path] = [r.status_code, r.json()]
        print(json.dumps(out))
        nursery.cancel_scope.cancel()

trio.run(main)
"""


def test_without_infinity_embeddings_answer_501(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_INFINITY, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for path in ("/v1/embeddings", "/v1/model/embedding", "/v1/model/embedding/list"):
        status, body = out[path]
        assert status == 501
        assert "infinity-emb" in body["error"]["message"]
    assert out["/v1/auth/permission"] == [200, {"permission": "admin"}]  # the rest works


async def test_embedding_models_stay_inside_their_folder(server: Any, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    models = tmp_path / server.config.embeddings.embedding_model_dir
    models.mkdir(exist_ok=True)
    (models / "escape").symlink_to(outside, target_is_directory=True)
    async with server.client(headers=server.auth("admin")) as client:
        listed = await client.get("/v1/model/embedding/list")
        load = await client.post(
            "/v1/model/embedding/load", json={"embedding_model_name": "escape"}
        )
    assert "escape" not in [m["id"] for m in listed.json()["data"]]
    assert load.status_code == 400
    assert load.json()["error"]["param"] == "embedding_model_name"
    assert "outside" in load.json()["error"]["message"]
