"""Tool calling: the request's tools and choice, model-format parsers, OpenAI shapes.

* :mod:`tabby.serving.tools.policy`: ``tool_policy(tools, tool_choice, parallel_tool_calls)`` →
  ``ToolPolicy`` (mode, forced function, the calls' JSON schema and constraint).
* :mod:`tabby.serving.tools.parsers`: ``ToolStreamParser(tool_format(name))`` splits streamed
  text into content and tool calls for the Hermes/Qwen, Llama 3 and Mistral formats.
* :mod:`tabby.serving.tools.prompt`: the tools and earlier calls written into the prompt
  for a template that does not show them itself.
* :mod:`tabby.serving.tools.shaping`: ``ToolCall`` with ``call_<24 hex>`` ids, stream deltas,
  and checks for follow-up turns.
"""

from tabby.serving.tools.parsers import (
    FORMATS,
    ParsedCall,
    ToolFormat,
    ToolParseResult,
    ToolStreamParser,
    hinted_format,
    parse_calls_json,
    parse_tool_text,
    tool_format,
)
from tabby.serving.tools.policy import FunctionTool, ToolMode, ToolPolicy, tool_policy
from tabby.serving.tools.prompt import (
    prompt_format,
    tool_prompt,
    with_tool_prompt,
    with_written_calls,
    written_calls,
)
from tabby.serving.tools.shaping import (
    FunctionCall,
    ToolCall,
    calls_from_constrained,
    check_tool_messages,
    new_call_id,
    reassemble,
    tool_calls,
)

__all__ = [
    "FORMATS",
    "FunctionCall",
    "FunctionTool",
    "ParsedCall",
    "ToolCall",
    "ToolFormat",
    "ToolMode",
    "ToolParseResult",
    "ToolPolicy",
    "ToolStreamParser",
    "calls_from_constrained",
    "check_tool_messages",
    "hinted_format",
    "new_call_id",
    "parse_calls_json",
    "parse_tool_text",
    "prompt_format",
    "reassemble",
    "tool_calls",
    "tool_format",
    "tool_policy",
    "tool_prompt",
    "with_tool_prompt",
    "with_written_calls",
    "written_calls",
]
