"""How one chat request's output is shaped: tool calling mode and reasoning tags.

Resolved once per request by :func:`chat_options` from the request's ``tools`` /
``tool_choice`` / ``parallel_tool_calls``, the model's settings (``tool_format``,
``reasoning``, ``reasoning_start_token``, ``reasoning_end_token``) and the template's
metadata (``tool_start``):

* ``none``: no tool calls (``tool_choice: "none"`` or no tools); tool-looking text stays
  content and ``tool_start`` is not a stop string.
* ``template``: ``auto`` with a template that declares ``tool_start``: the tag is a stop
  string; a choice that stops on it gets a second pass constrained by the calls'
  schema (prompt = rendered prompt + text so far + the tag).
* ``format``: ``auto`` otherwise: the model writes calls in its own format and a
  :class:`~tabby.serving.tools.ToolStreamParser` per choice takes them out; the format
  is the model's ``tool_format``, else ``auto`` (every known format, by its tags).
* ``forced``: ``required`` or a named function: the prompt ends with the tool tag (the
  template's ``tool_start`` or the start tag of the format the model writes calls in,
  if known) and the calls' schema constrains the answer from its first token.

A call cut short by the token limit is no call and no content: ``finish_reason`` says
``length``.

Reasoning is on when the model's settings say so, or when the rendered prompt ends
inside an open reasoning tag (a template or ``response_prefix`` that pre-fills it);
never for forced calls, whose answer starts with the tool tag.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from tabby.backends.constraints import ConstraintCompiler
from tabby.config import ModelSettings
from tabby.jobs import ConstraintSpec
from tabby.serving.reasoning import DEFAULT_END, DEFAULT_START
from tabby.serving.tools import FORMATS, ToolFormat, ToolPolicy, tool_format, tool_policy

__all__ = [
    "ChatOptions",
    "ReasoningTags",
    "ToolMode",
    "chat_options",
    "open_reasoning",
    "with_prompt",
]

ToolMode = Literal["none", "template", "format", "forced"]


@attrs.frozen
class ReasoningTags:
    start: str
    end: str
    prefilled: bool  # the prompt already opened the reasoning


@attrs.frozen
class ChatOptions:
    """A chat request's output shaping, and what a second (tool) pass needs."""

    tools: ToolMode = "none"
    policy: ToolPolicy | None = None
    tool_start: str | None = None  # the tag: a stop string (template) or prompt tail (forced)
    tool_format: ToolFormat | None = None
    reasoning: ReasoningTags | None = None
    add_bos: bool = True
    max_seq_len: int = 0
    compiler: ConstraintCompiler | None = attrs.field(default=None, eq=False)

    @property
    def plain(self) -> bool:
        """Nothing to shape: text streams as it comes."""
        return self.tools == "none" and self.reasoning is None

    def tool_constraint(self) -> ConstraintSpec | None:
        return self.policy.constraint() if self.policy is not None else None


def open_reasoning(prompt: str, start: str, end: str) -> bool:
    """Whether ``prompt`` ends inside an open reasoning tag."""
    at = prompt.rfind(start)
    return at >= 0 and prompt.find(end, at + len(start)) < 0


def _tags(settings: ModelSettings) -> tuple[str, str]:
    return (
        settings.reasoning_start_token or DEFAULT_START,
        settings.reasoning_end_token or DEFAULT_END,
    )


def chat_options(
    *,
    tools: Any,
    tool_choice: Any,
    parallel_tool_calls: bool | None,
    settings: ModelSettings,
    template_tool_start: str | None,
    call_format: ToolFormat | None = None,
) -> ChatOptions:
    """The tool mode (reasoning and the prompt-dependent parts are added by the caller).

    ``call_format``: the format the model writes calls in, when known (see
    :func:`tabby.serving.tools.prompt_format`).
    """
    policy = tool_policy(tools, tool_choice, parallel_tool_calls)
    fmt = tool_format(settings.tool_format) if settings.tool_format else None
    if policy.mode == "none":
        return ChatOptions(policy=policy)
    if policy.mode == "required":
        known = fmt or call_format
        tag = template_tool_start or (known.start_tags[0] if known is not None else None)
        return ChatOptions("forced", policy, tag, fmt)
    if fmt is not None:
        return ChatOptions("format", policy, None, fmt)
    if template_tool_start:
        return ChatOptions("template", policy, template_tool_start)
    return ChatOptions("format", policy, None, FORMATS["auto"])


def with_prompt(
    options: ChatOptions,
    prompt: str,
    settings: ModelSettings,
    *,
    add_bos: bool,
    max_seq_len: int,
    compiler: ConstraintCompiler | None,
) -> ChatOptions:
    """``options`` completed with reasoning (it depends on the rendered prompt)."""
    reasoning = None
    if options.tools != "forced":
        start, end = _tags(settings)
        prefilled = open_reasoning(prompt, start, end)
        if settings.reasoning or prefilled:
            reasoning = ReasoningTags(start, end, prefilled)
    return attrs.evolve(
        options, reasoning=reasoning, add_bos=add_bos, max_seq_len=max_seq_len, compiler=compiler
    )
