"""``POST /v1/completions`` and ``POST /v1/chat/completions`` (auth: api).

Each request: validate (preset first, see ``tabby.serving.planning``), plan the jobs, submit
them all (errors such as ``context_length_exceeded`` or a full queue are plain HTTP
errors, before any stream starts), then answer:

* non-streaming: one JSON body with every choice and ``usage`` (always present);
* streaming: SSE chunks in OpenAI's exact shapes. Chat: per choice a first delta with
  ``role: "assistant"``, text deltas, a last chunk with ``finish_reason`` (and
  ``stop_str``); then, with ``stream_options.include_usage``, a usage chunk with
  ``choices: []``; then ``data: [DONE]``. Completions: ``text_completion`` chunks with
  ``text``, the same ending. An error during the stream is one SSE error event and the
  end of the stream (``tabby.http.sse``).

Chat answers are shaped per choice by ``tabby.serving.tool_flow`` (modes in
``tabby.serving.chat_options``): ``reasoning_content`` split from ``content`` (streamed as
``delta.reasoning_content``), and tool calls as ``message.tool_calls`` with
``finish_reason: "tool_calls"``; streamed, the calls come whole in one last
``delta.tool_calls`` chunk (each item with its ``index``). A choice that stops on the
template's ``tool_start`` gets its constrained second pass before that chunk.

A client that disconnects cancels the handler (non-streaming) or the stream body
(streaming); either way every job's channel closes and the scheduler cancels the jobs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import quart
import trio

from tabby.errors import GenerationFailed
from tabby.http.auth import Permission, require
from tabby.http.body import read_json
from tabby.http.context import request_id
from tabby.http.openai.requests import ChatCompletionRequest, CompletionRequest
from tabby.http.openai.responses import (
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletionResponse,
    ChatDelta,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    Usage,
    dump,
)
from tabby.http.openapi import Route
from tabby.http.services import Services
from tabby.http.sse import SSEItem, sse_response
from tabby.jobs.events import Finished, TextChunk
from tabby.serving.planning import (
    GenerationPlan,
    plan_chat,
    plan_completion,
    serving_state_for,
    structure_request,
)
from tabby.serving.reasoning import ReasoningPart
from tabby.serving.running import ChoiceAccumulator, ChoiceEvent, RunningGeneration, submit_all
from tabby.serving.state import ServingState
from tabby.serving.tool_flow import ChoiceOutput, run_tool_pass
from tabby.serving.usage import (
    chat_logprobs,
    completion_logprobs,
    log_metrics,
    log_request,
    make_usage,
)

__all__ = ["ROUTES", "TextChunkEncoder", "blueprint"]

log = logging.getLogger(__name__)

DONE = "[DONE]"

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

Events = AsyncIterator[ChoiceEvent]


class TextChunkEncoder:
    """The JSON of a text chunk, pre-rendered around the one field that changes.

    Streams send one chunk per token; rendering the constant parts once per choice
    keeps the per-token cost to one ``json.dumps`` of the new text.
    """

    _MARK = "\x00text\x00"

    def __init__(self, render: Callable[[int, str], Any]) -> None:
        self._render = render  # (choice index, text) -> the chunk object
        self._parts: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        parts = self._parts.get(index)
        if parts is None:
            whole = json.dumps(dump(self._render(index, self._MARK)), ensure_ascii=False)
            head, tail = whole.split(json.dumps(self._MARK))
            parts = self._parts[index] = (head, tail)
        return parts[0] + json.dumps(text, ensure_ascii=False) + parts[1]


@attrs.frozen
class _Context:
    """What one request's answer needs besides the events."""

    plan: GenerationPlan
    stream: bool
    include_usage: bool
    logprobs: bool
    started: float
    created: int

    def usage_of(self, choices: list[ChoiceAccumulator]) -> Usage:
        return make_usage(self.plan, choices, time.perf_counter() - self.started)


def _finished(acc: ChoiceAccumulator) -> Finished:
    if acc.finished is None:
        raise GenerationFailed("a generation job ended without finishing")
    return acc.finished


async def _collect(running: RunningGeneration, count: int) -> list[ChoiceAccumulator]:
    choices = [ChoiceAccumulator(i) for i in range(count)]
    async with running as events:
        async for item in events:
            choices[item.index].add(item.event)
    return choices


# -- completions ------------------------------------------------------------------------


