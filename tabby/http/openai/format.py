"""The OpenAI wire shapes of a generation: chunks, whole answers, usage and logprobs.

Rendered from the neutral event stream of :mod:`tabby.serving.generate`:

* streaming: SSE chunks in OpenAI's exact shapes. Chat: per choice a first delta with
  ``role: "assistant"``, text deltas (``delta.reasoning_content`` for the reasoning
  split off), a last chunk with ``finish_reason`` (and ``stop_str``; the tool calls
  come whole in one ``delta.tool_calls``, each item with its ``index``); then, with
  ``stream_options.include_usage``, a usage chunk with ``choices: []``; then
  ``data: [DONE]``. Completions: ``text_completion`` chunks with ``text``, the same
  ending.
* non-streaming: one body with every choice and ``usage`` (always present).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import attrs

from tabby.errors import GenerationFailed
from tabby.http.openai.responses import (
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    PromptTokensDetails,
    TopLogprob,
    Usage,
    dump,
)
from tabby.http.sse import SSEItem
from tabby.jobs import Tokenizer, TokenLogprob
from tabby.serving.generate import (
    ChoiceFinished,
    ChoiceResult,
    ChoiceText,
    GenerationEvent,
    GenerationResult,
)
from tabby.serving.generate import Usage as UsageEvent
from tabby.serving.usage import UsageStats

__all__ = [
    "DONE",
    "Answer",
    "TextChunkEncoder",
    "chat_chunks",
    "chat_logprobs",
    "chat_response",
    "completion_chunks",
    "completion_logprobs",
    "completion_response",
    "usage_body",
]

DONE = "[DONE]"

Events = AsyncIterator[GenerationEvent]


@attrs.frozen
class Answer:
    """What one request's answer needs besides the events."""

    id: str  # the response id: cmpl-<request id> or chatcmpl-<request id>
    created: int
    model: str
    choices: int
    tokenizer: Tokenizer = attrs.field(eq=False)
    include_usage: bool = False
    logprobs: bool = False


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


def usage_body(stats: UsageStats) -> Usage:
    return Usage(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        total_tokens=stats.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=stats.cached_tokens),
        queue_time=stats.queue_time,
        prompt_time=stats.prompt_time,
        prompt_tokens_per_sec=stats.prompt_tokens_per_sec,
        completion_time=stats.completion_time,
        completion_tokens_per_sec=stats.completion_tokens_per_sec,
        total_time=stats.total_time,
    )


def _bytes_of(tokenizer: Tokenizer) -> Callable[[int, str], list[int]]:
    """Token id → its exact bytes, where the tokenizer can tell (pieces escape bad UTF-8)."""
    exact = getattr(tokenizer, "token_bytes", None)

    def lookup(token_id: int, piece: str) -> list[int]:
        if exact is not None:
            return list(exact(token_id))
        return list(piece.encode("utf-8", errors="replace"))

    return lookup


def chat_logprobs(logprobs: Sequence[TokenLogprob], tokenizer: Tokenizer) -> ChatLogprobs:
    """The chat shape: ``{content: [{token, logprob, bytes, top_logprobs}]}``."""
    to_bytes = _bytes_of(tokenizer)
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=to_bytes(lp.token_id, lp.token),
                top_logprobs=[
                    TopLogprob(token=piece, logprob=value, bytes=to_bytes(token_id, piece))
                    for token_id, piece, value in lp.top
                ],
            )
            for lp in logprobs
        ]
    )


def completion_logprobs(logprobs: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
    """The legacy completions shape; ``offset`` is where the first token's text starts."""
    tokens: list[str] = []
    values: list[float] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for lp in logprobs:
        tokens.append(lp.token)
        values.append(lp.logprob)
        tops.append({piece: value for _id, piece, value in lp.top} if lp.top else None)
        offsets.append(offset)
        offset += len(lp.token)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )


def _finished(choice: ChoiceResult) -> ChoiceFinished:
    if choice.finished is None:
        raise GenerationFailed("a generation job ended without finishing")
    return choice.finished


# -- completions ------------------------------------------------------------------------


