"""Tools with no ``tool_format`` configured, through a real server and the ``openai`` client.

The server runs the scripted backend (``tabby.backends.scripted``): its answer is a
function of the prompt it was given, so a test can see what reached the model (the
tools, in the template's own way or in the tool prompt) and script the calls a model
writes in each common format (Hermes/Qwen, Llama 3 JSON, Mistral).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
from openai.types.chat import ChatCompletionToolParam

from tabby.backends.base import LoadSpec, ProgressCallback
from tabby.backends.registry import BackendEntry, BackendRegistry, default_registry
from tabby.backends.scripted import ScriptedBackend
from tabby.config import NetworkConfig, TabbyConfig
from tabby.config.schema import EmbeddingsConfig, ModelConfigSection
from tabby.jobs import GenerationJob
from tabby.serving.tools import reassemble
from tests.conftest import assert_call_cut_off

REPO = Path(__file__).resolve().parents[2]
DESCRIPTION = "The current weather in a city"
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": DESCRIPTION,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
PARIS = {"city": "Paris"}
# What a model of each family writes to call get_weather, by the word the user's last
# message ends with.
REPLIES = {
    "hermes": 'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
    "\n</tool_call>",
    "qwen": '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "mistral": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    "unknown": '{"name": "Bob", "age": 3}',
}
# A template with tool support of its own (as Qwen's): it lists the tools itself.
OWN_TOOLS_TEMPLATE = """\
{%- set stop_strings = ["<|im_end|>"] -%}
{%- if tools -%}
{{ "<|im_start|>system\\n# Tools\\n<tools>\\n" }}
{%- for tool in tools -%}{{ tool.function | tojson }}{%- endfor -%}
{{ "\\n</tools>\\nCall with <tool_call>{...}</tool_call><|im_end|>\\n" }}
{%- endif -%}
{%- for message in messages -%}
{{ "<|im_start|>" + message.role + "\\n" + message.content + "<|im_end|>\\n" }}
{%- endfor -%}
{{ "<|im_start|>assistant\\n" }}
"""


def reply(job: GenerationJob) -> str:
    prompt = bytes(i for i in job.prompt_ids if i < 256).decode()
    if DESCRIPTION not in prompt:
        return "I know of no tools."
    if prompt.count(DESCRIPTION) != 1:
        return "The tools were shown twice."
    if "You can call these tools" in prompt and "# Tools" in prompt:
        return "The tool prompt was added to a template that shows tools itself."
    asked = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0]
    return REPLIES.get(asked.rsplit(" ", 1)[-1], "Nothing to call.")


def registry() -> BackendRegistry:
    def load(spec: LoadSpec, _progress: ProgressCallback) -> ScriptedBackend:
        return ScriptedBackend(name=spec.name, path=str(spec.path), script=reply)

    return default_registry().with_entry(BackendEntry("reference", load))


def config(tmp_path: Path, template: str) -> TabbyConfig:
    templates = tmp_path / "templates"
    shutil.copytree(REPO / "templates", templates)
    (templates / "own_tools.jinja").write_text(OWN_TOOLS_TEMPLATE)
    return TabbyConfig(
        network=NetworkConfig(host="127.0.0.1", port=0, disable_auth=True, shutdown_grace=1.0),
        model=ModelConfigSection(
            model_dir=str(tmp_path / "models"),
            templates_dir=str(templates),
            prompt_template=template,
            dummy_model_names=("m",),  # the name the clients below send
        ),
        embeddings=EmbeddingsConfig(embedding_model_name=None),
        base_dir=tmp_path,
    )


def ask(word: str) -> list[Any]:
    return [{"role": "user", "content": f"Weather, please, as {word}"}]


def calls_of(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


async def check_formats(client: openai.AsyncOpenAI) -> None:
    expected = {
        "hermes": [("get_weather", PARIS)],
        "qwen": [("get_weather", PARIS), ("get_weather", {"city": "Rome"})],
        "llama3": [("get_weather", PARIS)],
        "mistral": [("get_weather", PARIS)],
    }
    for word, calls in expected.items():
        answer = await client.chat.completions.create(
            model="m", messages=ask(word), tools=TOOLS, tool_choice="auto", max_tokens=200
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls", (word, choice)
        assert calls_of(choice.message) == calls, word
        assert choice.message.content == ("Let me look. " if word == "hermes" else None)
        stream = await client.chat.completions.create(
            model="m", messages=ask(word), tools=TOOLS, max_tokens=200, stream=True
        )
        deltas: list[dict[str, Any]] = []
        content = ""
        async for chunk in stream:
            for part in chunk.choices:
                content += part.delta.content or ""
                deltas.extend(d.model_dump(exclude_none=True) for d in part.delta.tool_calls or ())
        streamed = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in
                    reassemble(deltas)]  # fmt: skip
        assert streamed == calls, word
        assert "<tool_call>" not in content
        assert "[TOOL_CALLS]" not in content
    # JSON that does not call one of the request's functions is the answer's text.
    answer = await client.chat.completions.create(
        model="m", messages=ask("unknown"), tools=TOOLS, max_tokens=200
    )
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content == REPLIES["unknown"]
    # Without tools nothing is described or parsed.
    plain = await client.chat.completions.create(model="m", messages=ask("hermes"), max_tokens=200)
    assert plain.choices[0].message.content == "I know of no tools."


async def test_auto_without_tool_format_on_a_plain_template(
    live_server: Callable[..., Awaitable[Any]], tmp_path: Path
) -> None:
    """chatml shows no tools: the tool prompt brings them, and every format is read."""
    server = await live_server(config(tmp_path, "chatml"), registry=registry())
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    await check_formats(client)
    # A required call cut off by max_tokens is "length", with nothing half-parsed shown.
    await assert_call_cut_off(
        client, model="m", messages=ask("mistral"), tools=TOOLS, tool_choice="required",
        max_tokens=12,
    )  # fmt: skip
    # So is an auto call cut off in the model's own format.
    cut = await client.chat.completions.create(
        model="m", messages=ask("hermes"), tools=TOOLS, max_tokens=30
    )
    assert cut.choices[0].finish_reason == "length"
    assert cut.choices[0].message.content == "Let me look. "
    assert cut.choices[0].message.tool_calls is None


async def test_auto_without_tool_format_on_a_template_with_tools(
    live_server: Callable[..., Awaitable[Any]], tmp_path: Path
) -> None:
    """A template that lists the tools itself gets them, without the tool prompt."""
    server = await live_server(config(tmp_path, "own_tools"), registry=registry())
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    await check_formats(client)
