"""Tool calls in the models' own formats, split out of streamed text.

One :class:`ToolStreamParser` per choice; feed it every text delta, show what ``feed``
returns as content, and parse the calls when the generation ends::

    parser = ToolStreamParser(tool_format("hermes"))
    for delta in deltas:
        visible = parser.feed(delta)       # content; partial tags are held back
    result = parser.finish()
    result.content                          # held-back text, and tool text that did not parse
    result.calls                            # ParsedCall(name, arguments) in order

Formats (``tool_format`` per model; aliases in parentheses):

* ``hermes`` (``qwen2_5``, ``qwen``, ``chatml_with_tools``, ``tabby``):
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one call per tag; a JSON
  array of calls inside one tag (tabby's own template) works too.
* ``llama3`` (``llama3_json``, ``llama``): ``{"name": ..., "parameters": {...}}``, after
  ``<|python_tag|>`` or as the whole reply; several calls separated by ``;`` or newlines.
  A reply that starts with JSON but is not a call stays content.
* ``mistral`` (``mistral_old``): ``[TOOL_CALLS]`` then a JSON array of calls, or the newer
  ``[TOOL_CALLS]name[ARGS]{...}`` (repeated for parallel calls); runs to the end.
* ``auto``: all of the above, each by its own tag (a reply that opens with JSON is read
  as Llama 3's); for models whose format nobody configured. ``hinted_format(source)``
  names the format a chat template writes, by the tags in it.

Text that fails to parse is returned as content (nothing is lost, nothing raises),
except the unfinished call of a reply cut short (``finish(cut_off=True)``): it is
dropped, as half a call is neither content nor a call. With ``names``, a block that
calls a function not among them is content too.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from tabby.errors import InvalidRequest

__all__ = [
    "FORMATS",
    "ParsedCall",
    "ToolFormat",
    "ToolParseResult",
    "ToolStreamParser",
    "hinted_format",
    "parse_calls_json",
    "parse_tool_text",
    "tool_format",
]


@attrs.frozen
class ParsedCall:
    name: str
    arguments: Any  # the decoded JSON arguments (normally an object)


@attrs.frozen
class ToolFormat:
    name: str
    start_tags: tuple[str, ...]
    end_tag: str | None
    parse: Callable[[str], list[ParsedCall]]  # one block (tags removed); ValueError if bad
    leading_json: bool = False  # a reply that opens with { or [ is tool text
    # Per opening tag ("" for leading JSON), the format a block follows when it is not
    # this one's own (the ``auto`` format's members).
    variants: Mapping[str, ToolFormat] = attrs.field(factory=dict, repr=False)

    def block_format(self, tag: str) -> ToolFormat:
        return self.variants.get(tag, self)


@attrs.frozen
class ToolParseResult:
    content: str  # the text not returned by feed(): held-back tails, unparsed tool text
    calls: tuple[ParsedCall, ...]
    tool_text: bool  # whether any tool-tagged text was seen


# -- block parsers -------------------------------------------------------------------------


def _json_values(text: str) -> Iterator[Any]:
    """Consecutive JSON values in text, separated by whitespace, ``;`` or ``,``."""
    decoder = json.JSONDecoder()
    pos, end = 0, len(text)
    while True:
        while pos < end and (text[pos].isspace() or text[pos] in ";,"):
            pos += 1
        if pos >= end:
            return
        value, pos = decoder.raw_decode(text, pos)
        yield value


def _call(value: Any, *, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall:
    if not isinstance(value, Mapping):
        raise ValueError("a call must be a JSON object")
    if isinstance(value.get("function"), Mapping):  # an OpenAI-shaped call
        value = value["function"]
    name = value.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a call needs a name")
    args: Any = {}
    for key in args_keys:
        if key in value:
            args = value[key]
            break
    if isinstance(args, str):
        # Text that is not JSON is kept: the client still gets what the model wrote.
        with contextlib.suppress(json.JSONDecodeError):
            args = json.loads(args) if args.strip() else {}
    return ParsedCall(name, args)


def parse_calls_json(text: str) -> list[ParsedCall]:
    """Calls written as JSON objects and/or arrays of objects (ValueError if not)."""
    calls: list[ParsedCall] = []
    for value in _json_values(text):
        items = value if isinstance(value, list) else [value]
        calls.extend(_call(item) for item in items)
    if not calls:
        raise ValueError("no calls")
    return calls


_MISTRAL_ARGS = "[ARGS]"


def _parse_mistral(text: str) -> list[ParsedCall]:
    calls: list[ParsedCall] = []
    for part in text.split("[TOOL_CALLS]"):
        if not part.strip():
            continue
        if part.lstrip().startswith(("[", "{")):
            calls.extend(parse_calls_json(part))
            continue
        name, sep, rest = part.partition(_MISTRAL_ARGS)
        name = re.sub(r"\[CALL_ID\].*$", "", name).strip()
        if not sep or not name:
            raise ValueError("expected name[ARGS]{...}")
        values = list(_json_values(rest))
        if len(values) != 1:
            raise ValueError("expected one JSON value of arguments")
        calls.append(ParsedCall(name, values[0]))
    if not calls:
        raise ValueError("no calls")
    return calls


_HERMES = ToolFormat("hermes", ("<tool_call>",), "</tool_call>", parse_calls_json)
_LLAMA3 = ToolFormat("llama3", ("<|python_tag|>",), None, parse_calls_json, leading_json=True)
_MISTRAL = ToolFormat("mistral", ("[TOOL_CALLS]",), None, _parse_mistral)

_AUTO = ToolFormat(
    "auto",
    ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>"),
    None,
    parse_calls_json,
    leading_json=True,
    variants={
        "<tool_call>": _HERMES,
        "[TOOL_CALLS]": _MISTRAL,
        "<|python_tag|>": _LLAMA3,
        "": _LLAMA3,
    },
)

FORMATS: Mapping[str, ToolFormat] = MappingProxyType(
    {
        "auto": _AUTO,
        "hermes": _HERMES,
        "qwen2_5": _HERMES,
        "qwen": _HERMES,
        "chatml_with_tools": _HERMES,
        "tabby": _HERMES,
        "llama3": _LLAMA3,
        "llama3_json": _LLAMA3,
        "llama": _LLAMA3,
        "mistral": _MISTRAL,
        "mistral_old": _MISTRAL,
    }
)


def tool_format(name: str) -> ToolFormat:
    """The format called ``name`` (``InvalidRequest`` naming ``tool_format`` if unknown)."""
    fmt = FORMATS.get(name.lower())
    if fmt is None:
        known = ", ".join(sorted(FORMATS))
        raise InvalidRequest(
            f"tool_format: unknown format {name!r} (known: {known})", param="tool_format"
        )
    return fmt


# Tags that tell which format a chat template writes its calls in, most telling first.
_HINTS: tuple[tuple[str, ToolFormat], ...] = (
    ("<tool_call>", _HERMES),
    ("[TOOL_CALLS]", _MISTRAL),
    ("<|python_tag|>", _LLAMA3),
    ("ipython", _LLAMA3),
)


def hinted_format(template_source: str) -> ToolFormat | None:
    """The format a chat template's own tool calls are written in, if its text says."""
    for marker, fmt in _HINTS:
        if marker in template_source:
            return fmt
    return None