async def completion_chunks(answer: Answer, events: Events) -> AsyncIterator[SSEItem]:
    rid, created, model = answer.id, answer.created, answer.model

    def chunk(choice: CompletionChoice) -> dict[str, Any]:
        out: dict[str, Any] = dump(CompletionChunk(rid, created, model, [choice]))
        return out

    text_chunk = TextChunkEncoder(
        lambda index, text: CompletionChunk(
            rid, created, model, [CompletionChoice(index, text, None)]
        )
    )
    async for event in events:
        if isinstance(event, ChoiceText):
            text = event.content or ""
            if answer.logprobs and (text or event.logprobs):
                lp = completion_logprobs(event.logprobs, event.offset)
                yield chunk(CompletionChoice(event.index, text, None, logprobs=lp))
            elif text:
                yield text_chunk(event.index, text)
        elif isinstance(event, ChoiceFinished):
            yield chunk(
                CompletionChoice(event.index, "", event.finish_reason, stop_str=event.stop_str)
            )
        elif isinstance(event, UsageEvent) and answer.include_usage:
            usage = usage_body(event.stats)
            yield dump(CompletionChunk(rid, created, model, [], usage=usage))
    yield DONE


def completion_response(answer: Answer, result: GenerationResult) -> dict[str, Any]:
    choices = [
        CompletionChoice(
            index=choice.index,
            text=choice.text,
            finish_reason=_finished(choice).finish_reason,
            stop_str=_finished(choice).stop_str,
            logprobs=completion_logprobs(choice.logprobs) if answer.logprobs else None,
        )
        for choice in result.choices
    ]
    usage = usage_body(result.usage)
    body: dict[str, Any] = dump(
        CompletionResponse(answer.id, answer.created, answer.model, choices, usage)
    )
    return body


# -- chat -------------------------------------------------------------------------------


async def chat_chunks(answer: Answer, events: Events) -> AsyncIterator[SSEItem]:
    rid, created, model = answer.id, answer.created, answer.model

    def chunk(choice: ChatChunkChoice) -> dict[str, Any]:
        out: dict[str, Any] = dump(ChatChunk(rid, created, model, [choice]))
        return out

    text_chunk = TextChunkEncoder(
        lambda index, text: ChatChunk(
            rid, created, model, [ChatChunkChoice(index, ChatDelta(content=text))]
        )
    )
    for index in range(answer.choices):
        yield chunk(ChatChunkChoice(index, ChatDelta(role="assistant", content="")))
    async for event in events:
        if isinstance(event, ChoiceText):
            lp = None
            if answer.logprobs and event.logprobs:
                lp = chat_logprobs(event.logprobs, answer.tokenizer)
            if lp is None and event.reasoning is None:
                if event.content:
                    yield text_chunk(event.index, event.content)
                continue
            delta = ChatDelta(content=event.content, reasoning_content=event.reasoning)
            yield chunk(ChatChunkChoice(event.index, delta, logprobs=lp))
        elif isinstance(event, ChoiceFinished):
            calls = [call.delta(i) for i, call in enumerate(event.tool_calls)] or None
            yield chunk(
                ChatChunkChoice(
                    event.index,
                    ChatDelta(tool_calls=calls),
                    event.finish_reason,
                    stop_str=event.stop_str,
                )
            )
        elif isinstance(event, UsageEvent) and answer.include_usage:
            usage = usage_body(event.stats)
            yield dump(ChatChunk(rid, created, model, [], usage=usage))
    yield DONE


def chat_response(answer: Answer, result: GenerationResult) -> dict[str, Any]:
    choices: list[ChatChoice] = []
    for choice in result.choices:
        finished = _finished(choice)
        calls = [call.to_dict() for call in choice.tool_calls] or None
        message = ChatResponseMessage(
            content=choice.content, reasoning_content=choice.reasoning, tool_calls=calls
        )
        logprobs = chat_logprobs(choice.logprobs, answer.tokenizer) if answer.logprobs else None
        choices.append(
            ChatChoice(
                index=choice.index,
                message=message,
                finish_reason=finished.finish_reason,
                stop_str=finished.stop_str,
                logprobs=logprobs,
            )
        )
    usage = usage_body(result.usage)
    body: dict[str, Any] = dump(
        ChatCompletionResponse(answer.id, answer.created, answer.model, choices, usage)
    )
    return body
