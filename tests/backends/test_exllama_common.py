"""Rules and translations the exllama adapters share; no exllama import anywhere."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tabby.backends.exllama_common import (
    LOGPROB_FLOOR,
    CacheBits,
    ContextSize,
    Placement,
    autosplit_reserve_bytes,
    autosplit_reserve_gb,
    check_runtime,
    chunk_size_for,
    import_library,
    job_limits,
    parse_cache_mode_v2,
    parse_cache_mode_v3,
    placement,
    rope_alpha_auto,
    size_context,
    stop_conditions,
    translate_results,
    unsupported_samplers,
)
from tabby.backends.exllama_tokenizer import LibraryTokenizer, read_tokenizer_facts
from tabby.errors import BackendUnavailable, ContextLengthExceeded, InvalidRequest
from tabby.jobs import GenerationJob, JobStats, SamplerSettings, TokenLogprob
from tabby.testing.tiny import make_tiny_hf, tiny_tokenizer

# -- cache modes, sizing, rope, placement ------------------------------------------------


def test_cache_mode_v3() -> None:
    assert parse_cache_mode_v3("FP16") is None
    assert parse_cache_mode_v3("q6") == CacheBits(6, 6)
    assert parse_cache_mode_v3("4, 8") == CacheBits(4, 8)
    for bad in ("Q5", "1,4", "4,9", "fp8", ""):
        with pytest.raises(InvalidRequest) as info:
            parse_cache_mode_v3(bad)
        assert info.value.param == "cache_mode"


def test_cache_mode_v2_falls_back_from_pairs(caplog: pytest.LogCaptureFixture) -> None:
    assert parse_cache_mode_v2("Q4") == "Q4"
    with caplog.at_level(logging.WARNING):
        assert parse_cache_mode_v2("4,6") == "FP16"
    assert "exllamav3 only" in caplog.text
    with pytest.raises(InvalidRequest):
        parse_cache_mode_v2("Q3")


def test_size_context_v3() -> None:
    assert size_context("exllamav3", max_seq_len=None, cache_size=None, native=4096) == ContextSize(4096, 4096)
    assert size_context("exllamav3", max_seq_len=None, cache_size=None, native=None) == ContextSize(8192, 8192)
    # cache rounded up to whole pages; max_seq_len clamped to the cache
    assert size_context("exllamav3", max_seq_len=1000, cache_size=None, native=None) == ContextSize(1000, 1024)
    assert size_context("exllamav3", max_seq_len=4096, cache_size=2000, native=None) == ContextSize(2048, 2048)
    with pytest.raises(InvalidRequest):
        size_context("exllamav3", max_seq_len=0, cache_size=None, native=None)


def test_size_context_v2() -> None:
    # paged: cache = given or max_seq_len or 4096; max_seq_len = min(native, cache)
    assert size_context("exllamav2", max_seq_len=None, cache_size=None, native=32768) == ContextSize(4096, 4096)
    assert size_context("exllamav2", max_seq_len=None, cache_size=10000, native=2048) == ContextSize(2048, 10240)
    assert size_context("exllamav2", max_seq_len=3000, cache_size=None, native=2048) == ContextSize(3000, 3072)
    # unpaged: one job, the cache is max_seq_len in pages
    assert size_context("exllamav2", max_seq_len=None, cache_size=99999, native=2000, paged=False) == ContextSize(2000, 2048)


def test_rope_alpha_auto() -> None:
    assert rope_alpha_auto(2048, 4096) == 1.0
    assert rope_alpha_auto(4096, 4096) == 1.0
    r = 2.0
    assert rope_alpha_auto(8192, 4096) == pytest.approx(-0.13436 + 0.80541 * r + 0.28833 * r * r)


def test_placement_and_reserve_units() -> None:
    args: dict[str, Any] = {"gpu_split": (10.0, 20.0), "gpu_split_auto": True, "tensor_parallel": False}
    assert placement(devices=1, **args) == Placement("single")
    assert placement(devices=2, **args) == Placement("manual", (10.0, 20.0))
    assert placement(devices=2, gpu_split=(), gpu_split_auto=True, tensor_parallel=False) == Placement("auto")
    assert placement(devices=2, gpu_split=(), gpu_split_auto=False, tensor_parallel=False) == Placement("single")
    assert placement(devices=2, gpu_split=(), gpu_split_auto=True, tensor_parallel=True) == Placement("tp")
    with pytest.raises(InvalidRequest):
        placement(devices=1, gpu_split=(), gpu_split_auto=True, tensor_parallel=True)
    assert autosplit_reserve_bytes([96], 3) == [96 * 1024**2, 0, 0]
    assert autosplit_reserve_gb([512, 1024], 2) == [0.5, 1.0]
    assert chunk_size_for(100) == 256
    assert chunk_size_for(2048) == 2048
    assert chunk_size_for(300) == 512


# -- pre-enqueue rules ----------------------------------------------------------------------


def _job(prompt: int = 10, new: int = 5, **kw: Any) -> GenerationJob:
    return GenerationJob(job_id="j", prompt_ids=tuple(range(prompt)), max_new_tokens=new, **kw)


def test_job_limits() -> None:
    ok = job_limits(_job(10, 5), max_seq_len=1024, cache_size=1024)
    assert (ok.max_new_tokens, ok.context_bound) == (5, False)
    cut = job_limits(_job(1000, 100), max_seq_len=1024, cache_size=1024)
    assert (cut.max_new_tokens, cut.context_bound) == (24, True)
    with pytest.raises(ContextLengthExceeded, match="1024 tokens"):
        job_limits(_job(1024, 1), max_seq_len=1024, cache_size=1024)
    # within max_seq_len but beyond the cache's pages
    with pytest.raises(ContextLengthExceeded, match="3 cache pages of 256 tokens, but the cache holds 2"):
        job_limits(_job(500, 100), max_seq_len=4096, cache_size=512)
    with pytest.raises(InvalidRequest):
        job_limits(_job(0, 1), max_seq_len=16, cache_size=256)


def test_stop_conditions_always_hold_eos() -> None:
    job = _job(stop_strings=("###", "", "###", "\n\n"), stop_token_ids=(7, 2))
    assert stop_conditions(job, [2, 0]) == [2, 0, 7, "###", "\n\n"]
    assert stop_conditions(_job(), [2]) == [2]


def test_unsupported_samplers() -> None:
    neutral = SamplerSettings()
    assert unsupported_samplers(neutral, ()) == []
    used = SamplerSettings(typical=0.9, mirostat_mode=2, min_temp=0.5, max_temp=1.5, xtc_probability=0.5)
    assert unsupported_samplers(used, ("xtc",)) == ["typical", "mirostat_mode", "dynamic_temperature"]


# -- result translation ---------------------------------------------------------------------


class _Pieces:
    def piece(self, token_id: int) -> str:
        return f"<{token_id}>"


def _translate(results: list[dict[str, Any]], bound: bool = False) -> list[Any]:
    return translate_results(
        results, lambda r: r.get("identifier"), _Pieces(), context_bound=lambda _j: bound
    )


def _final(**kw: Any) -> dict[str, Any]:
    base = {"stage": "streaming", "eos": True, "identifier": "a", "new_tokens": 3,
            "prompt_tokens": 7, "cached_tokens": 256, "time_enqueued": 0.5,
            "time_prefill": 0.25, "time_generate": 1.5, "full_completion": "xyz"}
    return base | kw


def test_streaming_results_merge_per_job() -> None:
    results = [
        {"stage": "started", "eos": False, "identifier": "a"},
        {"stage": "prefill", "eos": False, "identifier": "a", "curr_progress": 5, "max_progress": 6},
        {"stage": "streaming", "eos": False, "identifier": "a", "text": "He", "token_ids": torch.tensor([[11]])},
        {"stage": "streaming", "eos": False, "identifier": "b", "text": "X", "token_ids": torch.tensor([[5]])},
        {"stage": "streaming", "eos": False, "identifier": "a", "text": "llo", "token_ids": torch.tensor([[12, 13]])},
        {"stage": "streaming", "eos": False, "identifier": "a"},  # held: nothing yet
        {"stage": "streaming", "eos": False, "identifier": "gone", "text": "?"},
    ]
    out = translate_results(results, lambda r: None if r["identifier"] == "gone" else r["identifier"], _Pieces())
    assert [(r.job_id, r.text, r.token_ids, r.finished) for r in out] == [
        ("a", "Hello", (11, 12, 13), False),
        ("b", "X", (5,), False),
    ]


@pytest.mark.parametrize(
    ("extra", "finish", "stop", "stop_str"),
    [
        ({"eos_reason": "max_new_tokens"}, "length", "max_new_tokens", None),
        ({"eos_reason": "stop_string", "eos_triggering_string": "###"}, "stop", "stop_string", "###"),
        ({"eos_reason": "stop_token", "eos_triggering_token_id": 2, "eos_triggering_token_str": "</s>"},
         "stop", "stop_token", "</s>"),
        ({"eos_reason": "end_filter"}, "stop", "constraint", None),
        ({"eos_reason": "loop_detected"}, "stop", None, None),
    ],
)
def test_each_eos_reason(extra: dict[str, Any], finish: str, stop: str | None, stop_str: str | None) -> None:
    (result,) = _translate([_final(**extra)])
    assert result.finished
    assert (result.finish_reason, result.stop_reason, result.stop_str) == (finish, stop, stop_str)
    assert result.stats == JobStats(7, 256, 3, 0.5, 0.25, 1.5)
    assert result.error is None


def test_length_cut_by_context_is_context_length() -> None:
    (result,) = _translate([_final(eos_reason="max_new_tokens")], bound=True)
    assert (result.finish_reason, result.stop_reason) == ("length", "context_length")


def test_stop_token_releases_held_text() -> None:
    results = [
        {"stage": "streaming", "eos": False, "identifier": "a", "text": "ok", "token_ids": torch.tensor([[3]])},
        _final(eos_reason="stop_token", eos_triggering_token_str="</s>",
               held={"text": "##", "token_ids": torch.tensor([[9]])}),
    ]
    (result,) = _translate(results)
    assert result.text == "ok##"
    assert result.token_ids == (3,)
    assert result.stop_reason == "stop_token"


def test_stop_token_piece_in_held_text_is_not_output() -> None:
    # exllamav2 adds the stop token's piece to its held text before it checks stop tokens.
    results = [
        {"stage": "streaming", "eos": False, "identifier": "a", "text": "bb", "token_ids": torch.tensor([[3]])},
        _final(eos_reason="stop_token", eos_triggering_token_str="<|im_end|>",
               held={"text": "#<|im_end|>", "token_ids": torch.tensor([[9, 2]])}),
    ]
    (result,) = _translate(results)
    assert result.text == "bb#"
    assert result.stop_str == "<|im_end|>"


def test_results_after_eos_are_ignored() -> None:
    results = [_final(eos_reason="max_new_tokens", text="a", token_ids=torch.tensor([[1]])),
               {"stage": "streaming", "eos": False, "identifier": "a", "text": "late"}]
    (result,) = _translate(results)
    assert result.text == "a"


def test_logprobs_from_probabilities() -> None:
    result = {
        "stage": "streaming", "eos": False, "identifier": "a", "text": "xy",
        "token_ids": torch.tensor([[4, 5]]),
        "token_probs": torch.tensor([[0.5, 0.0]]),
        "top_k_tokens": torch.tensor([[[4, 6], [7, 5]]]),
        "top_k_probs": torch.tensor([[[0.5, 0.25], [1.0, 0.0]]]),
    }
    (out,) = _translate([result])
    half, quarter = math.log(0.5), math.log(0.25)
    assert out.logprobs == (
        TokenLogprob(4, "<4>", half, ((4, "<4>", half), (6, "<6>", quarter))),
        TokenLogprob(5, "<5>", LOGPROB_FLOOR, ((7, "<7>", 0.0), (5, "<5>", LOGPROB_FLOOR))),
    )


def test_logprobs_from_logits_are_the_models_distribution() -> None:
    # exllamav2 under greedy sampling reports the sampler's one-hot probabilities; with the
    # logits returned, logprobs are the model's softmax at temperature 1, bans excluded.
    logits = torch.tensor([[[2.0, 1.0, 0.0, float("-inf")], [0.0, 0.0, 0.0, 0.0]]])
    result = {
        "stage": "streaming", "eos": False, "identifier": "a", "text": "xy",
        "token_ids": torch.tensor([[0, 3]]), "logits": logits,
        "token_probs": torch.tensor([[1.0, 1.0]]),  # the one-hot: ignored
    }
    (out,) = translate_results([result], lambda r: "a", _Pieces(), top_logprobs=lambda _j: 3)
    first = torch.log_softmax(logits[0, 0], dim=-1)
    assert out.logprobs[0].logprob == pytest.approx(float(first[0]))
    assert [t for t, _, _ in out.logprobs[0].top] == [0, 1, 2]  # the banned 3 is no alternative
    assert out.logprobs[0].top[1][2] == pytest.approx(float(first[1]))
    assert out.logprobs[1].logprob == pytest.approx(math.log(0.25))
    (none,) = translate_results([result], lambda r: "a", _Pieces())
    assert [lp.top for lp in none.logprobs] == [(), ()]


def test_error_stage_fails_that_job_only() -> None:
    job_obj = object()
    results = [
        {"stage": "streaming", "eos": False, "identifier": "b", "text": "fine", "token_ids": torch.tensor([[1]])},
        {"job": job_obj, "serial": 3, "stage": "error", "eos": True, "error": RuntimeError("out of pages")},
    ]
    ids = {id(job_obj): "a"}
    out = translate_results(results, lambda r: r.get("identifier") or ids.get(id(r.get("job"))), _Pieces())
    by_id = {r.job_id: r for r in out}
    assert by_id["a"].finished
    assert by_id["a"].error is not None
    assert "RuntimeError: out of pages" in by_id["a"].error
    assert not by_id["b"].finished
    assert by_id["b"].error is None


# -- tokenizer adapter and model facts --------------------------------------------------------


class _LibTok:
    """The exllamav3 tokenizer's call shapes over the tiny HF tokenizer."""

    def __init__(self) -> None:
        self.tok = tiny_tokenizer()

    def encode(self, text: str, add_bos: bool = False, encode_special_tokens: bool = False) -> torch.Tensor:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return torch.tensor([([1] if add_bos else []) + ids], dtype=torch.long)

    def decode(self, ids: torch.Tensor, decode_special_tokens: bool = False) -> list[str]:
        return [self.tok.decode(row, skip_special_tokens=not decode_special_tokens) for row in ids.tolist()]

    def get_id_to_piece_list(self, include_special_tokens: bool = False) -> list[str]:
        return [self.tok.decode([i], skip_special_tokens=False) for i in range(self.tok.get_vocab_size())]


