"""Tool policy and call schema, model-format parsers over every chunking, OpenAI shaping."""

from __future__ import annotations

import json
import random
import re
from typing import Any

import jsonschema
import numpy as np
import pytest

from tabby.backends.constraints import ConstraintCompiler, validate
from tabby.engine.tokenizer import EngineTokenizer
from tabby.errors import InvalidRequest
from tabby.serving.templating import build_variables
from tabby.serving.tools import (
    ParsedCall,
    ToolStreamParser,
    calls_from_constrained,
    check_tool_messages,
    hinted_format,
    parse_tool_text,
    prompt_format,
    reassemble,
    tool_calls,
    tool_format,
    tool_policy,
    tool_prompt,
    with_tool_prompt,
    with_written_calls,
    written_calls,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}
TOOLS = (WEATHER, ADD, NOW)


# -- policy --------------------------------------------------------------------------------------


def test_default_choice() -> None:
    assert tool_policy(TOOLS).mode == "auto"
    assert tool_policy(None).mode == "none"
    assert tool_policy((), "auto").mode == "none"
    assert tool_policy(TOOLS, "none").mode == "none"
    named = tool_policy(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert (named.mode, named.forced) == ("required", "add")


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (TOOLS, {"type": "function", "function": {"name": "nosuch"}}, "tool_choice"),
        (TOOLS, {"type": "function"}, "tool_choice"),
        (TOOLS, "sometimes", "tool_choice"),
        ((), "required", "tool_choice"),
        ((WEATHER, WEATHER), None, "tools[1].function.name"),
        (({"type": "retrieval"},), None, "tools[0].type"),
        (({"type": "function", "function": {"description": "x"}},), None, "tools[0].function.name"),
        (
            ({"type": "function", "function": {"name": "f", "parameters": {"type": 5}}},),
            None,
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tool_fields(tools: Any, choice: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        tool_policy(tools, choice)
    assert info.value.param == param
    assert info.value.status == 400
    assert info.value.message.startswith(param)


def _call(name: str, arguments: Any) -> dict[str, Any]:
    return {"name": name, "arguments": arguments}


GOOD = [_call("get_weather", {"city": "Oslo", "unit": "c"}), _call("add", {"a": 1, "b": 2})]
BAD = [
    [],
    [_call("nosuch", {})],
    [_call("add", {"a": "1", "b": 2})],
    [_call("get_weather", {"city": "Oslo"})],
    [{"name": "add", "arguments": {"a": 1, "b": 2}, "extra": 1}],
    [{"name": "add"}],
]


def test_call_schema_parallel() -> None:
    schema = tool_policy(TOOLS).call_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(GOOD, schema)
    jsonschema.validate([_call("now", {"anything": True})], schema)
    for bad in BAD:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_call_schema_single_and_forced() -> None:
    single = tool_policy(TOOLS, "required", parallel_tool_calls=False).call_schema()
    jsonschema.validate(GOOD[:1], single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(GOOD, single)
    forced = tool_policy(TOOLS, {"type": "function", "function": {"name": "add"}}).call_schema()
    jsonschema.validate(GOOD[1:], forced)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(GOOD[:1], forced)


# -- the call schema as a constraint on a real tokenizer --------------------------------------------
# (``tokenizer`` and ``compiler`` are SmolLM2's, from conftest.)


def _walk(compiler: ConstraintCompiler, tok: EngineTokenizer, spec: Any, seed: int) -> str:
    """Random allowed tokens, leaning towards closing characters, until the constraint ends."""
    masker = compiler.masker(spec)
    closing = np.array([any(c in b for c in b'"]}') for b in tok.vocab_bytes()], dtype=bool)
    rng = random.Random(seed)
    out: list[int] = []
    while not masker.is_finished():
        assert len(out) < 400, tok.decode(out)
        allowed = masker.allowed()
        assert allowed is not None
        mask = np.asarray(allowed)[: closing.size].copy()
        mask[tok.eos_token_id] = False
        lean = mask & closing
        ids = np.flatnonzero(lean if lean.any() and rng.random() < 0.3 else mask)
        token = int(ids[rng.randrange(ids.size)])
        masker.consume(token)
        out.append(token)
    return tok.decode(out)


@pytest.mark.parametrize(
    ("choice", "parallel"),
    [
        ("required", True),
        ("required", False),
        ({"type": "function", "function": {"name": "add"}}, True),
    ],
)
def test_constrained_calls_always_valid(
    tokenizer: EngineTokenizer, compiler: ConstraintCompiler, choice: Any, parallel: bool
) -> None:
    policy = tool_policy(TOOLS, choice, parallel)
    spec = policy.constraint()
    validate(spec, compiler)
    params = {t.name: t.parameters for t in policy.tools}
    for seed in range(8):
        text = _walk(compiler, tokenizer, spec, seed)
        jsonschema.validate(json.loads(text), policy.call_schema())
        calls = tool_calls(calls_from_constrained(text))
        assert calls
        if not parallel:
            assert len(calls) == 1
        for call in calls:
            assert call.function.name in (policy.forced or call.function.name,)
            jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])


# -- parsers over every chunking ---------------------------------------------------------------

CASES = [
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
        '"unit": "c"}}\n</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}'
        "</tool_call>",
        "Let me check.\n\n",
        [
            ParsedCall("get_weather", {"city": "Oslo", "unit": "c"}),
            ParsedCall("add", {"a": 1, "b": 2}),
        ],
    ),
    (
        "tabby",
        'Sure <tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}, '
        '{"name": "now", "arguments": {}}]</tool_call>',
        "Sure ",
        [ParsedCall("add", {"a": 1, "b": 2}), ParsedCall("now", {})],
    ),
    ("hermes", "No tools < here <tool", "No tools < here <tool", []),
    (
        "hermes",
        "a <tool_call>{broken</tool_call> b",
        "a  b<tool_call>{broken</tool_call>",
        [],
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}',
        "",
        [ParsedCall("add", {"a": 1, "b": 2})],
    ),
    (
        "llama3",
        ' \n{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "now", "parameters": {}}',
        "",
        [ParsedCall("add", {"a": 1, "b": 2}), ParsedCall("now", {})],
    ),
    ("llama3", '{"answer": 42}', '{"answer": 42}', []),
    ("llama3", "Plain {text} <|python", "Plain {text} <|python", []),
    (
        "mistral",
        'Ok.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]',
        "Ok.",
        [ParsedCall("add", {"a": 1, "b": 2})],
    ),
    (
        "mistral",
        '[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}[TOOL_CALLS]now[ARGS]{}',
        "",
        [ParsedCall("add", {"a": 1, "b": 2}), ParsedCall("now", {})],
    ),
]


