"""GenerationJob → exllamav2 sampler settings and job arguments, and the llguidance filter
logic with the real llguidance on a real tokenizer; no exllamav2 import."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tabby.backends import exllamav2 as v2
from tabby.backends.base import LoadSpec
from tabby.backends.constraints import ConstraintCompiler
from tabby.backends.exllama_common import JobLimits, unsupported_samplers
from tabby.errors import BackendUnavailable, ConstraintError, InvalidRequest, NotSupported
from tabby.jobs import ConstraintSpec, GenerationJob, SamplerSettings
from tabby.testing.tiny import tiny_tokenizer

# Every field of ExLlamaV2Sampler.Settings (exllamav2 0.3.2) that a job may set.
SETTINGS_FIELDS = {
    "token_repetition_penalty", "token_repetition_range", "token_repetition_decay",
    "token_frequency_penalty", "token_presence_penalty", "temperature", "smoothing_factor",
    "min_temp", "max_temp", "temp_exponent", "top_k", "top_p", "top_a", "min_p", "tfs",
    "typical", "skew", "temperature_last", "mirostat", "mirostat_tau", "mirostat_eta",
    "mirostat_mu", "token_bias", "cfg_scale", "post_sampling_hooks", "dry_allowed_length",
    "dry_base", "dry_multiplier", "dry_sequence_breakers", "dry_range", "dry_max_ngram",
    "xtc_probability", "xtc_threshold", "xtc_ignore_tokens",
}


def test_every_field_is_set_and_neutral_by_default() -> None:
    f = v2.sampler_settings_fields(SamplerSettings(), max_seq_len=4096)
    assert set(f) == SETTINGS_FIELDS
    # the library defaults (temperature 0.8, top_k 50, top_p 0.8, rep-pen 1.025) never leak
    assert (f["temperature"], f["top_k"], f["top_p"], f["token_repetition_penalty"]) == (1.0, 0, 1.0, 1.0)
    assert f["token_repetition_range"] == -1
    assert f["token_repetition_decay"] == 0
    assert (f["min_temp"], f["max_temp"], f["temp_exponent"]) == (1.0, 1.0, 1.0)
    assert f["mirostat"] is False
    assert f["dry_range"] == 4096
    assert f["dry_sequence_breakers"] == set()


def test_greedy_mapping() -> None:
    s = SamplerSettings(temperature=0.0, top_k=40, top_p=0.9, typical=0.5, min_p=0.2,
                        repetition_penalty=1.2, xtc_probability=0.5, mirostat_mode=2)
    f = v2.sampler_settings_fields(s, max_seq_len=2048)
    assert (f["temperature"], f["top_k"], f["top_p"], f["typical"], f["min_p"]) == (1.0, 1, 0.0, 0.0, 0.0)
    assert f["xtc_probability"] == 0.0
    assert f["mirostat"] is False
    assert f["token_repetition_penalty"] == 1.2  # penalties still apply


def test_sampler_mappings() -> None:
    s = SamplerSettings(temperature=0.7, temperature_last=True, mirostat_mode=2, mirostat_tau=5.0,
                        mirostat_eta=0.2, min_temp=0.5, max_temp=1.5, temp_exponent=2.0,
                        penalty_range=0, dry_multiplier=0.8, dry_range=0, top_a=0.2, tfs=0.9,
                        smoothing_factor=0.3)
    f = v2.sampler_settings_fields(s, max_seq_len=1024, dry_breaker_ids=[5, 9, 5])
    assert f["mirostat"] is True
    assert (f["mirostat_tau"], f["mirostat_eta"]) == (5.0, 0.2)
    assert (f["min_temp"], f["max_temp"], f["temp_exponent"]) == (0.5, 1.5, 2.0)
    # range 0 → max_seq_len, decay defaults to the range
    assert (f["token_repetition_range"], f["token_repetition_decay"]) == (1024, 1024)
    assert f["dry_sequence_breakers"] == {5, 9}
    assert f["dry_range"] == 1024
    assert (f["top_a"], f["tfs"], f["smoothing_factor"], f["temperature_last"]) == (0.2, 0.9, 0.3, True)
    f = v2.sampler_settings_fields(SamplerSettings(penalty_range=64, repetition_decay=8), max_seq_len=1024)
    assert (f["token_repetition_range"], f["token_repetition_decay"]) == (64, 8)
    assert unsupported_samplers(s, v2.SUPPORTED_SAMPLERS) == []


def test_token_bias() -> None:
    assert v2.build_token_bias(SamplerSettings(), eos_ids=[2], vocab_size=40) is None
    bias = v2.build_token_bias(
        SamplerSettings(logit_bias=((3, 1.5), (3, 0.5)), banned_tokens=(4,), ban_eos_token=True),
        eos_ids=[2], vocab_size=40,
    )
    assert bias is not None
    assert bias.shape == (64,)
    assert bias[3] == 2.0
    assert bias[4] == float("-inf")
    assert bias[2] == float("-inf")
    assert bias[5] == 0
    only = v2.build_token_bias(SamplerSettings(allowed_tokens=(1, 7)), eos_ids=[2], vocab_size=32)
    assert only is not None
    assert torch.isfinite(only).nonzero().flatten().tolist() == [1, 7]


def test_job_kwargs_every_field() -> None:
    job = GenerationJob(job_id="a", prompt_ids=(1, 2, 3), max_new_tokens=9, min_new_tokens=1,
                        seed=3, stop_strings=("\n\n",), banned_strings=("", "nope"), logprobs=True,
                        top_logprobs=2)
    kw = v2.job_kwargs(job, limits=JobLimits(9, False), eos_ids=[2], gen_settings="G")
    assert kw.pop("input_ids").tolist() == [[1, 2, 3]]
    assert kw == {
        "max_new_tokens": 9, "min_new_tokens": 1, "max_skips": 4, "gen_settings": "G", "seed": 3,
        "stop_conditions": [2, "\n\n"], "decode_special_tokens": True, "return_top_tokens": 0,
        "return_logits": True, "return_probs": False, "filters": [], "filter_prefer_eos": True,
        "token_healing": False, "identifier": "a", "banned_strings": ["nope"], "embeddings": [],
    }
    with pytest.raises(NotSupported):
        v2.job_kwargs(job, limits=JobLimits(9, False), eos_ids=[2], gen_settings="G", filters=["F"])


def test_paging_and_cache_classes() -> None:
    assert v2.decide_paging(flash_attn_paged=True, no_flash_attn=False, max_batch_size=8) == (True, 8)
    assert v2.decide_paging(flash_attn_paged=False, no_flash_attn=False, max_batch_size=8) == (False, 1)
    assert v2.decide_paging(flash_attn_paged=True, no_flash_attn=True, max_batch_size=8) == (False, 1)
    assert [v2.cache_class_name(m) for m in ("FP16", "q8", "Q6", "Q4", "4,4")] == [
        "ExLlamaV2Cache", "ExLlamaV2Cache_Q8", "ExLlamaV2Cache_Q6", "ExLlamaV2Cache_Q4", "ExLlamaV2Cache"]
    with pytest.raises(InvalidRequest):
        v2.cache_class_name("Q5")


# -- the llguidance filter logic, with the real llguidance ------------------------------------

EOS_ID = 2


@pytest.fixture(scope="module")
def compiler() -> ConstraintCompiler:
    # wider than the 320-token vocabulary, as exllamav2's padded logits are
    return ConstraintCompiler.from_tokenizer_json(
        tiny_tokenizer().to_str(), eos_ids=[EOS_ID], vocab_size=352
    )


def _state(compiler: ConstraintCompiler, kind: Any, source: str) -> v2.GuidanceState:
    state = v2.GuidanceState(compiler, ConstraintSpec(kind, source), [EOS_ID])
    state.begin()
    return state


def test_regex_filter_next_and_end(compiler: ConstraintCompiler) -> None:
    tok = tiny_tokenizer()
    state = _state(compiler, "regex", "[a-c]{3}")
    allowed, end = state.next()
    assert {tok.id_to_token(t) for t in allowed} == {"a", "b", "c"}
    assert end == set()
    for ch in "ab":
        state.feed(tok.token_to_id(ch))
    allowed, end = state.next()
    assert {tok.id_to_token(t) for t in allowed} == {"a", "b", "c"}
    assert end == set()
    assert not state.finished()
    state.feed(tok.token_to_id("c"))
    assert state.finished()  # the backend then reports the job's end as "constraint"
    allowed, end = state.next()
    assert allowed == {EOS_ID}
    assert end == {EOS_ID}
    assert state.error() is None
    state.begin()  # a new job start resets the matcher
    assert {tok.id_to_token(t) for t in state.next()[0]} == {"a", "b", "c"}


def test_json_schema_filter(compiler: ConstraintCompiler) -> None:
    tok = tiny_tokenizer()
    state = _state(compiler, "json_schema", '{"type": "integer"}')
    allowed, _ = state.next()
    pieces = {tok.decode([t]) for t in allowed}
    assert "7" in pieces
    assert "a" not in pieces
    assert '"' not in pieces
    state.feed(tok.token_to_id("4"))
    allowed, end = state.next()
    assert EOS_ID in allowed
    assert end == {EOS_ID}


def test_bad_grammar_is_a_400(compiler: ConstraintCompiler) -> None:
    with pytest.raises(ConstraintError, match="nosuch"):
        v2.GuidanceState(compiler, ConstraintSpec("json_schema", '{"type": "nosuch"}'), [EOS_ID])
    with pytest.raises(ConstraintError):
        v2.GuidanceState(compiler, ConstraintSpec("regex", "(unclosed"), [EOS_ID])


def test_clone_continues_on_its_own_matcher(compiler: ConstraintCompiler) -> None:
    tok = tiny_tokenizer()
    abc = {tok.token_to_id(ch) for ch in "abc"}
    state = _state(compiler, "regex", "[a-c]{3}")
    state.feed(tok.token_to_id("a"))
    twin = state.clone()
    assert twin is not state
    assert twin.next() == (abc, set())  # at the same point as the original
    for ch in "bc":
        twin.feed(tok.token_to_id(ch))
    assert twin.next() == ({EOS_ID}, {EOS_ID})
    assert state.next() == (abc, set())  # the original did not move
    state.feed(tok.token_to_id("b"))
    assert state.next() == (abc, set())


def test_filter_class_over_a_base(compiler: ConstraintCompiler) -> None:
    class Base:
        def __init__(self, model: object, tokenizer: object) -> None:
            self.model, self.tokenizer = model, tokenizer

    tok = tiny_tokenizer()
    a, b = tok.token_to_id("a"), tok.token_to_id("b")
    cls = v2.make_filter_class(Base)
    f: Any = cls("M", "T", v2.GuidanceState(compiler, ConstraintSpec("regex", "ab"), [EOS_ID]))
    assert f.model == "M"
    assert f.use_background_worker()
    f.begin("")
    assert f.next() == ({a}, set())
    f.feed(torch.tensor(a))
    assert f.next() == ({b}, set())
    copy: Any = f.clone()
    assert (copy.model, copy.tokenizer) == ("M", "T")
    assert copy.state is not f.state
    copy.feed(torch.tensor(b))
    assert copy.next() == ({EOS_ID}, {EOS_ID})
    assert f.next() == ({b}, set())
    copy.begin("")  # a copy restarts like any filter
    assert copy.next() == ({a}, set())
    # last: these narrow the names for the type checker
    assert type(copy) is cls
    assert isinstance(f, Base)


def test_compiler_is_made_from_the_model_folder(tmp_path: Path) -> None:
    assert v2._constraint_compiler(tmp_path, [EOS_ID], 352) is None  # no tokenizer.json
    (tmp_path / "tokenizer.json").write_text(tiny_tokenizer().to_str(), encoding="utf-8")
    made = v2._constraint_compiler(tmp_path, [EOS_ID], 352)
    assert made is not None
    assert made.ll_tokenizer().vocab_size == 320
    assert made.ll_tokenizer().eos_tokens == [EOS_ID]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_load_without_cuda_is_clear_and_imports_nothing(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="exllamav2"):
        v2.load(LoadSpec(path=tmp_path, name="m"), lambda _p: None)
    assert "exllamav2" not in sys.modules
