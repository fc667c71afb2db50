"""Structured output (json_schema, response_format, regex, grammar) on the embedded
SmolLM2 through the real server, with the official ``openai`` client.

Sampling at temperature 1 with fixed seeds: a random reply that still validates is
the point. One server for the module (loading the model is the expensive part).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import trio
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import start_smollm2

ASK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Describe a cat called Tom as JSON."}
]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "indoor": {"type": "boolean"},
    },
    "required": ["name", "age", "indoor"],
    "additionalProperties": False,
}
REGEX = r"(yes|no), [a-z]{2,8}"
# Lark: a JSON-style list of one to three small numbers, so json.loads parses it.
LARK = 'start: "[" NUM (", " NUM)~0..2 "]"\nNUM: /[1-9][0-9]?/'
GBNF = 'root ::= "The answer is " ("yes" | "no") "."'


async def test_structured_output(nursery: trio.Nursery, tmp_path: Path) -> None:
    info = await start_smollm2(nursery, tmp_path)
    client = openai.AsyncOpenAI(base_url=info.urls[0] + "/v1", api_key="unused", max_retries=0)

    async def chat(
        seed: int = 1, max_tokens: int = 60, temperature: float = 1, messages: Any = ASK,
        **extra: Any,
    ) -> str:  # fmt: skip
        answer = await client.chat.completions.create(
            model="m", messages=messages, max_tokens=max_tokens, temperature=temperature, seed=seed,
            **extra,
        )  # fmt: skip
        content = answer.choices[0].message.content
        assert isinstance(content, str)
        return content

    # json_schema (a request field) and response_format: the output validates.
    for seed in range(2):
        jsonschema.validate(
            json.loads(await chat(seed, extra_body={"json_schema": SCHEMA})), SCHEMA
        )
    wrapped = {"type": "json_schema", "json_schema": {"name": "cat", "schema": SCHEMA}}
    jsonschema.validate(json.loads(await chat(response_format=wrapped)), SCHEMA)  # type: ignore[arg-type]
    # Any object (free text inside may run past max_tokens: a prompt that gives {}).
    weather: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the weather in Paris?"}
    ]
    any_object = await chat(
        temperature=0, messages=weather, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(any_object), dict)

    # Streaming: the same seed gives the same constrained text.
    stream = await client.chat.completions.create(
        model="m", messages=ASK, max_tokens=60, temperature=1, seed=0, stream=True,
        extra_body={"json_schema": SCHEMA},
    )  # fmt: skip
    streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert streamed == await chat(0, extra_body={"json_schema": SCHEMA})

    # regex_pattern and grammar_string (Lark, and GBNF when it has ::=).
    for seed in range(2):
        assert re.fullmatch(REGEX, await chat(seed, extra_body={"regex_pattern": REGEX}))
    numbers = json.loads(await chat(extra_body={"grammar_string": LARK}))
    assert 1 <= len(numbers) <= 3
    assert all(1 <= n <= 99 for n in numbers)
    assert re.fullmatch(
        r"The answer is (yes|no)\.", await chat(extra_body={"grammar_string": GBNF})
    )

    # Without reasoning on (and no <think> in the prompt), tags are plain content.
    tagged = await chat(extra_body={"regex_pattern": "<think>[a-z]{1,6}</think>[a-z]{1,6}"})
    assert tagged.startswith("<think>")

    # Completions take constraints too.
    completion = await client.completions.create(
        model="m", prompt="Is water wet?", max_tokens=20, temperature=1, seed=3,
        extra_body={"regex_pattern": REGEX},
    )  # fmt: skip
    assert re.fullmatch(REGEX, completion.choices[0].text)

    # {} is no constraint: the same output as without one.
    free = await chat(5, max_tokens=12)
    assert await chat(5, max_tokens=12, extra_body={"json_schema": {}}) == free

    # A constrained and an unconstrained job in one batch: the unconstrained one equals
    # its solo output (same seed), and the constrained one still validates.
    outputs: dict[str, str] = {}

    async def put(key: str, **extra: Any) -> None:
        outputs[key] = await chat(9, max_tokens=24, **extra)

    async with trio.open_nursery() as batch:
        batch.start_soon(lambda: put("free"))
        batch.start_soon(lambda: put("json", extra_body={"json_schema": SCHEMA}))
    assert outputs["free"] == await chat(9, max_tokens=24)
    jsonschema.validate(json.loads(outputs["json"]), SCHEMA)

    # Invalid constraints are a 400 naming the field, never silently unconstrained.
    async with httpx.AsyncClient(base_url=info.urls[0]) as http:
        for body, param in (
            ({"json_schema": {"type": "nope"}}, "json_schema"),
            ({"regex_pattern": "(unclosed"}, "regex_pattern"),
            ({"grammar_string": "start: undefined_rule"}, "grammar_string"),
            ({"grammar_string": "root ::= missing"}, "grammar_string"),
            ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
            ({"response_format": {"type": "xml"}}, "response_format.type"),
        ):
            for path, key, value in (
                ("/v1/chat/completions", "messages", ASK),
                ("/v1/completions", "prompt", "Hi"),
            ):
                response = await http.post(path, json={key: value, "max_tokens": 4, **body})
                assert response.status_code == 400, (body, response.text)
                assert response.json()["error"]["param"] == param, response.text
    info.shutdown()
