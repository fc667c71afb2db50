"""Embeddings routes: ``POST /v1/embeddings`` and the embedding-model admin routes.

Responses follow OpenAI's shape; ``usage.prompt_tokens`` counts tokens of the embedding
model's tokenizer. A client that leaves cancels its embedding work (the handler is
cancelled, and with it the engine's future). Without infinity-emb every route here
answers 501 with the install hint.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any, Literal

import attrs
import numpy as np
import quart

from tabby.errors import InvalidRequest, NotImplementedFeature, ServiceUnavailable
from tabby.http.auth import Permission, require
from tabby.http.body import parse_body
from tabby.http.services import Services

if TYPE_CHECKING:
    from tabby.actors.embedder import EmbedderHandle, EmbedderStats

__all__ = ["EmbeddingModelLoadRequest", "EmbeddingsRequest", "blueprint", "encode_vector"]

OWNED_BY = "tabby"


@attrs.frozen
class EmbeddingsRequest:
    input: str | list[str] = attrs.field(metadata={"doc": "A text or a list of texts."})
    encoding_format: Literal["float", "base64"] = attrs.field(
        default="float", metadata={"doc": "float: JSON numbers; base64: little-endian float32."}
    )
    model: str | None = attrs.field(
        default=None, metadata={"doc": "Ignored: the loaded model answers."}
    )


@attrs.frozen
class EmbeddingModelLoadRequest:
    embedding_model_name: str = attrs.field(
        metadata={"aliases": ("name",), "doc": "Folder inside embedding_model_dir."}
    )
    embeddings_device: Literal["cpu", "auto", "cuda"] | None = attrs.field(
        default=None, metadata={"doc": "Device; the configured one when absent."}
    )


def encode_vector(vector: np.ndarray[Any, Any], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    values: list[float] = vector.astype(np.float32).tolist()
    return values


def texts_of(body: EmbeddingsRequest, max_batch: int) -> list[str]:
    """The texts to embed, or a 400 naming ``input``."""
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts:
        raise InvalidRequest("input must not be empty", param="input")
    for i, text in enumerate(texts):
        if not text:
            where = "input" if isinstance(body.input, str) else f"input[{i}]"
            raise InvalidRequest(f"{where} is an empty string", param=where)
    if len(texts) > max_batch:
        raise InvalidRequest(
            f"input has {len(texts)} texts; at most {max_batch} ([embeddings] max_batch)",
            param="input",
        )
    return texts


def _card(name: str, created: int, status: EmbedderStats | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}
    if status is not None:
        card["parameters"] = {"device": status.device, "requests": status.requests}
    return card


def blueprint(services: Services) -> quart.Blueprint:
    bp = quart.Blueprint("embeddings", __name__)
    max_batch = services.config.embeddings.max_batch
    started = int(time.time())

    def embedder() -> EmbedderHandle:
        handle: EmbedderHandle | None = services.embedder
        if handle is None:
            raise NotImplementedFeature(
                "embeddings are not enabled on this server", code="embeddings_unavailable"
            )
        return handle

    async def loaded() -> EmbedderStats:
        status = await embedder().statistics()
        if not status.available:
            raise NotImplementedFeature(
                "embeddings need infinity-emb: pip install 'tabby[embeddings]'",
                code="embeddings_unavailable",
            )
        return status

    @bp.post("/v1/embeddings")
    async def embeddings() -> dict[str, Any]:
        await require(Permission.API)
        body = await parse_body(EmbeddingsRequest)
        texts = texts_of(body, max_batch)
        model, result = await embedder().embed(texts)
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, body.encoding_format)}
            for i, v in enumerate(result.vectors)
        ]
        tokens = result.prompt_tokens
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
        }

    @bp.get("/v1/model/embedding")
    async def current() -> dict[str, Any]:
        await require(Permission.API)
        status = await loaded()
        if status.model is None:
            raise ServiceUnavailable(
                "no embedding model is loaded", code="embedding_model_not_loaded"
            )
        return _card(status.model, started, status)

    @bp.get("/v1/model/embedding/list")
    async def listing() -> dict[str, Any]:
        permission = await require(Permission.API)
        if permission.grants(Permission.ADMIN):
            names: tuple[str, ...] = await embedder().list_models()
        else:
            status = await loaded()
            names = (status.model,) if status.model else ()
        return {"object": "list", "data": [_card(n, started) for n in names]}

    @bp.post("/v1/model/embedding/load")
    async def load() -> dict[str, Any]:
        await require(Permission.ADMIN)
        body = await parse_body(EmbeddingModelLoadRequest)
        await embedder().load(body.embedding_model_name, body.embeddings_device)
        return {"model_type": "embedding_model", "module": 1, "modules": 1, "status": "finished"}

    @bp.post("/v1/model/embedding/unload")
    async def unload() -> dict[str, Any]:
        await require(Permission.ADMIN)
        await embedder().unload()
        return {"status": "unloaded"}

    return bp
