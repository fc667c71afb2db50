"""Response bodies and stream chunks of the OpenAI generation endpoints.

They are attrs classes (the OpenAPI document is generated from them) turned into JSON
with :func:`dump`. Fields marked ``omit_none`` are left out instead of sent as null,
where OpenAI's own wire format leaves them out (e.g. ``delta.role`` after the first
chunk).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

__all__ = [
    "ChatChoice",
    "ChatChunk",
    "ChatChunkChoice",
    "ChatCompletionResponse",
    "ChatDelta",
    "ChatLogprobs",
    "ChatResponseMessage",
    "ChatTokenLogprob",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionResponse",
    "PromptTokensDetails",
    "TopLogprob",
    "Usage",
    "dump",
]


def _doc(text: str, *, omit_none: bool = False) -> dict[str, Any]:
    return {"doc": text, "omit_none": omit_none}


def dump(value: Any) -> Any:
    """JSON-ready data of a response object (dicts, lists and scalars pass through)."""
    if attrs.has(type(value)):
        out: dict[str, Any] = {}
        for field in attrs.fields(type(value)):
            item = getattr(value, field.name)
            if item is None and field.metadata.get("omit_none"):
                continue
            out[field.name] = dump(item)
        return out
    if isinstance(value, list | tuple):
        return [dump(v) for v in value]
    if isinstance(value, dict):
        return {k: dump(v) for k, v in value.items()}
    return value


FinishReasonField = Literal["stop", "length", "tool_calls"] | None


@attrs.frozen
class PromptTokensDetails:
    cached_tokens: int = attrs.field(metadata=_doc("Prompt tokens served from the cache."))


@attrs.frozen
class Usage:
    prompt_tokens: int = attrs.field(metadata=_doc("Tokens of the prompt(s)."))
    completion_tokens: int = attrs.field(metadata=_doc("Tokens generated, over all choices."))
    total_tokens: int = attrs.field(metadata=_doc("prompt_tokens + completion_tokens."))
    prompt_tokens_details: PromptTokensDetails = attrs.field(
        metadata=_doc("Details of the prompt tokens.")
    )
    queue_time: float = attrs.field(metadata=_doc("Seconds waiting for a batch slot (max)."))
    prompt_time: float = attrs.field(metadata=_doc("Seconds of prompt processing (max)."))
    prompt_tokens_per_sec: float | str = attrs.field(
        metadata=_doc('Prompt tokens per second, or "Indeterminate" when the time is 0.')
    )
    completion_time: float = attrs.field(metadata=_doc("Seconds of generation (max)."))
    completion_tokens_per_sec: float | str = attrs.field(
        metadata=_doc('Generated tokens per second, or "Indeterminate" when the time is 0.')
    )
    total_time: float = attrs.field(metadata=_doc("Seconds from request to last token."))


@attrs.frozen
class TopLogprob:
    token: str = attrs.field(metadata=_doc("The token's text."))
    logprob: float = attrs.field(metadata=_doc("Its log probability."))
    bytes: list[int] = attrs.field(metadata=_doc("Its UTF-8 bytes."))


@attrs.frozen
class ChatTokenLogprob:
    token: str = attrs.field(metadata=_doc("The sampled token's text."))
    logprob: float = attrs.field(metadata=_doc("Its log probability."))
    bytes: list[int] = attrs.field(metadata=_doc("Its UTF-8 bytes."))
    top_logprobs: list[TopLogprob] = attrs.field(metadata=_doc("The most likely alternatives."))


@attrs.frozen
class ChatLogprobs:
    content: list[ChatTokenLogprob] = attrs.field(metadata=_doc("One entry per token."))


@attrs.frozen
class CompletionLogprobs:
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str] = attrs.field(metadata=_doc("Token texts."))
    token_logprobs: list[float] = attrs.field(metadata=_doc("Their log probabilities."))
    top_logprobs: list[dict[str, float] | None] = attrs.field(
        metadata=_doc("Per token, the alternatives as {text: logprob}.")
    )
    text_offset: list[int] = attrs.field(metadata=_doc("Where each token starts in the text."))


@attrs.frozen
class CompletionChoice:
    index: int = attrs.field(metadata=_doc("prompt index × n + choice number."))
    text: str = attrs.field(metadata=_doc("The generated text."))
    finish_reason: FinishReasonField = attrs.field(metadata=_doc("stop, length or tool_calls."))
    stop_str: str | None = attrs.field(
        default=None, metadata=_doc("The stop string or token that ended it.", omit_none=True)
    )
    logprobs: CompletionLogprobs | None = attrs.field(
        default=None, metadata=_doc("Token logprobs when asked for.")
    )


@attrs.frozen
class CompletionResponse:
    id: str = attrs.field(metadata=_doc("cmpl-<request id>."))
    created: int = attrs.field(metadata=_doc("Unix time."))
    model: str = attrs.field(metadata=_doc("The model that answered."))
    choices: list[CompletionChoice] = attrs.field(metadata=_doc("One per prompt and n."))
    usage: Usage = attrs.field(metadata=_doc("Token counts and timings."))
    object: Literal["text_completion"] = attrs.field(
        default="text_completion", metadata=_doc("Always text_completion.")
    )


@attrs.frozen
class CompletionChunk:
    id: str = attrs.field(metadata=_doc("cmpl-<request id>, the same in every chunk."))
    created: int = attrs.field(metadata=_doc("Unix time."))
    model: str = attrs.field(metadata=_doc("The model that answers."))
    choices: list[CompletionChoice] = attrs.field(metadata=_doc("New text of one choice."))
    usage: Usage | None = attrs.field(
        default=None, metadata=_doc("Only in the last chunk, with include_usage.", omit_none=True)
    )
    object: Literal["text_completion"] = attrs.field(
        default="text_completion", metadata=_doc("Always text_completion.")
    )


@attrs.frozen
class ChatResponseMessage:
    content: str | None = attrs.field(metadata=_doc("The answer (null when only tool calls)."))
    role: Literal["assistant"] = attrs.field(default="assistant", metadata=_doc("assistant."))
    reasoning_content: str | None = attrs.field(
        default=None, metadata=_doc("Reasoning, when the model's reasoning is split off.")
    )
    tool_calls: list[dict[str, Any]] | None = attrs.field(
        default=None, metadata=_doc("Tool calls the model made.")
    )


@attrs.frozen
class ChatChoice:
    index: int = attrs.field(metadata=_doc("Choice number."))
    message: ChatResponseMessage = attrs.field(metadata=_doc("The answer."))
    finish_reason: FinishReasonField = attrs.field(metadata=_doc("stop, length or tool_calls."))
    stop_str: str | None = attrs.field(
        default=None, metadata=_doc("The stop string or token that ended it.")
    )
    logprobs: ChatLogprobs | None = attrs.field(
        default=None, metadata=_doc("Token logprobs when asked for.")
    )


@attrs.frozen
class ChatCompletionResponse:
    id: str = attrs.field(metadata=_doc("chatcmpl-<request id>."))
    created: int = attrs.field(metadata=_doc("Unix time."))
    model: str = attrs.field(metadata=_doc("The model that answered."))
    choices: list[ChatChoice] = attrs.field(metadata=_doc("One per n."))
    usage: Usage = attrs.field(metadata=_doc("Token counts and timings."))
    object: Literal["chat.completion"] = attrs.field(
        default="chat.completion", metadata=_doc("Always chat.completion.")
    )


@attrs.frozen
class ChatDelta:
    role: Literal["assistant"] | None = attrs.field(
        default=None, metadata=_doc("Only in the first chunk of a choice.", omit_none=True)
    )
    content: str | None = attrs.field(default=None, metadata=_doc("New text.", omit_none=True))
    reasoning_content: str | None = attrs.field(
        default=None, metadata=_doc("New reasoning text.", omit_none=True)
    )
    tool_calls: list[dict[str, Any]] | None = attrs.field(
        default=None, metadata=_doc("Tool calls, each with its index.", omit_none=True)
    )


@attrs.frozen
class ChatChunkChoice:
    index: int = attrs.field(metadata=_doc("Choice number."))
    delta: ChatDelta = attrs.field(metadata=_doc("What is new in this choice."))
    finish_reason: FinishReasonField = attrs.field(
        default=None, metadata=_doc("Set in the last chunk of the choice.")
    )
    stop_str: str | None = attrs.field(
        default=None, metadata=_doc("The stop string or token that ended it.", omit_none=True)
    )
    logprobs: ChatLogprobs | None = attrs.field(
        default=None, metadata=_doc("Logprobs of the new tokens when asked for.")
    )


@attrs.frozen
class ChatChunk:
    id: str = attrs.field(metadata=_doc("chatcmpl-<request id>, the same in every chunk."))
    created: int = attrs.field(metadata=_doc("Unix time."))
    model: str = attrs.field(metadata=_doc("The model that answers."))
    choices: list[ChatChunkChoice] = attrs.field(metadata=_doc("Empty in the usage chunk."))
    usage: Usage | None = attrs.field(
        default=None, metadata=_doc("Only in the last chunk, with include_usage.", omit_none=True)
    )
    object: Literal["chat.completion.chunk"] = attrs.field(
        default="chat.completion.chunk", metadata=_doc("Always chat.completion.chunk.")
    )
