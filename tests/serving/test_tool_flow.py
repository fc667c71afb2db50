"""Chat output shaping (no server): tool modes, reasoning, and the plan they come from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from tabby.backends.scripted import ScriptedBackend
from tabby.config import ModelSettings
from tabby.errors import InvalidRequest
from tabby.http.body import structure_request
from tabby.http.openai.requests import ChatCompletionRequest, chat_request
from tabby.jobs.events import Finished
from tabby.serving.chat_options import ChatOptions, ReasoningTags, open_reasoning
from tabby.serving.planning import plan_chat
from tabby.serving.state import ServingState
from tabby.serving.templating import compile_template, load_named_template
from tabby.serving.tool_flow import ChoiceOutput, ToolPass, tool_pass_job
from tabby.serving.tools import tool_format, tool_policy

REPO = Path(__file__).resolve().parents[2]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
ASK = [{"role": "user", "content": "Hi"}]


def state(template: str = "tool_calls/chatml_with_tools", **settings: Any) -> ServingState:
    backend = ScriptedBackend(name="m", max_seq_len=4096)
    return ServingState(
        epoch=1,
        model=backend.info,
        tokenizer=backend.tokenizer,
        model_name="m",
        template=load_named_template(REPO / "templates", template),
        settings=ModelSettings(**settings),
    )


def plan(body: dict[str, Any], st: ServingState) -> Any:
    request = structure_request({"messages": ASK, **body}, ChatCompletionRequest, st.preset)
    return plan_chat(chat_request(request), st, "r")


def stop(reason: str = "stop", stop_str: str | None = None) -> Finished:
    return Finished(reason, stop_str=stop_str)  # type: ignore[arg-type]


def shape(
    options: ChatOptions, chunks: list[str], finished: Finished | None = None
) -> tuple[str, str, ChoiceOutput]:
    out = ChoiceOutput(options)
    shown = [out.feed(c) for c in chunks] + [out.finish(finished or stop())]
    return "".join(p.reasoning for p in shown), "".join(p.content for p in shown), out


def test_modes_from_the_request_and_the_model() -> None:
    st = state()
    auto = plan({"tools": TOOLS}, st)
    assert auto.chat.tools == "template"
    assert "<tool_call>" in auto.jobs[0].stop_strings
    none = plan({"tools": TOOLS, "tool_choice": "none"}, st)
    assert none.chat.tools == "none"
    assert "<tool_call>" not in none.jobs[0].stop_strings
    forced = plan({"tools": TOOLS, "tool_choice": "required"}, st)
    assert forced.chat.tools == "forced"
    assert forced.prompts[0].text.endswith("<|im_start|>assistant\n<tool_call>")
    assert forced.jobs[0].constraint == forced.chat.tool_constraint()
    hermes = plan({"tools": TOOLS}, state(tool_format="hermes"))
    assert hermes.chat.tools == "format"
    assert "<tool_call>" not in hermes.jobs[0].stop_strings
    with pytest.raises(InvalidRequest) as info:
        plan({"tools": TOOLS, "tool_choice": {"function": {"name": "g"}}}, st)
    assert info.value.param == "tool_choice"


def test_reasoning_on_by_setting_or_an_open_tag() -> None:
    assert plan({}, state("chatml")).chat.reasoning is None
    on = plan({}, state("chatml", reasoning=True)).chat.reasoning
    assert on == ReasoningTags("<think>", "</think>", prefilled=False)
    prefilled = plan({"response_prefix": "<think>"}, state("chatml")).chat.reasoning
    assert prefilled is not None
    assert prefilled.prefilled
    assert open_reasoning("a<think>b", "<think>", "</think>")
    assert not open_reasoning("<think>b</think>c", "<think>", "</think>")


def test_reasoning_split_with_tags_across_chunks() -> None:
    options = ChatOptions(reasoning=ReasoningTags("<think>", "</think>", prefilled=False))
    reasoning, content, out = shape(options, ["<th", "ink>why", " not</thi", "nk> because"])
    assert (reasoning, content) == ("why not", "because")
    assert out.message_reasoning() == "why not"
    assert out.finish_reason(stop()) == "stop"


def test_model_format_calls_and_content() -> None:
    options = ChatOptions("format", tool_policy(TOOLS), tool_format=tool_format("hermes"))
    call = '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    _, content, out = shape(options, ["Sure. ", call[:7], call[7:30], call[30:]])
    assert content == "Sure. "
    assert [(c.function.name, json.loads(c.function.arguments)) for c in out.calls] == [
        ("f", {"a": 1})
    ]
    assert out.finish_reason(stop()) == "tool_calls"
    assert out.message_content() == "Sure. "


def test_forced_calls_hidden_until_parsed_and_dropped_when_cut() -> None:
    options = ChatOptions("forced", tool_policy(TOOLS, "required"), "<tool_call>")
    text = '[{"name": "f", "arguments": {}}]'
    _, content, out = shape(options, [text[:5], text[5:]])
    assert content == ""
    assert out.message_content() is None
    assert out.calls[0].function.arguments == "{}"
    # Cut by max_tokens: half a call is neither a call nor content.
    _, content, out = shape(options, ['[{"name": "f", "argu'], stop("length"))
    assert (content, out.calls, out.message_content()) == ("", (), "")
    assert out.finish_reason(stop("length")) == "length"
    # Ended otherwise without a valid call: the text is not lost.
    _, content, out = shape(options, ['[{"name": "f", "argu'])
    assert content == '[{"name": "f", "argu'



def test_template_second_pass() -> None:
    st = state()
    p = plan({"tools": TOOLS, "max_tokens": 50}, st)
    out = ChoiceOutput(p.chat)
    out.feed("Let me check. ")
    finished = stop("stop", "<tool_call>")
    assert out.wants_tool_pass(finished)
    assert not out.wants_tool_pass(stop("stop", "<|im_end|>"))
    job = tool_pass_job(p, 0, out.raw_text)
    assert job.job_id == "r-0-tool"
    assert job.constraint == p.chat.tool_constraint()
    assert "<tool_call>" not in job.stop_strings
    expected = p.prompts[0].text + "Let me check. <tool_call>"
    assert job.prompt_ids == tuple(p.tokenizer.encode(expected, add_bos=p.chat.add_bos))
    out.add_tool_pass(ToolPass('[{"name": "f", "arguments": {"x": 2}}]', 12, stop()))
    out.finish(finished)
    assert out.message_content() == "Let me check. "
    assert out.finish_reason(finished) == "tool_calls"
    assert out.extra_tokens == 12


def test_forced_call_with_a_constraint_is_refused() -> None:
    with pytest.raises(InvalidRequest) as info:
        plan({"tools": TOOLS, "tool_choice": "required", "regex_pattern": "a+"}, state())
    assert info.value.param == "regex_pattern"
    plain = plan({"regex_pattern": "a+"}, state())
    assert attrs.evolve(plain.jobs[0].constraint, param=None).source == "a+"


def test_tools_reach_a_template_without_tool_support(smollm2_metadata: dict[str, Any]) -> None:
    """SmolLM2's own template knows nothing of tools: the tool prompt and the earlier
    calls are written in, and every call format is looked for."""
    st = attrs.evolve(
        state(), template=compile_template("gguf", smollm2_metadata["tokenizer.chat_template"])
    )
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    auto = plan({"tools": TOOLS, "messages": history}, st)
    prompt = auto.prompts[0].text
    assert prompt.startswith("<|im_start|>system\nYou can call these tools:\n<tools>\n")
    assert '{"name": "f", "parameters": {"type": "object"}}' in prompt
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    ) in prompt
    assert (auto.chat.tools, auto.chat.tool_format) == ("format", tool_format("auto"))
    forced = plan({"tools": TOOLS, "tool_choice": "required"}, st)
    assert forced.prompts[0].text.endswith("<|im_start|>assistant\n<tool_call>")
    # tool_choice none: no tool prompt, but the earlier calls still show.
    none = plan({"tools": TOOLS, "tool_choice": "none", "messages": history}, st)
    assert "You can call" not in none.prompts[0].text
    assert "<tool_call>" in none.prompts[0].text