# The start of an untagged block that is a call rather than a JSON answer.
_CALL_START = re.compile(r'\s*\[?\s*\{\s*"(name|function)"')


# -- the streaming splitter ----------------------------------------------------------------


def _held_tail(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could begin one of ``tags``."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if tag.startswith(text[-n:]):
                best = n
                break
    return best


class ToolStreamParser:
    """Splits streamed text into content and tool blocks (one per choice; not thread-safe)."""

    def __init__(self, fmt: ToolFormat, *, names: frozenset[str] | None = None) -> None:
        self._fmt = fmt
        self._names = names
        self._held = ""  # content that may be the start of a tag
        self._block: str | None = None  # the open tool block's text
        self._block_tag = ""
        self._blocks: list[tuple[str, str, bool]] = []  # (opening tag, text, closed)
        self._undecided = fmt.leading_json  # nothing but whitespace seen yet

    def feed(self, text: str) -> str:
        """Take a delta; returns the content that may be shown now."""
        out: list[str] = []
        pending = text
        while pending:
            if self._block is not None:
                pending = self._feed_block(pending)
            else:
                pending = self._feed_content(pending, out)
        return "".join(out)

    def _feed_content(self, text: str, out: list[str]) -> str:
        buf = self._held + text
        self._held = ""
        if self._undecided:
            stripped = buf.lstrip()
            tags = self._fmt.start_tags
            # "[" may open Mistral's [TOOL_CALLS] rather than a JSON array: wait and see.
            if not stripped or any(t.startswith(stripped) and t != stripped for t in tags):
                self._held = buf
                return ""
            self._undecided = False
            if stripped[0] in "{[" and not stripped.startswith(tags):
                self._open("", "")
                return stripped
        hits = [(buf.find(tag), tag) for tag in self._fmt.start_tags if tag in buf]
        if hits:
            at, tag = min(hits)
            out.append(buf[:at])
            self._open(tag, "")
            return buf[at + len(tag) :]
        keep = _held_tail(buf, self._fmt.start_tags)
        out.append(buf[: len(buf) - keep])
        self._held = buf[len(buf) - keep :]
        return ""

    def _open(self, tag: str, text: str) -> None:
        self._block, self._block_tag = text, tag

    def _feed_block(self, text: str) -> str:
        assert self._block is not None
        block = self._block + text
        end = self._fmt.block_format(self._block_tag).end_tag
        at = block.find(end) if end else -1
        if at < 0:
            self._block = block
            return ""
        assert end is not None
        self._blocks.append((self._block_tag, block[:at], True))
        self._block = None
        return block[at + len(end) :] or ""

    def finish(self, *, cut_off: bool = False) -> ToolParseResult:
        """End of generation: parse the tool blocks. ``cut_off``: the reply ran into its
        token limit, so a block still open is an unfinished call."""
        content = [self._held]
        self._held = ""
        last_open = self._block is not None
        if self._block is not None:
            self._blocks.append((self._block_tag, self._block, False))
            self._block = None
        calls: list[ParsedCall] = []
        for i, (tag, text, closed) in enumerate(self._blocks):
            fmt = self._fmt.block_format(tag)
            try:
                parsed = fmt.parse(text)
                if self._names is not None and any(c.name not in self._names for c in parsed):
                    raise ValueError("a call to a function the request does not offer")
                calls.extend(parsed)
            except ValueError:
                unfinished = cut_off and last_open and i == len(self._blocks) - 1
                if unfinished and (tag or _CALL_START.match(text)):
                    continue
                closing = (fmt.end_tag or "") if closed else ""
                content.append(tag + text + closing)
        tagged = any(tag for tag, _, _ in self._blocks) or bool(calls)
        return ToolParseResult("".join(content), tuple(calls), tagged)


def parse_tool_text(text: str, fmt: ToolFormat) -> tuple[str, tuple[ParsedCall, ...]]:
    """The non-streaming form: (content, calls) of a whole reply."""
    parser = ToolStreamParser(fmt)
    shown = parser.feed(text)
    result = parser.finish()
    return shown + result.content, result.calls
