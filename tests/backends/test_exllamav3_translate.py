"""GenerationJob → exllamav3 job arguments and sampler stacks; no exllamav3 import."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tabby.backends import exllamav3 as v3
from tabby.backends.base import LoadSpec
from tabby.backends.exllama_common import CacheBits, JobLimits, Placement
from tabby.errors import BackendUnavailable
from tabby.jobs import ConstraintSpec, GenerationJob, SamplerSettings

EOS = (2, 0)


def _steps(s: SamplerSettings, **kw: Any) -> list[tuple[str, dict[str, Any]]]:
    return v3.build_sampler_steps(s, eos_ids=EOS, vocab_size=8, **kw)


def test_neutral_settings_sample_with_explicit_steps() -> None:
    assert _steps(SamplerSettings()) == [
        ("SS_RepP", {"rep_p": 1.0, "sustain_range": v3.WHOLE_CONTEXT, "decay_range": 1}),
        ("SS_PresFreqP", {"pres_p": 0.0, "freq_p": 0.0, "sustain_range": v3.WHOLE_CONTEXT, "decay_range": 1}),
        ("SS_Temperature", {"temperature": 1.0}),
        ("SS_TopK", {"top_k": 0}),
        ("SS_TopP", {"top_p": 1.0}),
        ("SS_MinP", {"min_p": 0.0}),
        ("SS_Sample", {}),
    ]


def test_greedy_keeps_only_bias_penalties_bans() -> None:
    s = SamplerSettings(temperature=0.0, top_k=40, top_p=0.9, min_p=0.1, repetition_penalty=1.1,
                        penalty_range=64, repetition_decay=16, logit_bias=((3, 2.0), (3, 0.5)),
                        banned_tokens=(5,), ban_eos_token=True)
    assert _steps(s) == [
        ("SS_LogitBias", {"logit_bias": {3: 2.5}}),
        ("SS_RepP", {"rep_p": 1.1, "sustain_range": 64, "decay_range": 16}),
        ("SS_PresFreqP", {"pres_p": 0.0, "freq_p": 0.0, "sustain_range": 64, "decay_range": 16}),
        ("SS_BanTokens", {"token_ids": [0, 2, 5]}),
        ("SS_Argmax", {}),
    ]


def test_full_stack_order_with_temperature_last() -> None:
    s = SamplerSettings(temperature=0.7, temperature_last=True, top_k=20, top_p=0.95, min_p=0.05,
                        presence_penalty=0.3, frequency_penalty=0.2, xtc_probability=0.5,
                        xtc_threshold=0.2, dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=3,
                        dry_range=100, allowed_tokens=(1, 3, 4, 6))
    steps = _steps(s, dry_breaker_ids=[9, 7, 9])
    assert [name for name, _ in steps] == [
        "SS_RepP", "SS_PresFreqP", "SS_DRY", "SS_BanTokens", "SS_TopK", "SS_TopP", "SS_MinP",
        "SS_Temperature", "SS_XTC", "SS_Sample",
    ]
    kw = dict(steps)
    assert kw["SS_DRY"] == {"dry_multiplier": 0.8, "dry_base": 2.0, "dry_allowed_length": 3,
                            "dry_range": 100, "dry_sequence_breakers": [7, 9]}
    assert kw["SS_BanTokens"] == {"token_ids": [0, 2, 5, 7]}  # all but the allowed ones
    assert kw["SS_XTC"] == {"probability": 0.5, "threshold": 0.2}
    assert kw["SS_PresFreqP"]["pres_p"] == 0.3
    assert kw["SS_PresFreqP"]["freq_p"] == 0.2


def test_unsupported_samplers_are_named() -> None:
    s = SamplerSettings(typical=0.5, tfs=0.9, top_a=0.1, smoothing_factor=0.3, mirostat_mode=2,
                        min_temp=0.2, max_temp=2.0, xtc_probability=0.1, dry_multiplier=1.0)
    from tabby.backends.exllama_common import unsupported_samplers

    assert unsupported_samplers(s, v3.SUPPORTED_SAMPLERS) == [
        "typical", "tfs", "top_a", "smoothing_factor", "mirostat_mode", "dynamic_temperature",
    ]


def test_materialise_sampler_uses_library_classes() -> None:
    made: list[tuple[str, dict[str, Any]]] = []

    def cls(name: str) -> Any:
        def make(**kw: Any) -> str:
            made.append((name, kw))
            return name

        return make

    names = ("SS_XTC", "SS_Sample", "SS_TopK")
    lib = SimpleNamespace(**{n: cls(n) for n in names}, CustomSampler=lambda steps: ("custom", steps))
    out = v3.materialise_sampler([("SS_TopK", {"top_k": 3}), ("SS_XTC", {"probability": 0.5}),
                                  ("SS_Sample", {})], lib, "TOK")  # type: ignore[arg-type]
    assert out == ("custom", ["SS_TopK", "SS_XTC", "SS_Sample"])
    assert made[1] == ("SS_XTC", {"probability": 0.5, "tokenizer": "TOK"})


def test_job_kwargs_every_field() -> None:
    job = GenerationJob(
        job_id="job-1", prompt_ids=(1, 5, 9), max_new_tokens=50, min_new_tokens=2, seed=7,
        stop_strings=("END", ""), stop_token_ids=(11,), banned_strings=("bad", "", "bad"),
        logprobs=True, top_logprobs=3,
    )
    kw = v3.job_kwargs(job, limits=JobLimits(40, True), eos_ids=EOS, chunk_size=512,
                       sampler="S", filters=["F"], embeddings=["E"])
    ids = kw.pop("input_ids")
    assert ids.dtype == torch.long
    assert ids.tolist() == [[1, 5, 9]]
    assert kw == {
        "max_new_tokens": 40, "min_new_tokens": 2, "max_skips": 4, "sampler": "S", "seed": 7,
        "stop_conditions": [2, 0, 11, "END"], "decode_special_tokens": True,
        "return_top_tokens": 3, "return_logits": False, "return_probs": True, "filters": ["F"],
        "token_healing": False, "identifier": "job-1", "banned_strings": ["bad"],
        "embeddings": ["E"], "max_rq_tokens": None,
    }
    plain = v3.job_kwargs(GenerationJob("j", (1,), 4), limits=JobLimits(4, False), eos_ids=EOS,
                          chunk_size=256, sampler=None)
    assert (plain["return_top_tokens"], plain["return_probs"], plain["filters"]) == (0, False, [])


def test_requeue_budget_reserves_the_answer_not_a_chunk() -> None:
    # A chunk-sized budget for a short answer reserved 9 pages instead of 2 per job.
    assert v3.requeue_budget(256, 2048) is None
    assert v3.requeue_budget(2048, 2048) is None
    assert v3.requeue_budget(2049, 2048) == 2048
    long = v3.job_kwargs(GenerationJob("j", (1,), 5000), limits=JobLimits(5000, False),
                         eos_ids=EOS, chunk_size=2048, sampler=None)
    assert long["max_rq_tokens"] == 2048


@pytest.mark.parametrize(
    ("kind", "source"),
    [("json_schema", '{"type": "object"}'), ("regex", "[ab]+"), ("lark", 'start: "a"'),
     ("gbnf", 'root ::= "a"')],
)
def test_filter_kwargs_take_tabbys_grammar(kind: Any, source: str) -> None:
    from tabby.backends.constraints import llguidance_grammar

    spec = ConstraintSpec(kind, source)
    kw = v3.filter_kwargs(spec)
    assert kw == {"eos_after_completed": True, "llg_grammar": llguidance_grammar(spec)}


def test_json_whitespace_is_bounded_as_on_every_backend() -> None:
    import json

    grammar = json.loads(v3.filter_kwargs(ConstraintSpec("json_schema", '{"type": "object"}'))["llg_grammar"])
    options = grammar["grammars"][0]["json_schema"]["x-guidance"]
    assert options == {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def test_cache_and_load_kwargs() -> None:
    assert v3.cache_kwargs(None, cache_size=4096, max_batch_size=8, max_history=0) == {
        "max_num_tokens": 4096, "max_batch_size": 8, "max_history": 0, "layer_type": "CacheLayer_fp16"}
    assert v3.cache_kwargs(CacheBits(4, 6), cache_size=512, max_batch_size=2, max_history=4) == {
        "max_num_tokens": 512, "max_batch_size": 2, "max_history": 4,
        "layer_type": "CacheLayer_quant", "k_bits": 4, "v_bits": 6}
    assert v3.load_kwargs(Placement("single"), reserve_mb=[96], devices=1) == {"device": "cuda:0"}
    assert v3.load_kwargs(Placement("manual", (20.0, 40.0)), reserve_mb=[96], devices=2) == {
        "use_per_device": [20.0, 40.0]}
    assert v3.load_kwargs(Placement("auto"), reserve_mb=[512], devices=2) == {
        "reserve_per_device": [0.5, 0.0]}
    assert v3.load_kwargs(Placement("tp"), reserve_mb=[96], devices=2) == {
        "tensor_p": True, "tp_backend": "native"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_load_without_cuda_is_clear_and_imports_nothing(tmp_path: Path) -> None:
    seen: list[object] = []
    with pytest.raises(BackendUnavailable) as info:
        v3.load(LoadSpec(path=tmp_path, name="m"), seen.append)
    assert "exllamav3" in info.value.message
    with pytest.raises(BackendUnavailable):
        v3.check()
    assert seen == []
    assert "exllamav3" not in sys.modules



# -- the backend's plumbing over a stand-in library (the real one needs a GPU) ---------------


class _Step:
    def __init__(self, name: str, **kw: Any) -> None:
        self.name, self.kw = name, kw


class _Lib:
    """The exllamav3 names the backend uses: Job, CustomSampler, SS_*, LLGuidanceFilter."""

    class Job:
        def __init__(self, **kw: Any) -> None:
            self.kw = kw

    def CustomSampler(self, steps: list[_Step]) -> list[_Step]:
        return steps

    def LLGuidanceFilter(self, tokenizer: object, **kw: Any) -> Any:
        if "/(/" in kw["llg_grammar"]:
            raise ValueError("Invalid grammar: unclosed group")
        return ("filter", kw)

    def __getattr__(self, name: str) -> Any:
        return lambda **kw: _Step(name, **kw)


class _Generator:
    def __init__(self) -> None:
        self.queue: list[Any] = []
        self.cancelled: list[Any] = []
        self.script: list[list[dict[str, Any]]] = []
        self.closed = False

    def enqueue(self, job: Any) -> int:
        if job.kw["max_new_tokens"] > 10_000:
            raise AssertionError("Job requires 99 pages (only 8 available) and cannot be enqueued")
        self.queue.append(job)
        return len(self.queue)

    def cancel(self, job: Any) -> None:
        self.cancelled.append(job)
        self.queue.remove(job)

    def iterate(self) -> list[dict[str, Any]]:
        return self.script.pop(0) if self.script else []

    def num_remaining_jobs(self) -> int:
        return len(self.queue)

    def num_active_jobs(self) -> int:
        return len(self.queue)

    def num_pending_jobs(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


class _Unloadable:
    unloaded = False

    def unload(self) -> None:
        self.unloaded = True


class _LibTok:
    """The library tokenizer calls the adapter makes, over the tiny HF tokenizer."""

    def __init__(self) -> None:
        from tabby.testing.tiny import tiny_tokenizer

        self.tok = tiny_tokenizer()

    def encode(self, text: str, add_bos: bool = False, encode_special_tokens: bool = False) -> torch.Tensor:
        return torch.tensor([self.tok.encode(text, add_special_tokens=False).ids])

    def get_id_to_piece_list(self, include_special_tokens: bool = False) -> list[str]:
        return [self.tok.id_to_token(i) for i in range(self.tok.get_vocab_size())]


def _backend() -> tuple[v3.ExLlamaV3Backend, _Generator, _Unloadable]:
    from tabby.backends.base import ModelInfo
    from tabby.backends.exllama_tokenizer import LibraryTokenizer

    gen, model = _Generator(), _Unloadable()
    info = ModelInfo(name="m", backend="exllamav3", max_seq_len=512, vocab_size=320,
                     bos_token_id=1, eos_token_ids=(2,), cache_size=512, chunk_size=256)
    parts = v3._Parts(model=model, cache=None, generator=gen)
    return v3.ExLlamaV3Backend(_Lib(), parts, LibraryTokenizer(_LibTok()), info), gen, model  # type: ignore[arg-type]


def test_backend_enqueue_step_cancel_close(caplog: pytest.LogCaptureFixture) -> None:
    from tabby.errors import ConstraintError, ContextLengthExceeded

    backend, gen, model = _backend()
    with caplog.at_level("WARNING"):
        backend.enqueue(GenerationJob("a", (1, 5), 4, SamplerSettings(typical=0.5)))
    assert "exllamav3 has no typical" in caplog.text
    backend.enqueue(GenerationJob("b", (1, 6), 4, constraint=ConstraintSpec("regex", "[ab]+")))
    job_a, job_b = gen.queue
    assert job_a.kw["identifier"] == "a"
    assert [s.name for s in job_a.kw["sampler"]][-1] == "SS_Sample"
    assert job_b.kw["filters"] == [("filter", v3.filter_kwargs(ConstraintSpec("regex", "[ab]+")))]
    with pytest.raises(ConstraintError):
        backend.enqueue(GenerationJob("c", (1,), 4, constraint=ConstraintSpec("regex", "(")))
    with pytest.raises(ContextLengthExceeded):
        backend.enqueue(GenerationJob("d", tuple(range(600)), 4))
    gen.script = [
        [{"job": job_a, "stage": "streaming", "eos": False, "identifier": "a", "text": "x",
          "token_ids": torch.tensor([[7]])},
         {"job": job_b, "serial": 2, "stage": "error", "eos": True, "error": RuntimeError("boom")}],
        [{"job": job_a, "stage": "streaming", "eos": True, "identifier": "a", "text": "y",
          "token_ids": torch.tensor([[8]]), "eos_reason": "max_new_tokens", "new_tokens": 2,
          "prompt_tokens": 2}],
    ]
    first = backend.step()
    assert [(r.job_id, r.text, r.finished, r.error is not None) for r in first] == [
        ("a", "x", False, False), ("b", "", True, True)]
    assert backend.statistics().tokens_generated == 1
    (last,) = backend.step()
    assert (last.text, last.finish_reason, last.stop_reason) == ("y", "length", "max_new_tokens")
    backend.enqueue(GenerationJob("e", (1, 5), 4))
    backend.cancel("e")
    backend.cancel("unknown")
    assert len(gen.cancelled) == 1
    backend.close()
    assert model.unloaded
    assert gen.closed
    backend.close()  # twice is harmless


class _Masker:
    def allowed(self) -> None:
        return None

    def consume(self, token_id: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


def test_masker_only_with_its_constraint() -> None:
    from tabby.errors import NotSupported

    backend, gen, _ = _backend()
    spec = ConstraintSpec("regex", "[ab]+")
    backend.enqueue(GenerationJob("a", (1, 5), 4, constraint=spec, masker=_Masker()))
    assert gen.queue[0].kw["filters"] == [("filter", v3.filter_kwargs(spec))]
    with pytest.raises(NotSupported):
        backend.enqueue(GenerationJob("b", (1, 5), 4, masker=_Masker()))


def test_logprobs_from_returned_logits_take_the_jobs_alternatives() -> None:
    backend, gen, _ = _backend()
    backend.enqueue(GenerationJob("a", (1, 5), 4, logprobs=True, top_logprobs=2))
    (lib_job,) = gen.queue
    logits = torch.zeros((1, 1, 320))
    logits[0, 0, 7] = 3.0
    gen.script = [[{"job": lib_job, "stage": "streaming", "eos": False, "identifier": "a",
                    "text": "x", "token_ids": torch.tensor([[7]]), "logits": logits}]]
    (result,) = backend.step()
    (lp,) = result.logprobs
    assert lp.token_id == 7
    assert lp.logprob == pytest.approx(float(torch.log_softmax(logits[0, 0], -1)[7]))
    assert len(lp.top) == 2
    assert lp.top[0][0] == 7