def _chunked(fmt: str, chunks: list[str]) -> tuple[str, tuple[ParsedCall, ...]]:
    parser = ToolStreamParser(tool_format(fmt))
    shown = "".join(parser.feed(c) for c in chunks)
    result = parser.finish()
    return shown + result.content, result.calls


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
def test_parser_every_chunking(fmt: str, text: str, content: str, calls: list[ParsedCall]) -> None:
    assert parse_tool_text(text, tool_format(fmt)) == (content, tuple(calls))
    for cut in range(len(text) + 1):
        assert _chunked(fmt, [text[:cut], text[cut:]]) == (content, tuple(calls)), cut
    assert _chunked(fmt, list(text)) == (content, tuple(calls))


def test_parser_holds_back_partial_tag_only() -> None:
    parser = ToolStreamParser(tool_format("hermes"))
    assert parser.feed("Hello <tool") == "Hello "
    assert parser.feed("box> ok") == "<toolbox> ok"
    assert parser.feed(" <tool_c") == " "
    assert parser.feed('all>{"name": "now", "arguments": {}}</tool_call>') == ""
    result = parser.finish()
    assert result.calls == (ParsedCall("now", {}),)
    assert result.tool_text


def test_unknown_format() -> None:
    with pytest.raises(InvalidRequest) as info:
        tool_format("nosuch")
    assert info.value.param == "tool_format"


# -- shaping and follow-up turns ------------------------------------------------------------------


def test_openai_shape_and_stream_reassembly() -> None:
    calls = tool_calls([ParsedCall("add", {"a": 1, "b": 2}), ParsedCall("now", {})])
    assert len({c.id for c in calls}) == 2
    for call in calls:
        assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
        assert isinstance(call.function.arguments, str)
    whole = [c.to_dict() for c in calls]
    assert whole[0] == {
        "id": calls[0].id,
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
    }
    deltas = [c.delta(i) for i, c in enumerate(calls)]
    assert [d["index"] for d in deltas] == [0, 1]
    assert reassemble(deltas) == whole
    # A client also folds calls whose arguments arrive in pieces.
    pieces = [
        {"index": 0, "id": calls[0].id, "type": "function", "function": {"name": "add"}},
        {"index": 0, "function": {"arguments": '{"a": 1, '}},
        {"index": 0, "function": {"arguments": '"b": 2}'}},
        deltas[1],
    ]
    assert reassemble(pieces) == whole


def test_calls_from_cut_short_pass() -> None:
    assert calls_from_constrained('[{"name": "add", "arguments": {"a": 1') == ()