def test_library_tokenizer_adapter() -> None:
    tok = LibraryTokenizer(_LibTok())
    ids = tok.encode("Hello, world!", add_bos=True)
    assert ids[0] == 1
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids[1:]) == "Hello, world!"
    assert tok.decode([]) == ""
    assert tok.vocab_size == 320
    assert tok.piece(2) == "<|im_end|>"
    assert tok.piece(10_000) == ""


def test_read_tokenizer_facts(tmp_path: Path) -> None:
    make_tiny_hf(tmp_path / "m")
    facts = read_tokenizer_facts(tmp_path / "m")
    assert (facts.bos_token, facts.eos_token, facts.add_bos_token) == ("<|im_start|>", "<|im_end|>", False)
    assert facts.chat_template is not None
    assert "im_start" in facts.chat_template
    assert read_tokenizer_facts(tmp_path / "missing").eos_token is None


# -- the runtime guard: clear errors, no import -----------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize("name", ["exllamav3", "exllamav2"])
def test_no_cuda_is_a_clear_error_without_importing(name: Any) -> None:
    with pytest.raises(BackendUnavailable) as info:
        check_runtime(name, installed=True)
    assert "NVIDIA GPU" in info.value.message
    assert info.value.status == 422
    with pytest.raises(BackendUnavailable) as info:
        import_library(name)
    assert name in info.value.message
    assert name not in sys.modules


