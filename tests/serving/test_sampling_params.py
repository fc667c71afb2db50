"""Request-level sampler parameters: aliases, validation, shorthands and job building."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from tabby.config.validation import ValidationFailed, make_converter, structure
from tabby.errors import ContextLengthExceeded
from tabby.jobs import ConstraintSpec, SamplerSettings
from tabby.serving.sampling import JobOptions, SamplerParams

CONVERTER = make_converter(forbid_extra_keys=False)

ALIASES = {
    "max_completion_tokens": "max_tokens",
    "max_length": "max_tokens",
    "min_length": "min_tokens",
    "stop_sequence": "stop",
    "custom_token_bans": "banned_tokens",
    "allowed_token_ids": "allowed_tokens",
    "typical_p": "typical",
    "rep_pen": "repetition_penalty",
    "repetition_range": "penalty_range",
    "repetition_penalty_range": "penalty_range",
    "rep_pen_range": "penalty_range",
    "dry_penalty_last_n": "dry_range",
    "mirostat": "mirostat_mode",
    "dynatemp_high": "max_temp",
    "dynatemp_low": "min_temp",
    "dynatemp_exponent": "temp_exponent",
    "ignore_eos": "ban_eos_token",
    "guidance_scale": "cfg_scale",
}
# A value for each aliased field that differs from its default.
ALIAS_VALUES: dict[str, Any] = {
    "max_tokens": 7,
    "min_tokens": 3,
    "stop": ["x"],
    "banned_tokens": [4],
    "allowed_tokens": [5],
    "typical": 0.5,
    "repetition_penalty": 1.2,
    "penalty_range": 64,
    "dry_range": 9,
    "mirostat_mode": 2,
    "max_temp": 2.0,
    "min_temp": 0.5,
    "temp_exponent": 1.5,
    "ban_eos_token": True,
    "cfg_scale": 1.5,
}


def parse(body: dict[str, Any]) -> SamplerParams:
    return structure(body, SamplerParams, CONVERTER)


def issues(body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationFailed) as info:
        parse(body)
    return [(i.path, i.message) for i in info.value.issues]


def test_declared_aliases_are_exactly_the_reference_ones() -> None:
    declared = {
        alias: a.name for a in attrs.fields(SamplerParams) for alias in a.metadata["aliases"]
    }
    assert declared == ALIASES


@pytest.mark.parametrize(("alias", "name"), sorted(ALIASES.items()))
def test_every_alias_maps(alias: str, name: str) -> None:
    value = ALIAS_VALUES[name]
    params = parse({alias: value})
    expected = tuple(value) if isinstance(value, list) else value
    assert getattr(params, name) == expected


def test_canonical_name_wins_over_alias() -> None:
    assert parse({"max_tokens": 5, "max_length": 9}).max_tokens == 5


def test_every_field_is_documented() -> None:
    assert all(a.metadata["doc"] for a in attrs.fields(SamplerParams))


def test_defaults_are_neutral() -> None:
    params = parse({})
    assert params.to_settings() == SamplerSettings()
    assert params.job_options() == JobOptions(
        max_tokens=None,
        min_tokens=0,
        stop_strings=(),
        stop_token_ids=(),
        banned_strings=(),
        seed=None,
        logprobs=False,
        top_logprobs=0,
        constraint=None,
        add_bos_token=None,
    )
    assert params.ineffective_fields() == ()


def test_unknown_keys_are_ignored() -> None:
    assert parse({"temperature": 0.5, "frobnicate": 1}).temperature == 0.5


@pytest.mark.parametrize(
    ("body", "path", "message"),
    [
        ({"max_tokens": -1}, "max_tokens", "≥ 0"),
        ({"max_tokens": "10"}, "max_tokens", "expected an integer or null"),
        ({"min_tokens": -2}, "min_tokens", "≥ 0"),
        ({"min_tokens": 9, "max_tokens": 3}, "min_tokens", "must not exceed max_tokens"),
        ({"temperature": -0.1}, "temperature", "[0.0, 10.0]"),
        ({"temperature": 11}, "temperature", "[0.0, 10.0]"),
        ({"temperature": "hot"}, "temperature", "expected a number"),
        ({"temperature": float("nan")}, "temperature", "[0.0, 10.0]"),
        ({"top_p": 1.5}, "top_p", "[0.0, 1.0]"),
        ({"top_k": -2}, "top_k", "≥ -1"),
        ({"top_k": 1.5}, "top_k", "expected an integer"),
        ({"min_p": -0.1}, "min_p", "[0.0, 1.0]"),
        ({"typical": 0}, "typical", "(0.0, 1.0]"),
        ({"tfs": 2}, "tfs", "[0.0, 1.0]"),
        ({"top_a": -1}, "top_a", "≥ 0"),
        ({"xtc_probability": 2}, "xtc_probability", "[0.0, 1.0]"),
        ({"xtc_threshold": -1}, "xtc_threshold", "[0.0, 1.0]"),
        ({"frequency_penalty": -0.5}, "frequency_penalty", "≥ 0"),
        ({"presence_penalty": -0.5}, "presence_penalty", "≥ 0"),
        ({"repetition_penalty": 0}, "repetition_penalty", "> 0"),
        ({"penalty_range": -5}, "penalty_range", "≥ -1"),
        ({"repetition_decay": -1}, "repetition_decay", "≥ 0"),
        ({"smoothing_factor": -1}, "smoothing_factor", "≥ 0"),
        ({"min_temp": 2.0, "max_temp": 1.5}, "min_temp", "must not exceed max_temp"),
        ({"max_temp": -1}, "max_temp", "≥ 0"),
        ({"dry_multiplier": -1}, "dry_multiplier", "≥ 0"),
        ({"dry_allowed_length": -1}, "dry_allowed_length", "≥ 0"),
        ({"dry_range": -1}, "dry_range", "≥ 0"),
        ({"dry_sequence_breakers": "[1, 2]"}, "dry_sequence_breakers", "list of strings"),
        ({"dry_sequence_breakers": "[unclosed"}, "dry_sequence_breakers", "list of strings"),
        ({"mirostat_mode": 3}, "mirostat_mode", "[0, 2]"),
        ({"stop": [1.5]}, "stop[0]", "expected a string or an integer"),
        ({"stop": ["a", -3]}, "stop", "≥ 0"),
        ({"stop": {"a": 1}}, "stop", "expected a string or a list"),
        ({"banned_tokens": "1,x"}, "banned_tokens", "comma-separated token ids"),
        ({"banned_tokens": [-1]}, "banned_tokens", "≥ 0"),
        ({"allowed_tokens": "1;2"}, "allowed_tokens", "comma-separated token ids"),
        ({"banned_strings": [1]}, "banned_strings[0]", "expected a string"),
        ({"logit_bias": {"abc": 1.0}}, "logit_bias", "token ids"),
        ({"logit_bias": {"-3": 1.0}}, "logit_bias", "token ids"),
        ({"logit_bias": {"3": "big"}}, "logit_bias['3']", "expected a number"),
        ({"logit_bias": [1]}, "logit_bias", "expected a table"),
        ({"json_schema": "object"}, "json_schema", "expected a table"),
        ({"json_schema": {"type": "string"}, "grammar_string": "a"}, "grammar_string", "one"),
        ({"regex_pattern": "a+", "grammar_string": "a"}, "grammar_string", "one constraint"),
        ({"logprobs": -1}, "logprobs", "[0, 20]"),
        ({"logprobs": "yes"}, "logprobs", "true or false or an integer"),
        ({"top_logprobs": 21}, "top_logprobs", "[0, 20]"),
        ({"seed": 2**64}, "seed", "expected a number in"),
        ({"seed": "1"}, "seed", "expected an integer or null"),
        ({"ban_eos_token": "false"}, "ban_eos_token", "expected true or false"),
        ({"add_bos_token": 1}, "add_bos_token", "true or false or null"),
        ({"loop_detect_window": -1}, "loop_detect_window", "≥ 0"),
        ({"adaptive_target": 2}, "adaptive_target", "[0.0, 1.0]"),
    ],
)
def test_validation_names_the_field(body: dict[str, Any], path: str, message: str) -> None:
    found = issues(body)
    assert [p for p, _ in found] == [path]
    assert message in found[0][1]


def test_several_type_errors_are_all_reported() -> None:
    found = issues({"temperature": "a", "top_p": "b", "max_tokens": 1.5})
    assert sorted(p for p, _ in found) == ["max_tokens", "temperature", "top_p"]


def test_shorthands_resolve() -> None:
    params = parse(
        {
            "stop": ["</s>", 7, "", "END"],
            "banned_tokens": " 1, 2 ,3",
            "allowed_tokens": [9, 8],
            "banned_strings": "bad",
            "dry_sequence_breakers": '"\\n", ":"',
            "logit_bias": {"12": -5, "3": 2.5},
            "top_k": -1,
        }
    )
    settings = params.to_settings()
    assert settings.top_k == 0
    assert settings.banned_tokens == (1, 2, 3)
    assert settings.allowed_tokens == (9, 8)
    assert settings.dry_sequence_breakers == ("\n", ":")
    assert settings.logit_bias == ((3, 2.5), (12, -5.0))
    options = params.job_options(extra_stop_strings=["<|im_end|>", "END"])
    assert options.stop_strings == ("</s>", "END", "<|im_end|>")
    assert options.stop_token_ids == (7,)
    assert options.banned_strings == ("bad",)


def test_single_string_stop_and_bracketed_breakers() -> None:
    params = parse({"stop": "###", "dry_sequence_breakers": '["a", "b"]'})
    assert params.job_options().stop_strings == ("###",)
    assert params.to_settings().dry_sequence_breakers == ("a", "b")


def test_every_setting_is_passed_through() -> None:
    changed = {
        "temperature": 0.7, "temperature_last": True, "top_k": 40, "top_p": 0.9,
        "min_p": 0.05, "typical": 0.8, "top_a": 0.2, "tfs": 0.95,
        "xtc_probability": 0.5, "xtc_threshold": 0.2, "min_temp": 0.5, "max_temp": 1.5,
        "temp_exponent": 2.0, "smoothing_factor": 0.3, "repetition_penalty": 1.1,
        "frequency_penalty": 0.2, "presence_penalty": 0.3, "penalty_range": 128,
        "repetition_decay": 16, "dry_multiplier": 0.8, "dry_base": 2.0,
        "dry_allowed_length": 3, "dry_range": 256, "mirostat_mode": 2, "mirostat_tau": 5.0,
        "mirostat_eta": 0.1, "ban_eos_token": True,
    }  # fmt: skip
    settings = parse(changed).to_settings()
    assert {k: getattr(settings, k) for k in changed} == changed


@pytest.mark.parametrize(
    ("logprobs", "top_logprobs", "expected"),
    [(False, 5, (False, 0)), (True, 0, (True, 0)), (True, 3, (True, 3)), (4, 0, (True, 4)),
     (4, 6, (True, 6)), (0, 0, (False, 0))],
)  # fmt: skip
def test_logprobs_forms(
    logprobs: bool | int, top_logprobs: int, expected: tuple[bool, int]
) -> None:
    options = parse({"logprobs": logprobs, "top_logprobs": top_logprobs}).job_options()
    assert (options.logprobs, options.top_logprobs) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"json_schema": {}}, None),
        ({"json_schema": {"type": "object"}}, ConstraintSpec("json_schema", '{"type": "object"}')),
        (
            {"json_schema": {"name": "x", "strict": True, "schema": {"type": "array"}}},
            ConstraintSpec("json_schema", '{"type": "array"}'),
        ),
        ({"regex_pattern": "[0-9]+"}, ConstraintSpec("regex", "[0-9]+")),
        ({"grammar_string": 'root ::= "a"'}, ConstraintSpec("gbnf", 'root ::= "a"')),
        ({"grammar_string": 'start: "a"'}, ConstraintSpec("lark", 'start: "a"')),
        ({"json_schema": {}, "regex_pattern": "a"}, ConstraintSpec("regex", "a")),
    ],
)
def test_constraints(body: dict[str, Any], expected: ConstraintSpec | None) -> None:
    assert parse(body).job_options().constraint == expected


def test_build_job() -> None:
    params = parse({"max_tokens": 5, "min_tokens": 2, "seed": 42, "stop": ["x", 3]})
    job = params.build_job(
        job_id="j1", prompt_ids=[1, 2, 3], max_seq_len=100, extra_stop_strings=["<|im_end|>"]
    )
    assert (job.job_id, job.prompt_ids, job.max_new_tokens, job.min_new_tokens) == (
        "j1", (1, 2, 3), 5, 2,
    )  # fmt: skip
    assert job.seed == 42
    assert job.stop_strings == ("x", "<|im_end|>")
    assert job.stop_token_ids == (3,)
    assert job.sampler == params.to_settings()


@pytest.mark.parametrize(("max_tokens", "expected"), [(None, 7), (0, 7), (4, 4), (10, 7)])
def test_build_job_fills_or_caps_to_the_context(max_tokens: int | None, expected: int) -> None:
    job = parse({"max_tokens": max_tokens}).build_job(
        job_id="j", prompt_ids=[1, 2, 3], max_seq_len=10
    )
    assert job.max_new_tokens == expected


def test_build_job_rejects_a_prompt_that_does_not_fit() -> None:
    with pytest.raises(ContextLengthExceeded) as info:
        parse({}).build_job(job_id="j", prompt_ids=list(range(10)), max_seq_len=10)
    assert info.value.status == 400
    assert info.value.code == "context_length_exceeded"


def test_build_job_rejects_max_tokens_beyond_the_context_length() -> None:
    with pytest.raises(ContextLengthExceeded) as info:
        parse({"max_tokens": 11}).build_job(job_id="j", prompt_ids=[1], max_seq_len=10)
    assert info.value.param == "max_tokens"
    assert "11" in info.value.message
    assert "10" in info.value.message


def test_ineffective_fields() -> None:
    params = parse({"skew": 0.5, "cfg_scale": 2.0, "temperature": 0.3, "token_healing": True})
    assert params.ineffective_fields() == ("token_healing", "skew", "cfg_scale")


@attrs.frozen(kw_only=True)
class _Request(SamplerParams):
    prompt: str
    n: int = 1


@attrs.frozen(kw_only=True)
class _Embedding:
    prompt: str
    sampler: SamplerParams = attrs.field(factory=SamplerParams)


def test_request_classes_subclass_it() -> None:
    request = structure({"prompt": "hi", "max_length": 4, "n": 2}, _Request, CONVERTER)
    assert (request.prompt, request.n, request.max_tokens) == ("hi", 2, 4)
    with pytest.raises(ValidationFailed) as info:
        structure({"prompt": "hi", "top_p": 3, "n": "x"}, _Request, CONVERTER)
    assert sorted(i.path for i in info.value.issues) == ["n"]
    with pytest.raises(ValidationFailed) as info:
        structure({"prompt": "hi", "top_p": 3}, _Request, CONVERTER)
    assert [i.path for i in info.value.issues] == ["top_p"]
    with pytest.raises(ValidationFailed) as info:
        structure({"top_p": 0.5}, _Request, CONVERTER)
    assert [i.path for i in info.value.issues] == ["prompt"]


def test_embedded_field_paths_are_nested() -> None:
    with pytest.raises(ValidationFailed) as info:
        structure({"prompt": "p", "sampler": {"top_p": 3}}, _Embedding, CONVERTER)
    assert [i.path for i in info.value.issues] == ["sampler.top_p"]
