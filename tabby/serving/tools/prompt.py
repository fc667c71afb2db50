"""Tools shown to a model whose chat template does not show them itself.

Templates written with tool support read ``tools`` and render an assistant turn's
``tool_calls``; plenty of templates do neither (a GGUF's embedded ChatML, the plain
bundled ones), and a model never told about the tools never calls one. For those, the
template's messages (as :func:`tabby.serving.templating.build_variables` made them)
are adjusted before rendering::

    fmt = prompt_format(settings.tool_format, template.source, takes_tools=...)
    if not template.takes_tools:
        messages = with_tool_prompt(messages, tool_prompt(policy.tools, fmt))
    if not template.renders_tool_calls:
        messages = with_written_calls(messages, fmt or FORMATS["hermes"])

The tool prompt is a block at the end of the system prompt: the tools as JSON and the
call format with an example. Earlier calls are written into their assistant turn's
content in that same format, so the model sees how it called them; the ``tool``
messages themselves are left to the template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from tabby.serving.tools.parsers import FORMATS, ToolFormat, hinted_format, tool_format
from tabby.serving.tools.policy import FunctionTool

__all__ = [
    "prompt_format",
    "tool_prompt",
    "with_tool_prompt",
    "with_written_calls",
    "written_calls",
]


def prompt_format(
    configured: str | None, template_source: str, *, takes_tools: bool
) -> ToolFormat | None:
    """The format the model writes calls in, as far as is known: its ``tool_format``,
    else the one its template's text names, else Hermes for a template that does not
    show the tools (our tool prompt asks for it); None for a template that shows them
    in a format nothing names."""
    if configured:
        return tool_format(configured)
    hinted = hinted_format(template_source)
    if hinted is not None or takes_tools:
        return hinted
    return FORMATS["hermes"]


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def written_calls(calls: Sequence[tuple[str, Any]], fmt: ToolFormat) -> str:
    """``(name, arguments)`` calls as the model writes them in ``fmt``."""
    if fmt.name == "llama3":
        return "; ".join(_compact({"name": n, "parameters": a}) for n, a in calls)
    if fmt.name == "mistral":
        return "[TOOL_CALLS]" + _compact([{"name": n, "arguments": a} for n, a in calls])
    return "\n".join(
        f"<tool_call>\n{_compact({'name': n, 'arguments': a})}\n</tool_call>" for n, a in calls
    )


def _describe(tool: FunctionTool) -> str:
    entry: dict[str, Any] = {"name": tool.name}
    if tool.description:
        entry["description"] = tool.description
    entry["parameters"] = tool.parameters
    return _compact(entry)


def tool_prompt(tools: Sequence[FunctionTool], fmt: ToolFormat) -> str:
    """The system-prompt block that offers ``tools`` and says how to call them."""
    listed = "\n".join(_describe(t) for t in tools)
    example = written_calls([("<tool name>", {"<argument>": "<value>"})], fmt)
    return (
        f"You can call these tools:\n<tools>\n{listed}\n</tools>\n\n"
        "To call tools, answer with the calls alone, in this form:\n"
        f"{example}\n"
        "Each call's arguments are a JSON object that follows the tool's parameters. "
        "The results come back in messages from the tool role; answer the user with them. "
        "When no tool is needed, answer directly."
    )


def with_tool_prompt(messages: Sequence[Mapping[str, Any]], block: str) -> list[dict[str, Any]]:
    """``messages`` with ``block`` after the system prompt (a new one if there is none)."""
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        system = out[0].get("content") or ""
        out[0]["content"] = f"{system}\n\n{block}" if system else block
        return out
    return [{"role": "system", "content": block}, *out]


def _call_pair(call: Any) -> tuple[str, Any] | None:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        return None
    return function["name"], function.get("arguments", {})


def with_written_calls(
    messages: Sequence[Mapping[str, Any]], fmt: ToolFormat
) -> list[dict[str, Any]]:
    """``messages`` with each assistant turn's tool calls written after its content."""
    out: list[dict[str, Any]] = []
    for message in messages:
        pairs = [p for p in map(_call_pair, message.get("tool_calls") or ()) if p is not None]
        if message.get("role") != "assistant" or not pairs:
            out.append(dict(message))
            continue
        content = message.get("content") or ""
        calls = written_calls(pairs, fmt)
        out.append({**message, "content": f"{content}\n{calls}" if content else calls})
    return out
