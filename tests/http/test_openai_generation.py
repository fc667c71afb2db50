"""Request validation and job planning of the OpenAI endpoints (no server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest

from tabby.backends.scripted import BOS_ID, ScriptedBackend
from tabby.errors import ContextLengthExceeded, InvalidRequest, Unprocessable
from tabby.http.body import structure_request
from tabby.http.openai.format import TextChunkEncoder, chat_logprobs, completion_logprobs
from tabby.http.openai.requests import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_request,
    completion_request,
)
from tabby.http.openai.responses import ChatChunk, ChatChunkChoice, ChatDelta, dump
from tabby.jobs import ConstraintSpec, TokenLogprob
from tabby.serving import requests as neutral
from tabby.serving.planning import plan_chat, plan_completion, render_chat
from tabby.serving.presets import preset_from_dict
from tabby.serving.state import ServingState
from tabby.serving.templating import load_named_template

REPO = Path(__file__).resolve().parents[2]
HELLO = [{"role": "user", "content": "Hello"}]


def state(**changes: Any) -> ServingState:
    backend = ScriptedBackend(name="m", max_seq_len=64)
    base = ServingState(
        epoch=3,
        model=backend.info,
        tokenizer=backend.tokenizer,
        model_name="m",
        template=load_named_template(REPO / "templates", "chatml"),
    )
    return attrs.evolve(base, **changes)


def chat_body(body: dict[str, Any], st: ServingState | None = None) -> ChatCompletionRequest:
    return structure_request(body, ChatCompletionRequest, (st or state()).preset)


def chat(body: dict[str, Any], st: ServingState | None = None) -> neutral.ChatRequest:
    return chat_request(chat_body(body, st))


def completion(body: dict[str, Any], st: ServingState | None = None) -> neutral.CompletionRequest:
    raw = structure_request(body, CompletionRequest, (st or state()).preset)
    return completion_request(raw)


def test_aliases_and_preset_apply_before_validation() -> None:
    preset = preset_from_dict("p", {"temperature": {"override": 0.5}, "n": {"override": 2}})
    request = chat_body(
        {"messages": HELLO, "max_completion_tokens": 7, "chat_template_kwargs": {"x": 1}},
        state(preset=preset),
    )
    assert (request.max_tokens, request.temperature, request.n) == (7, 0.5, 2)
    assert request.template_vars == {"x": 1}
    # The client's own value wins over a non-forced override.
    body = {"messages": HELLO, "temperature": 0.1}
    assert chat_body(body, state(preset=preset)).temperature == 0.1


def test_completion_batch_jobs_and_seeds() -> None:
    request = completion({"prompt": ["ab", "cde"], "n": 2, "seed": 10, "max_tokens": 5})
    plan = plan_completion(request, state(), "rid")
    assert [job.job_id for job in plan.jobs] == ["rid-0", "rid-1", "rid-2", "rid-3"]
    # The model adds BOS unless the request says otherwise.
    assert [job.prompt_ids for job in plan.jobs] == [(BOS_ID, 97, 98)] * 2 + [
        (BOS_ID, 99, 100, 101)
    ] * 2
    assert [job.seed for job in plan.jobs] == [10, 11, 12, 13]
    assert all(job.max_new_tokens == 5 for job in plan.jobs)
    assert [plan.prompt_index(i) for i in range(4)] == [0, 0, 1, 1]
    assert plan.epoch == 3
    # add_bos_token false drops it; null max_tokens fills the context.
    plain = plan_completion(completion({"prompt": "ab", "add_bos_token": False}), state(), "r")
    assert plain.jobs[0].prompt_ids == (97, 98)
    assert plain.jobs[0].max_new_tokens == 64 - 2


def test_context_overflow_names_the_prompt() -> None:
    with pytest.raises(ContextLengthExceeded) as info:
        plan_completion(completion({"prompt": ["ok", "x" * 80]}), state(), "r")
    assert info.value.param == "prompt[1]"
    with pytest.raises(ContextLengthExceeded) as info:
        plan_chat(chat({"messages": [{"content": "x" * 80}]}), state(), "r")
    assert info.value.param == "messages"


def test_chat_prompt_stops_prefix_and_continue() -> None:
    plan = plan_chat(chat({"messages": HELLO, "stop": "END"}), state(), "r")
    assert plan.prompts[0].text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert plan.jobs[0].stop_strings == ("END", "<|im_start|>", "<|im_end|>")
    prefixed, _ = render_chat(chat({"messages": HELLO, "response_prefix": "Sure"}), state())
    assert prefixed.endswith("<|im_start|>assistant\nSure")
    body = {
        "messages": [*HELLO, {"role": "assistant", "content": "Hi th"}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    continued, _ = render_chat(chat(body), state())
    assert continued.endswith("<|im_start|>assistant\nHi th")
    with pytest.raises(Unprocessable) as info:
        render_chat(chat({**body, "add_generation_prompt": True}), state())
    assert info.value.param == "continue_final_message"
    with pytest.raises(Unprocessable):
        render_chat(chat({"messages": HELLO}), state(template=None))


def test_content_parts_and_images() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    text, _ = render_chat(chat({"messages": [{"role": "user", "content": parts}]}), state())
    assert "<|im_start|>user\na\nb<|im_end|>" in text
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(InvalidRequest) as info:
        render_chat(chat({"messages": [{"content": [parts[0], image]}]}), state())
    assert (info.value.param, info.value.code) == ("messages[0].content[1]", "vision_not_supported")


def test_response_format_becomes_a_constraint() -> None:
    def constraint(body: dict[str, Any]) -> ConstraintSpec | None:
        spec = plan_completion(completion({"prompt": "x", **body}), state(), "r").jobs[0].constraint
        # The field a spec came from (for error messages) is not compared here.
        return None if spec is None else attrs.evolve(spec, param=None)

    assert constraint({}) is None
    assert constraint({"response_format": {"type": "text"}}) is None
    for kind in ("json", "json_object"):
        spec = constraint({"response_format": {"type": kind}})
        assert spec == ConstraintSpec("json_schema", json.dumps({"type": "object"}))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    wrapped = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    assert constraint({"response_format": wrapped}) == ConstraintSpec(
        "json_schema", json.dumps(schema)
    )
    with pytest.raises(InvalidRequest) as info:
        constraint({"response_format": {"type": "json_schema"}})
    assert info.value.param == "response_format.json_schema"
    assert constraint({"regex_pattern": "[0-9]+"}) == ConstraintSpec("regex", "[0-9]+")


def test_logprob_shapes() -> None:
    tokenizer = ScriptedBackend().tokenizer
    lps = (
        TokenLogprob(72, "H", -0.1, ((72, "H", -0.1), (74, "J", -2.5))),
        TokenLogprob(105, "i", -0.2, ((105, "i", -0.2),)),
    )
    chat_shape = dump(chat_logprobs(lps, tokenizer))
    assert chat_shape["content"][0] == {
        "token": "H",
        "logprob": -0.1,
        "bytes": [72],
        "top_logprobs": [
            {"token": "H", "logprob": -0.1, "bytes": [72]},
            {"token": "J", "logprob": -2.5, "bytes": [74]},
        ],
    }
    legacy = dump(completion_logprobs(lps, offset=3))
    assert legacy == {
        "tokens": ["H", "i"],
        "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"H": -0.1, "J": -2.5}, {"i": -0.2}],
        "text_offset": [3, 4],
    }


def test_chunk_omits_unset_delta_fields() -> None:
    chunk = ChatChunk("id", 1, "m", [ChatChunkChoice(0, ChatDelta(content="x"))])
    assert dump(chunk) == {
        "id": "id",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"content": "x"}, "finish_reason": None, "logprobs": None}
        ],
        "object": "chat.completion.chunk",
    }


def test_text_chunk_encoder_matches_the_full_rendering() -> None:
    def render(index: int, text: str) -> ChatChunk:
        return ChatChunk("id", 7, "m", [ChatChunkChoice(index, ChatDelta(content=text))])

    encode = TextChunkEncoder(render)
    for index, text in [(0, "plain"), (1, 'quote " and \\ slash'), (0, "ünï\n\x00")]:
        assert json.loads(encode(index, text)) == dump(render(index, text))
