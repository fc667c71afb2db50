"""The variables a chat template sees, built from a chat request.

Templates are written for Hugging Face's ``apply_chat_template``, so messages are
plain dicts without null fields, multi-part text content is one string, and tool-call
arguments are objects (templates iterate them) rather than the JSON strings of the
OpenAI wire format. Every message has a ``content`` string: an assistant turn that only
calls tools arrives from clients as ``content: null``, and templates concatenate
``message['content']`` without checking for it, so it becomes ``""``. A ``tool``
message without a ``name`` gets the name of the function whose call it answers (some
templates print it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from tabby.errors import InvalidRequest

__all__ = ["build_variables", "strip_leading_bos"]

# Separator between the text parts of one multi-part message.
_PART_SEPARATOR = "\n"


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_nulls(v) for v in value]
    return value


def _flatten_content(content: Any, index: int) -> Any:
    if not isinstance(content, list):
        return content
    texts: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            raise InvalidRequest(
                f"content parts of type {kind!r} are not supported by this model",
                param=f"messages[{index}].content[{j}]",
            )
    return _PART_SEPARATOR.join(texts)


def _parse_arguments(tool_call: Any) -> Any:
    if not isinstance(tool_call, Mapping):
        return tool_call
    function = tool_call.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("arguments"), str):
        return tool_call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return tool_call  # kept as text: the template still sees what the model wrote
    return {**tool_call, "function": {**function, "arguments": arguments}}


def _prepare_message(message: Any, index: int) -> dict[str, Any]:
    if attrs.has(type(message)):
        message = attrs.asdict(message, recurse=True)
    if not isinstance(message, Mapping):
        raise InvalidRequest("a message must be an object", param=f"messages[{index}]")
    prepared: dict[str, Any] = _drop_nulls(message)
    prepared["content"] = _flatten_content(prepared.get("content", ""), index)
    if isinstance(prepared.get("tool_calls"), list):
        prepared["tool_calls"] = [_parse_arguments(tc) for tc in prepared["tool_calls"]]
    return prepared


def _call_names(calls: Any) -> dict[str, str]:
    names: dict[str, str] = {}
    for call in calls or ():
        function = call.get("function") if isinstance(call, Mapping) else None
        if isinstance(function, Mapping) and isinstance(call.get("id"), str):
            name = function.get("name")
            if isinstance(name, str):
                names[call["id"]] = name
    return names


def _named(message: dict[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    name = names.get(message.get("tool_call_id", ""))
    if "name" in message or name is None:
        return message
    return {**message, "name": name}


def _order_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put each run of tool results in the order of the assistant's tool calls, each
    named after the function it answers."""
    out: list[dict[str, Any]] = []
    order: dict[str, int] = {}
    names: dict[str, str] = {}
    i = 0
    while i < len(messages):
        message = messages[i]
        if message.get("role") != "tool":
            if message.get("role") == "assistant":
                calls = message.get("tool_calls") or []
                names = _call_names(calls)
                order = {
                    tc["id"]: n
                    for n, tc in enumerate(calls)
                    if isinstance(tc, Mapping) and isinstance(tc.get("id"), str)
                }
            out.append(message)
            i += 1
            continue
        run_end = i
        while run_end < len(messages) and messages[run_end].get("role") == "tool":
            run_end += 1
        run = [_named(m, names) for m in messages[i:run_end]]
        # Stable sort: results with unknown ids keep their place after known ones.
        out.extend(sorted(run, key=lambda m: order.get(m.get("tool_call_id", ""), len(order))))
        i = run_end
    return out


def build_variables(
    messages: Sequence[Any],
    *,
    bos_token: str | None,
    eos_token: str | None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    add_generation_prompt: bool = True,
    tools: Sequence[Any] | None = None,
    functions: Sequence[Any] | None = None,
    template_vars: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Template variables for one chat request.

    ``messages`` are dicts (as parsed from JSON) or attrs instances. Extra
    ``template_vars`` (``chat_template_kwargs``) are added, but never replace the
    variables computed here. Raises :class:`InvalidRequest` for non-text content.
    """
    prepared = [_prepare_message(m, i) for i, m in enumerate(messages)]
    variables: dict[str, Any] = dict(template_vars or {})
    variables.update(
        messages=_order_tool_results(prepared),
        bos_token=bos_token or "",
        eos_token=eos_token or "",
        pad_token=pad_token or "",
        unk_token=unk_token or "",
        add_generation_prompt=add_generation_prompt,
        tools=_drop_nulls(list(tools)) if tools is not None else None,
        functions=_drop_nulls(list(functions)) if functions is not None else None,
    )
    return variables


def strip_leading_bos(prompt: str, bos_token: str | None, add_bos: bool) -> str:
    """Remove one leading BOS string when the tokenizer is going to add BOS itself."""
    if add_bos and bos_token and prompt.startswith(bos_token):
        return prompt[len(bos_token) :]
    return prompt
