"""The request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls``, checked and resolved.

The chat endpoint resolves them once per request::

    policy = tool_policy(body.tools, body.tool_choice, body.parallel_tool_calls)
    policy.mode            # "none" | "auto" | "required" (a named function is "required")
    policy.forced          # the function tool_choice names, or None
    policy.call_schema()   # JSON schema of the calls: [{"name": ..., "arguments": {...}}, ...]
    policy.constraint()    # the same as a ConstraintSpec for the constrained pass

* ``none``: no tool calls (tool text stays content).
* ``auto``: the model decides; with a template, generation stops at ``tool_start`` and a
  second pass constrained by ``constraint()`` writes the calls.
* ``required`` / ``{"type": "function", "function": {"name": ...}}``: the answer is the
  calls: the prompt gets ``tool_start`` appended and ``constraint()`` applies from the
  first token (only the named function when one is named).

``parallel_tool_calls: false`` makes the array hold exactly one call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import attrs
import jsonschema

from tabby.errors import InvalidRequest
from tabby.jobs import ConstraintSpec

__all__ = ["FunctionTool", "ToolMode", "ToolPolicy", "tool_policy"]

ToolMode = Literal["none", "auto", "required"]
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@attrs.frozen
class FunctionTool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] = attrs.field(factory=lambda: dict(_ANY_OBJECT))


@attrs.frozen
class ToolPolicy:
    tools: tuple[FunctionTool, ...]
    mode: ToolMode
    forced: str | None = None  # the function tool_choice names
    parallel: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tools)

    def callable_tools(self) -> tuple[FunctionTool, ...]:
        """The tools a call may name under this policy."""
        if self.forced is not None:
            return tuple(t for t in self.tools if t.name == self.forced)
        return self.tools

    def call_schema(self) -> dict[str, Any]:
        """A JSON array of ``{"name", "arguments"}`` calls, one branch per callable function."""
        branches = [
            {
                "type": "object",
                "properties": {"name": {"enum": [t.name]}, "arguments": t.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in self.callable_tools()
        ]
        item = branches[0] if len(branches) == 1 else {"anyOf": branches}
        schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema

    def constraint(self) -> ConstraintSpec:
        return ConstraintSpec("json_schema", json.dumps(self.call_schema()), param="tools")


def tool_policy(
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: str | Mapping[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
) -> ToolPolicy:
    """Check the tool fields (``InvalidRequest`` naming the field) and resolve them."""
    parsed = tuple(_function_tool(t, f"tools[{i}]") for i, t in enumerate(tools or ()))
    seen: set[str] = set()
    for i, tool in enumerate(parsed):
        if tool.name in seen:
            raise InvalidRequest(
                f"tools[{i}].function.name: {tool.name!r} is defined twice",
                param=f"tools[{i}].function.name",
            )
        seen.add(tool.name)
    mode, forced = _choice(tool_choice, parsed)
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    return ToolPolicy(parsed, mode, forced, parallel)


def _function_tool(raw: Mapping[str, Any], where: str) -> FunctionTool:
    if not isinstance(raw, Mapping):
        raise InvalidRequest(f"{where}: must be an object", param=where)
    kind = raw.get("type", "function")
    if kind != "function":
        raise InvalidRequest(
            f"{where}.type: only 'function' tools are supported, not {kind!r}",
            param=f"{where}.type",
        )
    function = raw.get("function", raw)  # a bare function definition is accepted too
    if not isinstance(function, Mapping):
        raise InvalidRequest(f"{where}.function: must be an object", param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(
            f"{where}.function.name: a non-empty string is required",
            param=f"{where}.function.name",
        )
    description = function.get("description")
    params = function.get("parameters")
    if params is None or params == {}:
        params = dict(_ANY_OBJECT)
    where_params = f"{where}.function.parameters"
    if not isinstance(params, Mapping):
        raise InvalidRequest(f"{where_params}: must be a JSON schema object", param=where_params)
    try:
        jsonschema.validators.validator_for(params).check_schema(params)
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(
            f"{where_params}: invalid JSON schema: {exc.message}", param=where_params
        ) from exc
    return FunctionTool(name, description if isinstance(description, str) else None, dict(params))


def _choice(
    choice: str | Mapping[str, Any] | None, tools: tuple[FunctionTool, ...]
) -> tuple[ToolMode, str | None]:
    if choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(choice, str):
        if choice == "none":
            return "none", None
        if choice not in ("auto", "required"):
            raise InvalidRequest(
                f"tool_choice: {choice!r} is not 'none', 'auto', 'required' or a function",
                param="tool_choice",
            )
        if not tools:
            if choice == "auto":
                return "none", None
            raise InvalidRequest("tool_choice: 'required' needs tools", param="tool_choice")
        return ("auto" if choice == "auto" else "required"), None
    if not isinstance(choice, Mapping):
        raise InvalidRequest("tool_choice: must be a string or an object", param="tool_choice")
    function = choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    if choice.get("type", "function") != "function" or not isinstance(name, str):
        raise InvalidRequest(
            'tool_choice: expected {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    if name not in {t.name for t in tools}:
        raise InvalidRequest(
            f"tool_choice: function {name!r} is not among the request's tools",
            param="tool_choice",
        )
    return "required", name