async def _completion_events(ctx: _Context, events: Events) -> AsyncIterator[SSEItem]:
    plan = ctx.plan
    rid, model = f"cmpl-{plan.request_id}", plan.model_name
    choices = [ChoiceAccumulator(i) for i in range(len(plan.jobs))]

    def chunk(choice: CompletionChoice) -> dict[str, Any]:
        out: dict[str, Any] = dump(CompletionChunk(rid, ctx.created, model, [choice]))
        return out

    text_chunk = TextChunkEncoder(
        lambda index, text: CompletionChunk(
            rid, ctx.created, model, [CompletionChoice(index, text, None)]
        )
    )

    async for item in events:
        acc, event = choices[item.index], item.event
        offset = acc.length
        acc.add(event)
        if isinstance(event, TextChunk):
            if ctx.logprobs and (event.text or event.logprobs):
                lp = completion_logprobs(event.logprobs, offset)
                yield chunk(CompletionChoice(item.index, event.text, None, logprobs=lp))
            elif event.text:
                yield text_chunk(item.index, event.text)
        elif isinstance(event, Finished):
            yield chunk(
                CompletionChoice(item.index, "", event.finish_reason, stop_str=event.stop_str)
            )
    usage = ctx.usage_of(choices)
    if ctx.include_usage:
        yield dump(CompletionChunk(rid, ctx.created, model, [], usage=usage))
    log_metrics(plan, usage, endpoint="completion")
    yield DONE


def _completion_response(ctx: _Context, choices: list[ChoiceAccumulator]) -> dict[str, Any]:
    plan = ctx.plan
    usage = ctx.usage_of(choices)
    log_metrics(plan, usage, endpoint="completion")
    out = [
        CompletionChoice(
            index=acc.index,
            text=acc.text,
            finish_reason=_finished(acc).finish_reason,
            stop_str=_finished(acc).stop_str,
            logprobs=completion_logprobs(acc.logprobs) if ctx.logprobs else None,
        )
        for acc in choices
    ]
    body: dict[str, Any] = dump(
        CompletionResponse(f"cmpl-{plan.request_id}", ctx.created, plan.model_name, out, usage)
    )
    return body


# -- chat -------------------------------------------------------------------------------


def _with_extra_tokens(usage: Usage, outputs: list[ChoiceOutput]) -> Usage:
    """Usage with the tokens of second (tool) passes added."""
    extra = sum(out.extra_tokens for out in outputs)
    if not extra:
        return usage
    return attrs.evolve(
        usage,
        completion_tokens=usage.completion_tokens + extra,
        total_tokens=usage.total_tokens + extra,
    )


def _delta(part: ReasoningPart) -> ChatDelta | None:
    if not part.reasoning and not part.content:
        return None
    return ChatDelta(content=part.content or None, reasoning_content=part.reasoning or None)


async def _chat_events(ctx: _Context, services: Services, events: Events) -> AsyncIterator[SSEItem]:
    plan = ctx.plan
    rid, model = f"chatcmpl-{plan.request_id}", plan.model_name
    choices = [ChoiceAccumulator(i) for i in range(len(plan.jobs))]
    outputs = [ChoiceOutput(plan.chat) for _ in plan.jobs]
    plain = plan.chat is None or plan.chat.plain

    def chunk(choice: ChatChunkChoice) -> dict[str, Any]:
        out: dict[str, Any] = dump(ChatChunk(rid, ctx.created, model, [choice]))
        return out

    text_chunk = TextChunkEncoder(
        lambda index, text: ChatChunk(
            rid, ctx.created, model, [ChatChunkChoice(index, ChatDelta(content=text))]
        )
    )

    for acc in choices:
        yield chunk(ChatChunkChoice(acc.index, ChatDelta(role="assistant", content="")))
    async for item in events:
        acc, event, out = choices[item.index], item.event, outputs[item.index]
        acc.add(event)
        if isinstance(event, TextChunk):
            lp = None
            if ctx.logprobs and event.logprobs:
                lp = chat_logprobs(event.logprobs, plan.tokenizer)
            if plain and lp is None:
                if event.text:
                    yield text_chunk(item.index, event.text)
                continue
            delta = _delta(out.feed(event.text)) if not plain else ChatDelta(content=event.text)
            if delta is not None or lp is not None:
                yield chunk(ChatChunkChoice(item.index, delta or ChatDelta(), logprobs=lp))
        elif isinstance(event, Finished):
            if out.wants_tool_pass(event):
                await run_tool_pass(plan, item.index, out)
            delta = _delta(out.finish())
            if delta is not None:
                yield chunk(ChatChunkChoice(item.index, delta))
            calls = [call.delta(i) for i, call in enumerate(out.calls)] or None
            yield chunk(
                ChatChunkChoice(
                    item.index,
                    ChatDelta(tool_calls=calls),
                    out.finish_reason(event),
                    stop_str=None if calls else event.stop_str,
                )
            )
    usage = _with_extra_tokens(ctx.usage_of(choices), outputs)
    if ctx.include_usage:
        yield dump(ChatChunk(rid, ctx.created, model, [], usage=usage))
    log_metrics(plan, usage, endpoint="chat")
    yield DONE


