"""What a generation request means, whatever protocol it came in.

Each protocol validates its own wire body (with its own names, aliases and checks)
and maps it onto one of these: :class:`CompletionRequest` (prompts to continue) or
:class:`ChatRequest` (a conversation rendered with the model's template). The
sampling parameters are a plain :class:`~tabby.serving.sampling.SamplerParams` (see
:func:`~tabby.serving.sampling.sampler_params`), the structured-output choice an
:class:`OutputFormat`; everything protocol-specific (stream framing, ids, usage
options) stays with the protocol. Messages and tools keep the field names chat
templates expect (``role``, ``content``, ``tool_calls``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from tabby.serving.sampling import SamplerParams

__all__ = [
    "MAX_CHOICES",
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "ContentPart",
    "GenerationRequest",
    "OutputFormat",
]

# Jobs one request may create in all (prompts × n): each is a job of the batch, so a
# request cannot flood the queue.
MAX_CHOICES = 64


@attrs.frozen(kw_only=True)
class ContentPart:
    """One part of a message's content: ``text``, or an input the model may not take."""

    type: str
    text: str | None = None
    image_url: Mapping[str, Any] | str | None = None


@attrs.frozen(kw_only=True)
class ChatMessage:
    role: str = "user"
    content: str | tuple[ContentPart, ...] | None = None
    name: str | None = None
    reasoning_content: str | None = None
    tool_calls: tuple[Mapping[str, Any], ...] | None = None  # {id, type, function}
    tool_call_id: str | None = None  # the call a tool message answers


@attrs.frozen
class OutputFormat:
    """The structured output asked for besides the sampler fields' own constraint.

    ``json_object`` (also ``json``): any JSON object; ``json_schema``: ``schema``, given
    bare or as ``{"name", "schema"}``; ``text``: no constraint.
    """

    type: Literal["text", "json", "json_object", "json_schema"] = "text"
    schema: Mapping[str, Any] | None = None


@attrs.frozen(kw_only=True)
class GenerationRequest:
    """What every generation request has."""

    sampling: SamplerParams = attrs.Factory(SamplerParams)
    output_format: OutputFormat | None = None
    n: int = 1  # choices per prompt
    model: str | None = None  # the model asked for (honoured with inline loading)
    # Fields the client set that have no effect here (logged, not refused).
    ignored_fields: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class CompletionRequest(GenerationRequest):
    prompts: tuple[str, ...]
    # Drop tokens from the front of a prompt that does not fit instead of refusing it
    # (one prompt only); ``context_limit`` caps the model's context for that.
    trim_prompt: bool = False
    context_limit: int | None = None


@attrs.frozen(kw_only=True)
class ChatRequest(GenerationRequest):
    messages: tuple[ChatMessage, ...]
    add_generation_prompt: bool = True
    template_vars: Mapping[str, Any] = attrs.Factory(dict)
    response_prefix: str | None = None  # text the answer starts with
    continue_final_message: bool = False
    tools: tuple[Mapping[str, Any], ...] | None = None
    functions: tuple[Mapping[str, Any], ...] | None = None  # legacy, for the template
    tool_choice: str | Mapping[str, Any] | None = None
    parallel_tool_calls: bool | None = None
