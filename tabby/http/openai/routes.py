"""``POST /v1/completions`` and ``POST /v1/chat/completions`` (auth: api).

Each request: validate the body (the active sampler preset first, see
``tabby.http.body``), map it onto the neutral request, let the serving core plan and
submit it (errors such as ``context_length_exceeded`` or a full queue are plain HTTP
errors, before any stream starts), then render its event stream in OpenAI's shapes
(``tabby.http.openai.format``): one JSON body, or SSE chunks. An error during the
stream is one SSE error event and the end of the stream (``tabby.http.sse``).

A request that arrives while a model loads waits for it (``serving.generate``); a
streaming one gets its stream at once, with ``: loading`` comments until the generation
starts (``tabby.http.waiting``).

A client that disconnects cancels the handler (non-streaming) or the stream body
(streaming); either way every job's channel closes and the scheduler cancels the jobs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import quart

from tabby.http.auth import Permission, require
from tabby.http.body import read_json, structure_request
from tabby.http.context import request_id
from tabby.http.openai.format import (
    Answer,
    chat_chunks,
    chat_response,
    completion_chunks,
    completion_response,
)
from tabby.http.openai.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_request,
    completion_request,
)
from tabby.http.openai.responses import (
    ChatChunk,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionResponse,
)
from tabby.http.openapi import Route
from tabby.http.services import Services
from tabby.http.sse import SSEItem, sse_response
from tabby.http.waiting import Handoff, while_loading
from tabby.serving.generate import Generation, GenerationEvent, GenerationService
from tabby.serving.requests import ChatRequest
from tabby.serving.requests import CompletionRequest as NeutralCompletion

__all__ = ["ROUTES", "blueprint"]

ROUTES = (
    Route(
        "POST", "/v1/completions", request=CompletionRequest, response=CompletionResponse,
        stream=CompletionChunk, auth="api", tag="OpenAI",
        doc="Complete a prompt (a list of prompts is a batch, n choices each).\n"
        "With stream: true, server-sent events of chunks, then data: [DONE].",
    ),
    Route(
        "POST", "/v1/chat/completions", request=ChatCompletionRequest,
        response=ChatCompletionResponse, stream=ChatChunk, auth="api", tag="OpenAI",
        doc="Answer a conversation, rendered with the model's chat template.\n"
        "With stream: true, server-sent events of chunks, then data: [DONE].",
    ),
)  # fmt: skip

Render = Callable[[Answer, AsyncIterator[GenerationEvent]], AsyncIterator[SSEItem]]


def _stream_body(
    generation: Generation, answer: Answer, render: Render
) -> AbstractAsyncContextManager[AsyncIterator[SSEItem]]:
    """The SSE body: entered by the response as it starts, so the job streams' nursery
    lives in the sending task (see ``tabby.http.sse``)."""

    @asynccontextmanager
    async def body() -> AsyncIterator[AsyncIterator[SSEItem]]:
        async with generation.stream() as events:
            yield render(answer, events)

    return body()


Body = CompletionRequest | ChatCompletionRequest


def blueprint(services: Services) -> quart.Blueprint:
    bp = quart.Blueprint("openai", __name__)
    config = services.config
    serving = GenerationService(services.models, config)

    async def receive(cls: type[Body]) -> tuple[Permission, Body, ChatRequest | NeutralCompletion]:
        permission = await require(Permission.API)
        raw = await read_json()
        body = structure_request(raw, cls, serving.current_state().preset)
        if isinstance(body, ChatCompletionRequest):
            return permission, body, chat_request(body)
        return permission, body, completion_request(body)

    async def begin(
        permission: Permission,
        body: Body,
        request: ChatRequest | NeutralCompletion,
        rid: str,
        prefix: str,
        label: str,
    ) -> tuple[Generation, Answer]:
        generation = await serving.prepare(request, permission, rid, label=label)
        plan = generation.plan
        answer = Answer(
            id=f"{prefix}-{rid}",
            created=int(time.time()),
            model=plan.model_name,
            choices=len(plan.jobs),
            tokenizer=plan.tokenizer,
            include_usage=body.include_usage,
            logprobs=bool(body.logprobs),
        )
        await generation.submit()
        return generation, answer

    async def respond(cls: type[Body], prefix: str, label: str, render: Render) -> Any:
        permission, body, request = await receive(cls)
        rid = request_id()
        stream = body.stream and not config.developer.disable_request_streaming
        if stream and serving.switching():

            async def produce(send: Handoff) -> None:
                generation, answer = await begin(permission, body, request, rid, prefix, label)
                async with generation.stream() as events:
                    async for item in render(answer, events):
                        await send.send(item)

            return sse_response(while_loading(produce))
        generation, answer = await begin(permission, body, request, rid, prefix, label)
        if stream:
            return sse_response(_stream_body(generation, answer, render))
        if isinstance(body, ChatCompletionRequest):
            return chat_response(answer, await generation.collect())
        return completion_response(answer, await generation.collect())

    @bp.post("/v1/completions")
    async def completions() -> Any:
        return await respond(CompletionRequest, "cmpl", "completion", completion_chunks)

    @bp.post("/v1/chat/completions")
    async def chat_completions() -> Any:
        return await respond(ChatCompletionRequest, "chatcmpl", "chat", chat_chunks)

    return bp