async def _chat_response(
    ctx: _Context, services: Services, choices: list[ChoiceAccumulator]
) -> dict[str, Any]:
    plan = ctx.plan
    outputs: list[ChoiceOutput] = []
    out_choices: list[ChatChoice] = []
    for acc in choices:
        finished = _finished(acc)
        out = ChoiceOutput(plan.chat)
        out.feed(acc.text)
        if out.wants_tool_pass(finished):
            await run_tool_pass(plan, acc.index, out)
        out.finish()
        outputs.append(out)
        calls = [call.to_dict() for call in out.calls] or None
        message = ChatResponseMessage(
            content=out.message_content(),
            reasoning_content=out.message_reasoning(),
            tool_calls=calls,
        )
        out_choices.append(
            ChatChoice(
                index=acc.index,
                message=message,
                finish_reason=out.finish_reason(finished),
                stop_str=None if calls else finished.stop_str,
                logprobs=chat_logprobs(acc.logprobs, plan.tokenizer) if ctx.logprobs else None,
            )
        )
    usage = _with_extra_tokens(ctx.usage_of(choices), outputs)
    log_metrics(plan, usage, endpoint="chat")
    body: dict[str, Any] = dump(
        ChatCompletionResponse(
            f"chatcmpl-{plan.request_id}", ctx.created, plan.model_name, out_choices, usage
        )
    )
    return body


# -- shared -----------------------------------------------------------------------------


def _stream_body(
    running: RunningGeneration, make: Callable[[Events], AsyncIterator[SSEItem]]
) -> AbstractAsyncContextManager[AsyncIterator[SSEItem]]:
    """The SSE body: entered by the response as it starts, so the job streams' nursery
    lives in the sending task (see ``tabby.http.sse``)."""

    @asynccontextmanager
    async def body() -> AsyncIterator[AsyncIterator[SSEItem]]:
        async with running as events:
            yield make(events)

    return body()


def _preset_state(services: Services) -> ServingState:
    models = services.models
    return models.serving_state() if models is not None else ServingState()


def blueprint(services: Services) -> quart.Blueprint:
    bp = quart.Blueprint("openai", __name__)
    config = services.config

    async def start(
        cls: type[CompletionRequest] | type[ChatCompletionRequest],
    ) -> tuple[Any, _Context, RunningGeneration]:
        permission = await require(Permission.API)
        raw = await read_json()
        request = structure_request(raw, cls, _preset_state(services))
        state = await serving_state_for(services, request, permission)
        rid = request_id()
        # Planning may compile constraints (and, once per model, the constraint
        # tokenizer): off the event loop.
        if isinstance(request, ChatCompletionRequest):
            plan = await trio.to_thread.run_sync(plan_chat, request, state, rid)
        else:
            plan = await trio.to_thread.run_sync(plan_completion, request, state, rid)
        log_request(services.config.logging, plan, request)
        ctx = _Context(
            plan=plan,
            stream=request.stream and not config.developer.disable_request_streaming,
            include_usage=request.include_usage,
            logprobs=bool(request.logprobs),
            started=time.perf_counter(),
            created=int(time.time()),
        )
        running = await submit_all(plan)
        return request, ctx, running

    @bp.post("/v1/completions")
    async def completions() -> Any:
        _request, ctx, running = await start(CompletionRequest)
        if ctx.stream:
            return sse_response(_stream_body(running, lambda ev: _completion_events(ctx, ev)))
        return _completion_response(ctx, await _collect(running, running.jobs))

    @bp.post("/v1/chat/completions")
    async def chat_completions() -> Any:
        _request, ctx, running = await start(ChatCompletionRequest)
        if ctx.stream:
            return sse_response(_stream_body(running, lambda ev: _chat_events(ctx, services, ev)))
        return await _chat_response(ctx, services, await _collect(running, running.jobs))

    return bp