def test_follow_up_turns() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "add"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    check_tool_messages(messages)
    prepared = build_variables(messages, bos_token=None, eos_token=None)["messages"]
    # As Hugging Face templates expect: arguments as objects, content always a string,
    # the tool's answer named after its function.
    assert prepared[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert prepared[1]["content"] == ""
    assert prepared[2]["name"] == "add"
    with pytest.raises(InvalidRequest) as info:
        check_tool_messages([{"role": "tool", "content": "3"}])
    assert info.value.param == "messages[0].tool_call_id"
    bad_call = {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}
    with pytest.raises(InvalidRequest) as info:
        check_tool_messages([bad_call])
    assert info.value.param == "messages[0].tool_calls[0].function.name"


def test_auto_format_reads_every_family() -> None:
    auto = tool_format("auto")
    cases = {
        '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call> after': ("f", " after"),
        '{"name": "f", "parameters": {"a": 1}}': ("f", ""),
        '<|python_tag|>{"name": "f", "parameters": {"a": 1}}': ("f", ""),
        '[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}]': ("f", ""),
        '[TOOL_CALLS]f[ARGS]{"a": 1}': ("f", ""),
    }
    for text, (name, content) in cases.items():
        # Fed one character at a time: tags split anywhere still open their block.
        parser = ToolStreamParser(auto, names=frozenset({"f"}))
        shown = "".join(parser.feed(ch) for ch in text)
        result = parser.finish()
        assert [(c.name, c.arguments) for c in result.calls] == [(name, {"a": 1})], text
        assert shown + result.content == content, text
    # A JSON answer, or a call of a function not offered, is content.
    for text in ('[1, 2]', '{"name": "Bob", "age": 3}', "[not json"):
        parser = ToolStreamParser(auto, names=frozenset({"f"}))
        shown = parser.feed(text)
        result = parser.finish()
        assert (shown + result.content, result.calls) == (text, ()), text


def test_a_call_cut_off_is_dropped() -> None:
    auto = tool_format("auto")
    for text, kept in (
        ('Sure. <tool_call>{"name": "f", "argu', "Sure. "),
        ('{"name": "f", "parameters": {"a"', ""),
        ('[TOOL_CALLS] [{"name": "f"', ""),
        ('{"answer": 4', '{"answer": 4'),  # JSON that is no call stays the answer
    ):
        parser = ToolStreamParser(auto)
        shown = parser.feed(text)
        result = parser.finish(cut_off=True)
        assert (shown + result.content, result.calls) == (kept, ()), text
        # Not cut off: nothing is lost.
        parser = ToolStreamParser(auto)
        assert parser.feed(text) + parser.finish().content == text


def test_hinted_format_and_prompt_format() -> None:
    assert hinted_format("... <tool_call> ...") == tool_format("hermes")
    assert hinted_format("{{ '[TOOL_CALLS]' }}") == tool_format("mistral")
    assert hinted_format("<|start_header_id|>ipython") == tool_format("llama3")
    assert hinted_format("{{ message.content }}") is None
    assert prompt_format("mistral", "<tool_call>", takes_tools=True) == tool_format("mistral")
    assert prompt_format(None, "<tool_call>", takes_tools=True) == tool_format("hermes")
    assert prompt_format(None, "{{ tools }}", takes_tools=True) is None
    assert prompt_format(None, "plain", takes_tools=False) == tool_format("hermes")


def test_tool_prompt_and_written_calls() -> None:
    policy = tool_policy(
        [{"type": "function", "function": {"name": "add", "description": "Adds",
                                            "parameters": {"type": "object"}}}]
    )  # fmt: skip
    block = tool_prompt(policy.tools, tool_format("hermes"))
    assert '{"name": "add", "description": "Adds", "parameters": {"type": "object"}}' in block
    assert '<tool_call>\n{"name": "<tool name>"' in block
    assert "[TOOL_CALLS]" in tool_prompt(policy.tools, tool_format("mistral"))
    messages = [{"role": "user", "content": "hi"}]
    assert with_tool_prompt(messages, "B") == [
        {"role": "system", "content": "B"}, {"role": "user", "content": "hi"}
    ]  # fmt: skip
    system = [{"role": "system", "content": "Be brief."}, *messages]
    assert with_tool_prompt(system, "B")[0] == {"role": "system", "content": "Be brief.\n\nB"}
    call = {"id": "c", "type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    turn = {"role": "assistant", "content": "", "tool_calls": [call]}
    written = with_written_calls([turn], tool_format("hermes"))[0]
    assert written["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    assert written_calls([("add", {"a": 1})], tool_format("llama3")) == (
        '{"name": "add", "parameters": {"a": 1}}'
    )
    assert written_calls([("add", {})], tool_format("mistral")) == (
        '[TOOL_CALLS][{"name": "add", "arguments": {}}]'
    )
