"""OpenAI shapes for tool calls, and the checks on follow-up turns.

::

    calls = tool_calls(parsed)                      # ToolCall(id="call_<24 hex>", ...)
    message["tool_calls"] = [c.to_dict() for c in calls]
    chunk_delta["tool_calls"] = [c.delta(i) for i, c in enumerate(calls)]
    calls = tool_calls(calls_from_constrained(text))   # the constrained pass's JSON array

``reassemble(deltas)`` folds streamed ``delta.tool_calls`` items back into calls (what
a client does; the tests use it to compare streaming with non-streaming).

Follow-up turns: ``check_tool_messages(messages)`` raises ``InvalidRequest`` naming the
message for a ``tool`` message without ``tool_call_id`` or an assistant tool call
without a function name. What the template sees of them is
:func:`tabby.serving.templating.build_variables`'s business.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from tabby.errors import InvalidRequest
from tabby.serving.tools.parsers import ParsedCall, parse_calls_json

__all__ = [
    "FunctionCall",
    "ToolCall",
    "calls_from_constrained",
    "check_tool_messages",
    "new_call_id",
    "reassemble",
    "tool_calls",
]


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@attrs.frozen
class FunctionCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@attrs.frozen
class ToolCall:
    id: str
    function: FunctionCall
    type: str = "function"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "function": {"name": self.function.name, "arguments": self.function.arguments},
        }

    def delta(self, index: int) -> dict[str, Any]:
        """The ``delta.tool_calls`` item for this call (sent whole, in one chunk)."""
        return {"index": index, **self.to_dict()}


def tool_calls(parsed: Iterable[ParsedCall]) -> tuple[ToolCall, ...]:
    """OpenAI calls, each with a fresh id and its arguments as compact JSON text."""
    return tuple(
        ToolCall(
            new_call_id(),
            FunctionCall(
                p.name,
                p.arguments
                if isinstance(p.arguments, str)
                else json.dumps(p.arguments, ensure_ascii=False),
            ),
        )
        for p in parsed
    )


def calls_from_constrained(text: str) -> tuple[ParsedCall, ...]:
    """The calls of a constrained pass (a JSON array of ``{"name", "arguments"}``).

    The constraint guarantees the shape, but a pass cut short by ``max_tokens`` is not
    JSON: that yields no calls.
    """
    try:
        return tuple(parse_calls_json(text))
    except ValueError:
        return ()


def reassemble(deltas: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Fold streamed ``delta.tool_calls`` items into whole calls, by ``index``."""
    calls: dict[int, dict[str, Any]] = {}
    for item in deltas:
        index = int(item["index"])
        call = calls.setdefault(
            index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if item.get("id"):
            call["id"] = item["id"]
        if item.get("type"):
            call["type"] = item["type"]
        function = item.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


# -- follow-up turns -----------------------------------------------------------------------


def _get(message: Any, key: str) -> Any:
    if isinstance(message, Mapping):
        return message.get(key)
    return getattr(message, key, None)


def check_tool_messages(messages: Sequence[Any]) -> None:
    """Reject malformed tool turns (messages are dicts or objects with the same fields)."""
    for i, message in enumerate(messages):
        role = _get(message, "role")
        if role == "tool" and not _get(message, "tool_call_id"):
            raise InvalidRequest(
                f"messages[{i}].tool_call_id: a tool message must name the call it answers",
                param=f"messages[{i}].tool_call_id",
            )
        for j, call in enumerate(_get(message, "tool_calls") or ()):
            where = f"messages[{i}].tool_calls[{j}]"
            function = _get(call, "function")
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                raise InvalidRequest(
                    f"{where}.function.name: a function name is required",
                    param=f"{where}.function.name",
                )