# -- images for vision models ------------------------------------------------------------------


def _png_data_url() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (255, 0, 0)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def test_image_urls() -> None:
    import httpx

    from tabby.backends.vision import fetch_image

    image = await fetch_image(_png_data_url(), allow_fetch=False)
    assert image.size == (4, 3)
    with pytest.raises(InvalidRequest, match="base64"):
        await fetch_image("data:image/png;base64,!!!", allow_fetch=True)
    with pytest.raises(InvalidRequest, match="disable_fetch_requests"):
        await fetch_image("https://example.invalid/cat.png", allow_fetch=False)
    png = _png_data_url().partition(",")[2]

    def answer(request: httpx.Request) -> httpx.Response:
        import base64

        if request.url.path == "/cat.png":
            return httpx.Response(200, content=base64.b64decode(png))
        return httpx.Response(404)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        fetched = await fetch_image("http://img.test/cat.png", allow_fetch=True, client=client)
        assert fetched.size == (4, 3)
        with pytest.raises(InvalidRequest, match="HTTP 404") as info:
            await fetch_image("http://img.test/dog.png", allow_fetch=True, client=client)
        assert info.value.status == 400


def test_image_cache_is_an_lru_of_32() -> None:
    from tabby.backends.vision import ImageCache

    cache: ImageCache[int] = ImageCache()
    for i in range(33):
        cache.put(f"u{i}", i)
        if i == 10:
            assert cache.get("u0") == 0  # touched: survives the eviction below
    assert len(cache) == 32
    assert cache.get("u1") is None
    assert cache.get("u0") == 0
    cache.clear()
    assert cache.get("u0") is None
