"""Request bodies of ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Both compose :class:`tabby.serving.sampling.SamplerParams` (every sampler field, alias and
check) with the fields OpenAI clients send. Fields that OpenAI defines but tabby does
not act on (``best_of``, ``echo``, ``suffix``, ``user``, ``prompt_template``) are
accepted and ignored, so clients do not break. :func:`completion_request` and
:func:`chat_request` map a validated body onto the neutral requests of
:mod:`tabby.serving.requests`; checks that need the loaded model (context length,
vision support, the chat template) happen later, in ``tabby.serving.planning``.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from tabby.config.validation import FieldError, check
from tabby.serving import requests as neutral
from tabby.serving.requests import MAX_CHOICES
from tabby.serving.sampling import SamplerParams, sampler_params

__all__ = [
    "MAX_CHOICES",
    "MAX_N",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "OpenAIRequest",
    "ReasoningOptions",
    "ResponseFormat",
    "StreamOptions",
    "chat_messages",
    "chat_request",
    "completion_request",
]

# Choices per prompt: each is a job in the batch, so a request cannot flood the queue.
MAX_N = 16


def _doc(text: str, *aliases: str) -> dict[str, Any]:
    return {"doc": text, "aliases": aliases} if aliases else {"doc": text}


def _n_in_range(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
    if not 1 <= value <= MAX_N:
        raise FieldError(attribute.name, f"expected an integer in [1, {MAX_N}], got {value!r}")


@attrs.frozen(kw_only=True)
class StreamOptions:
    include_usage: bool = attrs.field(
        default=False, metadata=_doc("Send a last chunk with the usage (choices: []).")
    )


@attrs.frozen(kw_only=True)
class ResponseFormat:
    type: Literal["text", "json", "json_object", "json_schema"] = attrs.field(
        default="text",
        metadata=_doc('"json_object" (or "json"): any JSON object; "json_schema": the schema.'),
    )
    json_schema: dict[str, Any] | None = attrs.field(
        default=None, metadata=_doc('The schema (or {"name", "schema"}) for "json_schema".')
    )


@attrs.frozen(kw_only=True)
class OpenAIRequest(SamplerParams):
    """The fields both generation endpoints share, on top of every sampler field."""

    model: str | None = attrs.field(
        default=None,
        metadata=_doc("Ignored unless inline model loading is on; then the model to serve."),
    )
    stream: bool = attrs.field(default=False, metadata=_doc("Answer as server-sent events."))
    stream_options: StreamOptions | None = attrs.field(
        default=None, metadata=_doc("Streaming options (include_usage).")
    )
    response_format: ResponseFormat | None = attrs.field(
        default=None, metadata=_doc("Structured output: text, json_object or json_schema.")
    )
    n: int = attrs.field(
        default=1,
        validator=_n_in_range,
        metadata=_doc(f"Choices per prompt (1 to {MAX_N}); each is a job of the batch."),
    )
    best_of: int | None = attrs.field(default=None, metadata=_doc("Accepted; ignored."))
    echo: bool | None = attrs.field(default=None, metadata=_doc("Accepted; ignored."))
    suffix: str | None = attrs.field(default=None, metadata=_doc("Accepted; ignored."))
    user: str | None = attrs.field(default=None, metadata=_doc("Accepted; ignored."))

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


@attrs.frozen(kw_only=True)
class CompletionRequest(OpenAIRequest):
    prompt: str | tuple[str, ...] = attrs.field(
        validator=check(lambda p: isinstance(p, str) or len(p) > 0, "at least one prompt"),
        metadata=_doc("A prompt, or a list of prompts (a batch: n choices each)."),
    )

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else self.prompt


@attrs.frozen(kw_only=True)
class ContentPart:
    type: str = attrs.field(metadata=_doc('"text" (or "image_url", which needs vision).'))
    text: str | None = attrs.field(default=None, metadata=_doc("The text of a text part."))
    image_url: dict[str, Any] | str | None = attrs.field(
        default=None, metadata=_doc("The image of an image_url part ({url}).")
    )


@attrs.frozen(kw_only=True)
class ChatMessage:
    role: str = attrs.field(default="user", metadata=_doc("system, user, assistant, tool, ..."))
    content: str | tuple[ContentPart, ...] | None = attrs.field(
        default=None, metadata=_doc("Text, or a list of content parts.")
    )
    name: str | None = attrs.field(default=None, metadata=_doc("Optional author name."))
    reasoning_content: str | None = attrs.field(
        default=None, metadata=_doc("Earlier reasoning, passed to the template.")
    )
    tool_calls: tuple[dict[str, Any], ...] | None = attrs.field(
        default=None, metadata=_doc("Tool calls an assistant message made.")
    )
    tool_call_id: str | None = attrs.field(
        default=None, metadata=_doc("The call a tool message answers.")
    )


@attrs.frozen(kw_only=True)
class ReasoningOptions:
    effort: str | None = attrs.field(default=None, metadata=_doc("Becomes reasoning_effort."))
    enabled: bool | None = attrs.field(default=None, metadata=_doc("Becomes enable_thinking."))
    max_tokens: int | None = attrs.field(default=None, metadata=_doc("A reasoning budget."))


@attrs.frozen(kw_only=True)
class ChatCompletionRequest(OpenAIRequest):
    messages: tuple[ChatMessage, ...] = attrs.field(
        validator=check(lambda m: len(m) > 0, "at least one message"),
        metadata=_doc("The conversation so far."),
    )
    add_generation_prompt: bool = attrs.field(
        default=True, metadata=_doc("Open an assistant turn after the messages.")
    )
    template_vars: dict[str, Any] = attrs.field(
        factory=dict,
        metadata=_doc("Extra variables for the chat template.", "chat_template_kwargs"),
    )
    response_prefix: str | None = attrs.field(
        default=None, metadata=_doc("Text the answer starts with (assistant prefill).")
    )
    continue_final_message: bool = attrs.field(
        default=False,
        metadata=_doc("Continue the last message in place (needs add_generation_prompt false)."),
    )
    tools: tuple[dict[str, Any], ...] | None = attrs.field(
        default=None, metadata=_doc("Tools the model may call (also passed to the template).")
    )
    functions: tuple[dict[str, Any], ...] | None = attrs.field(
        default=None, metadata=_doc("Legacy function definitions (passed to the template).")
    )
    tool_choice: str | dict[str, Any] | None = attrs.field(
        default=None,
        metadata=_doc('"none", "auto", "required" or a named function (enforced).'),
    )
    parallel_tool_calls: bool | None = attrs.field(
        default=None, metadata=_doc("false: at most one call per answer (default true).")
    )
    prompt_template: str | None = attrs.field(
        default=None, metadata=_doc("Accepted; ignored (the template belongs to the model).")
    )
    reasoning_effort: str | None = attrs.field(
        default=None, metadata=_doc("Forwarded to the template as reasoning_effort.")
    )
    enable_thinking: bool | None = attrs.field(
        default=None, metadata=_doc("Forwarded to the template as enable_thinking.")
    )
    verbosity: str | None = attrs.field(
        default=None, metadata=_doc("Forwarded to the template as verbosity.")
    )
    reasoning: ReasoningOptions | None = attrs.field(
        default=None, metadata=_doc("{effort, enabled, max_tokens}, as OpenRouter sends it.")
    )
    reasoning_budget_tokens: int | None = attrs.field(
        default=None,
        metadata=_doc(
            "Reasoning token budget; negative or null uses the server default.",
            "reasoning_budget",
            "thinking_budget",
            "thinking_token_budget",
        ),
    )
    reasoning_budget_message: str | None = attrs.field(
        default=None, metadata=_doc("Text inserted before a forced end of reasoning.")
    )

    def reasoning_variables(self) -> dict[str, Any]:
        """Template variables of the reasoning fields: the object first, flat fields win."""
        out: dict[str, Any] = {}
        if self.reasoning is not None:
            if self.reasoning.effort is not None:
                out["reasoning_effort"] = self.reasoning.effort
            if self.reasoning.enabled is not None:
                out["enable_thinking"] = self.reasoning.enabled
        for key in ("reasoning_effort", "enable_thinking", "verbosity"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


# -- onto the neutral requests ------------------------------------------------------------


def _output_format(fmt: ResponseFormat | None) -> neutral.OutputFormat | None:
    if fmt is None:
        return None
    return neutral.OutputFormat(fmt.type, fmt.json_schema)


def _content(
    content: str | tuple[ContentPart, ...] | None,
) -> str | tuple[neutral.ContentPart, ...] | None:
    if not isinstance(content, tuple):
        return content
    return tuple(
        neutral.ContentPart(type=part.type, text=part.text, image_url=part.image_url)
        for part in content
    )


def chat_messages(messages: tuple[ChatMessage, ...]) -> tuple[neutral.ChatMessage, ...]:
    return tuple(
        neutral.ChatMessage(
            role=m.role,
            content=_content(m.content),
            name=m.name,
            reasoning_content=m.reasoning_content,
            tool_calls=m.tool_calls,
            tool_call_id=m.tool_call_id,
        )
        for m in messages
    )


def completion_request(body: CompletionRequest) -> neutral.CompletionRequest:
    return neutral.CompletionRequest(
        prompts=body.prompts,
        sampling=sampler_params(body),
        output_format=_output_format(body.response_format),
        n=body.n,
        model=body.model,
        ignored_fields=body.ineffective_fields(),
    )


def chat_request(body: ChatCompletionRequest) -> neutral.ChatRequest:
    return neutral.ChatRequest(
        messages=chat_messages(body.messages),
        add_generation_prompt=body.add_generation_prompt,
        # The reasoning fields are template variables; the client's own win.
        template_vars={**body.reasoning_variables(), **body.template_vars},
        response_prefix=body.response_prefix,
        continue_final_message=body.continue_final_message,
        tools=body.tools,
        functions=body.functions,
        tool_choice=body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        sampling=sampler_params(body),
        output_format=_output_format(body.response_format),
        n=body.n,
        model=body.model,
        ignored_fields=body.ineffective_fields(),
    )
