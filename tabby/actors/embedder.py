"""Embedder: the one owner of the embedding engine and its model.

An ``Embed`` is answered at once with the engine's future (or a refusal); the caller waits
for that future itself through :func:`tabby.backends.infinity.await_future`, so the actor
never waits on embedding work, concurrent requests reach the engine together (it batches
them), and a caller that is cancelled cancels its own work. Loads and unloads run in a
worker thread; messages sent meanwhile wait in the inbox, in order.
Nothing here touches the generation scheduler.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from tabby.actors.health import HealthHandle
from tabby.actors.mailbox import Mailbox, Reply, answer
from tabby.backends.infinity import (
    INSTALL_HINT,
    Embeddings,
    InfinityEngine,
    await_future,
    infinity_missing,
    list_embedding_models,
    resolve_embedding_model,
    to_embeddings,
)
from tabby.errors import NotImplementedFeature, ServiceUnavailable, TabbyError

if TYPE_CHECKING:
    from tabby.config import TabbyConfig

__all__ = [
    "Embed",
    "EmbedAccepted",
    "Embedder",
    "EmbedderHandle",
    "EmbedderStats",
    "EmbeddingModelLoaded",
    "GetEmbedderStats",
    "ListEmbeddingModels",
    "LoadEmbeddingModel",
    "UnloadEmbeddingModel",
    "embedder_from_config",
]

log = logging.getLogger(__name__)

# Requests wait here while a model loads; beyond this, callers queue on send().
INBOX_BUFFER = 64
HEALTH_SOURCE = "embedder"
EngineFactory = Callable[[str, Path, str], InfinityEngine]
_Future = concurrent.futures.Future[tuple[list[Any], int]]


# -- messages ---------------------------------------------------------------------------


@attrs.frozen
class Embed:
    texts: tuple[str, ...]
    reply: Reply[EmbedAccepted]


@attrs.frozen
class LoadEmbeddingModel:
    name: str
    device: str | None  # None: the configured device
    reply: Reply[EmbeddingModelLoaded]


@attrs.frozen
class UnloadEmbeddingModel:
    reply: Reply[EmbeddingModelLoaded]


@attrs.frozen
class GetEmbedderStats:
    reply: Reply[EmbedderStats]


@attrs.frozen
class ListEmbeddingModels:
    reply: Reply[tuple[str, ...]]


EmbedderMessage = (
    Embed | LoadEmbeddingModel | UnloadEmbeddingModel | GetEmbedderStats | ListEmbeddingModels
)


# -- replies ----------------------------------------------------------------------------


@attrs.frozen
class EmbedAccepted:
    """The engine took the texts; the vectors arrive through ``future``."""

    model: str
    future: _Future = attrs.field(eq=False)


@attrs.frozen
class EmbeddingModelLoaded:
    """Reply to load and unload: the model now serving (None after an unload)."""

    model: str | None


@attrs.frozen
class EmbedderStats:
    model: str | None
    device: str
    available: bool  # infinity-emb can be imported
    requests: int
    texts: int
    loads: int
    unloads: int
    refused: int  # embed requests answered with an error


# -- handle -----------------------------------------------------------------------------


@attrs.frozen
class EmbedderHandle:
    _mailbox: Mailbox[EmbedderMessage]

    async def embed(self, texts: Sequence[str]) -> tuple[str, Embeddings]:
        """Embed ``texts``; returns the model name and the vectors with token usage."""
        accepted = await self._mailbox.ask(partial(Embed, tuple(texts)))
        return accepted.model, to_embeddings(await await_future(accepted.future))

    async def load(self, name: str, device: str | None = None) -> str | None:
        loaded: EmbeddingModelLoaded = await self._mailbox.ask(
            partial(LoadEmbeddingModel, name, device)
        )
        return loaded.model

    async def unload(self) -> None:
        await self._mailbox.ask(UnloadEmbeddingModel)

    async def statistics(self) -> EmbedderStats:
        return await self._mailbox.ask(GetEmbedderStats)

    async def list_models(self) -> tuple[str, ...]:
        return await self._mailbox.ask(ListEmbeddingModels)


# -- actor ------------------------------------------------------------------------------


class Embedder:
    """Loads ``model_name`` (if any), reports ready, then serves its inbox."""

    def __init__(
        self,
        *,
        model_dir: Path,
        model_name: str | None,
        device: str = "cpu",
        engine_factory: EngineFactory = InfinityEngine.load,
        health: HealthHandle | None = None,
    ) -> None:
        self._health = health
        self._model_dir = model_dir
        self._startup_model = model_name
        self._device = device
        self._factory = engine_factory
        self._engine: InfinityEngine | None = None
        # Futures handed out and maybe still running: cancelled when their model goes.
        self._issued: list[_Future] = []
        self._requests = self._texts = self._loads = self._unloads = self._refused = 0
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[EmbedderMessage](
            INBOX_BUFFER
        )

    @property
    def handle(self) -> EmbedderHandle:
        return EmbedderHandle(Mailbox(self._inbox_send, "embedder"))

    def statistics(self) -> EmbedderStats:
        engine = self._engine
        return EmbedderStats(
            model=engine.name if engine else None,
            device=engine.device if engine else self._device,
            available=not infinity_missing(),
            requests=self._requests,
            texts=self._texts,
            loads=self._loads,
            unloads=self._unloads,
            refused=self._refused,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[EmbedderHandle] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with self._inbox_receive:
            try:
                # Loaded before reporting ready: /v1/embeddings works as soon as the server
                # listens, and the (thread-unsafe) first import of transformers does not
                # overlap with actors that start after this one.
                if self._startup_model:
                    await self._startup_load(self._startup_model)
                task_status.started(self.handle)
                async for message in self._inbox_receive:
                    await self._handle(message)
            finally:
                with trio.CancelScope(shield=True):
                    await self._drop_engine()

    async def _startup_load(self, name: str) -> None:
        if infinity_missing():
            log.info("embeddings disabled: %s", INSTALL_HINT)
            return
        try:
            await self._load(name, self._device)
        except TabbyError as error:
            # The rest of the server works without embeddings; the error stays visible
            # in the log, on /health until a model loads, and in the embeddings 503s.
            log.error("embedding model %r not loaded: %s", name, error.message)
            if self._health is not None:
                problem = f"embedding model {name!r} not loaded: {error.message}"
                self._health.report(HEALTH_SOURCE, "startup", problem)

    async def _handle(self, message: EmbedderMessage) -> None:
        if isinstance(message, Embed):
            try:
                accepted = self._embed(message.texts)
            except TabbyError as error:
                self._refused += 1
                answer(message.reply, error=error)
                return
            if not answer(message.reply, accepted):
                accepted.future.cancel()  # the asker was cancelled before it got the future
        elif isinstance(message, LoadEmbeddingModel):
            try:
                await self._load(message.name, message.device or self._device)
            except TabbyError as error:
                answer(message.reply, error=error)
            else:
                answer(message.reply, EmbeddingModelLoaded(message.name))
        elif isinstance(message, UnloadEmbeddingModel):
            if self._engine is None:
                answer(message.reply, error=_not_loaded())
            else:
                await self._drop_engine()
                self._unloads += 1
                answer(message.reply, EmbeddingModelLoaded(None))
        elif isinstance(message, GetEmbedderStats):
            answer(message.reply, self.statistics())
        elif infinity_missing():
            answer(message.reply, error=_unavailable())
        else:
            answer(message.reply, list_embedding_models(self._model_dir))

    def _embed(self, texts: tuple[str, ...]) -> EmbedAccepted:
        if self._engine is None:
            raise _unavailable() if infinity_missing() else _not_loaded()
        self._issued = [f for f in self._issued if not f.done()]
        future = self._engine.submit(list(texts))
        self._issued.append(future)
        self._requests += 1
        self._texts += len(texts)
        return EmbedAccepted(self._engine.name, future)

    async def _load(self, name: str, device: str) -> None:
        if infinity_missing():
            raise _unavailable()
        path = resolve_embedding_model(name, self._model_dir)
        await self._drop_engine()
        log.info("loading embedding model %s from %s on %s", name, path, device)
        self._engine = await trio.to_thread.run_sync(self._factory, name, path, device)
        self._loads += 1
        if self._health is not None:
            self._health.clear(HEALTH_SOURCE, "startup")

    async def _drop_engine(self) -> None:
        engine, self._engine = self._engine, None
        for future in self._issued:
            future.cancel()
        self._issued = []
        if engine is not None:
            await trio.to_thread.run_sync(engine.close)
            log.info("embedding model %s unloaded", engine.name)


def embedder_from_config(config: TabbyConfig, health: HealthHandle | None = None) -> Embedder:
    """The Embedder for ``config``'s ``[embeddings]`` table."""
    section = config.embeddings
    return Embedder(
        model_dir=config.resolve(section.embedding_model_dir),
        model_name=section.embedding_model_name,
        device=section.embeddings_device,
        health=health,
    )


def _unavailable() -> NotImplementedFeature:
    return NotImplementedFeature(INSTALL_HINT, code="embeddings_unavailable")


def _not_loaded() -> ServiceUnavailable:
    return ServiceUnavailable(
        "no embedding model is loaded (POST /v1/model/embedding/load)",
        code="embedding_model_not_loaded",
    )
