"""Tool calling through /v1/chat/completions on the embedded SmolLM2 with the shipped
tool template (``tool_calls/chatml_with_tools``), with the official ``openai`` client.

One server for the module (loading the model is the expensive part). Forced calls
(``required``, a named function) are constrained from the first token, so they must
validate on every seed; ``auto`` uses a conversation in which the model has called the
tool before, which makes greedy SmolLM2 call it again (the template way: it stops on
``<tool_call>`` and a second, constrained pass writes the call).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import trio
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tabby.serving.tools import reassemble
from tests.conftest import REPO, assert_call_cut_off, start_smollm2

WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 24}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": WEATHER_PARAMS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a zone",
            "parameters": TIME_PARAMS,
        },
    },
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris?"}
]
EARLIER_CALL = {
    "id": "call_0",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
}
# A conversation in which the model called the tool before: greedy SmolLM2 calls again.
FOLLOW_UP: list[ChatCompletionMessageParam] = [
    *ASK,
    {"role": "assistant", "content": None, "tool_calls": [EARLIER_CALL]},  # type: ignore[list-item]
    {"role": "tool", "tool_call_id": "call_0", "content": "sunny, 24 C"},
    {"role": "assistant", "content": "It is sunny and 24 C in Paris."},
    {"role": "user", "content": "What is the weather in London?"},
]


def check_calls(calls: list[dict[str, Any]], names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call["type"] == "function"
        assert call["id"].startswith("call_")
        function = call["function"]
        assert function["name"] in names
        jsonschema.validate(json.loads(function["arguments"]), SCHEMAS[function["name"]])


def dumped_calls(message: Any) -> list[dict[str, Any]]:
    return [call.model_dump() for call in message.tool_calls or ()]


def without_ids(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**call, "id": None} for call in calls]


async def test_tool_calls(nursery: trio.Nursery, tmp_path: Path) -> None:
    info = await start_smollm2(nursery, tmp_path, prompt_template="tool_calls/chatml_with_tools")
    client = openai.AsyncOpenAI(base_url=info.urls[0] + "/v1", api_key="unused", max_retries=0)

    async def forced(choice: Any, seed: int, **extra: Any) -> Any:
        return await client.chat.completions.create(
            model="m", messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=80,
            temperature=1, seed=seed, **extra,
        )  # fmt: skip

    # required: some tool, always valid; a named function: that one. Several seeds.
    named = {"type": "function", "function": {"name": "get_time"}}
    first: Any = None
    for seed in range(5):
        answer = (await forced("required", seed)).choices[0]
        first = first or answer
        assert answer.finish_reason == "tool_calls"
        assert answer.message.content is None
        check_calls(dumped_calls(answer.message), set(SCHEMAS))
        answer = (await forced(named, seed, parallel_tool_calls=False)).choices[0]
        calls = dumped_calls(answer.message)
        assert len(calls) == 1
        check_calls(calls, {"get_time"})

    # Streaming deltas reassemble to the non-streaming calls (same seed).
    stream = await forced("required", 0, stream=True)
    deltas: list[dict[str, Any]] = []
    finish = None
    async for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.content
            deltas.extend(d.model_dump(exclude_none=True) for d in choice.delta.tool_calls or ())
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert all("index" in d for d in deltas)
    streamed = reassemble(deltas)
    assert without_ids(streamed) == without_ids(dumped_calls(first.message))

    # auto, the template way: the model writes <tool_call> and a constrained pass the call.
    answer = (
        await client.chat.completions.create(
            model="m", messages=FOLLOW_UP, tools=TOOLS, max_tokens=60, temperature=0
        )
    ).choices[0]
    assert answer.finish_reason == "tool_calls"
    calls = dumped_calls(answer.message)
    check_calls(calls, set(SCHEMAS))
    assert json.loads(calls[0]["function"]["arguments"])["city"] == "London"
    stream = await client.chat.completions.create(
        model="m", messages=FOLLOW_UP, tools=TOOLS, max_tokens=60, temperature=0, stream=True
    )
    deltas = [
        d.model_dump(exclude_none=True)
        async for chunk in stream
        for choice in chunk.choices
        for d in choice.delta.tool_calls or ()
    ]
    assert without_ids(reassemble(deltas)) == without_ids(calls)

    # The round trip: the call's result goes back and the model answers in text.
    result = "Rainy, 12 degrees celsius."
    round_trip: Any = [
        *FOLLOW_UP,
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": result},
    ]
    final = await client.chat.completions.create(
        model="m", messages=round_trip, tools=TOOLS, tool_choice="none", max_tokens=30,
        temperature=0,
    )  # fmt: skip
    message = final.choices[0].message
    assert final.choices[0].finish_reason in ("stop", "length")
    assert message.tool_calls is None
    assert message.content

    # tool_choice none: no calls and <tool_call> is not a stop string (it stays text).
    plain = await client.chat.completions.create(
        model="m", messages=FOLLOW_UP, tools=TOOLS, tool_choice="none", max_tokens=12,
        temperature=0,
    )  # fmt: skip
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].message.content
    assert plain.choices[0].finish_reason != "tool_calls"

    # Bad requests name the field.
    async with httpx.AsyncClient(base_url=info.urls[0]) as http:
        bad_choice = {"type": "function", "function": {"name": "nope"}}
        for body, param in (
            ({"tools": TOOLS, "tool_choice": bad_choice}, "tool_choice"),
            ({"tools": TOOLS, "tool_choice": "required", "regex_pattern": "a"}, "regex_pattern"),
            ({"tool_choice": "required"}, "tool_choice"),
        ):
            response = await http.post(
                "/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body}
            )
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == param
    info.shutdown()


BUNDLED_TEMPLATES = sorted(
    path.relative_to(REPO / "templates").with_suffix("").as_posix()
    for path in (REPO / "templates").rglob("*.jinja")
)


async def test_round_trip_with_every_template(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The assistant message goes back as the client built it (``content: None`` and
    ``tool_calls``) with the tool's result, under the model's own template and every
    bundled one, with or without tools and for every ``tool_choice``."""
    info = await start_smollm2(nursery, tmp_path)  # the GGUF's own template
    url = info.urls[0]
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    named = {"type": "function", "function": {"name": "get_weather"}}
    # Without tool support in the template, a required call still comes (the tool prompt
    # shows the tools); a loose-schema call cut off by max_tokens is "length", no content.
    loose: list[ChatCompletionToolParam] = [
        {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    ]
    await assert_call_cut_off(
        client, model="m", messages=ASK, tools=loose, tool_choice="required", max_tokens=6,
        temperature=0,
    )  # fmt: skip
    for template in [None, *BUNDLED_TEMPLATES]:
        if template is not None:
            async with httpx.AsyncClient(base_url=url) as http:
                switched = await http.post(
                    "/v1/template/switch", json={"prompt_template_name": template}
                )
                assert switched.status_code == 200, switched.text
        asked = await client.chat.completions.create(
            model="m", messages=ASK, tools=TOOLS, tool_choice=named, max_tokens=60,
            temperature=0,
        )  # fmt: skip
        message = asked.choices[0].message
        assert message.content is None
        assert message.tool_calls
        # What a client appends: the message object itself, then the tool's answer.
        history: list[Any] = [
            *ASK,
            message,
            {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny, 24 C"},
        ]
        choices: list[dict[str, Any]] = [
            {},
            {"tools": TOOLS},
            *({"tools": TOOLS, "tool_choice": c} for c in ("none", "auto", "required", named)),
        ]
        for extra in choices:
            answer = await client.chat.completions.create(
                model="m", messages=history, max_tokens=60, temperature=0, **extra
            )
            choice = answer.choices[0]
            if extra.get("tool_choice") in ("required", named):
                assert choice.finish_reason == "tool_calls", (template, extra, choice)
            elif "tools" in extra and extra.get("tool_choice") != "none":
                # The model may answer or call again (a call it did not finish in time is
                # no content); never half a call as text.
                message = choice.message
                assert choice.finish_reason in ("stop", "length", "tool_calls"), (template, choice)
                assert "<tool_call>" not in (message.content or ""), (template, choice)
            else:
                assert choice.finish_reason in ("stop", "length"), (template, extra, choice)
                assert choice.message.tool_calls is None
                # Under a template of another family the tiny ChatML model may end its
                # turn at once; under its own it answers.
                assert choice.message.content or template is not None, (extra, choice)
    info.shutdown()
