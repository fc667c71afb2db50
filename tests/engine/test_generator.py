"""Continuous batching on a tiny seeded model: each job gets what it gets alone."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import attrs
import pytest
import torch

from tabby.backends.constraints import ConstraintCompiler
from tabby.engine.cache import PagedKVCache
from tabby.engine.config import ModelConfig
from tabby.engine.generator import Generator, GeneratorLimits
from tabby.engine.model import ModelWeights, build_weights
from tabby.engine.tokenizer import EngineTokenizer
from tabby.errors import ContextLengthExceeded
from tabby.jobs import ConstraintSpec, GenerationJob, JobResult, SamplerSettings
from tabby.testing.tiny import EOS_ID, TinySpec, _hf_config, tiny_tokenizer, tiny_weights

CPU = torch.device("cpu")
GREEDY = SamplerSettings(temperature=0.0)


@pytest.fixture(scope="module")
def weights() -> ModelWeights:
    spec = TinySpec(seed=11, vocab=320)
    cfg = ModelConfig.from_hf(_hf_config(spec, torch.float32))
    return build_weights(cfg, tiny_weights(spec), dtype=torch.float32, device=CPU,
                         max_positions=512)


@pytest.fixture(scope="module")
def tokenizer() -> EngineTokenizer:
    return EngineTokenizer(tiny_tokenizer(), eos_token="<|im_end|>")


MakeGen = Callable[..., Generator]


@pytest.fixture
def make_gen(weights: ModelWeights, tokenizer: EngineTokenizer) -> MakeGen:
    def make(*, pages: int = 64, page_size: int = 4, batch: int = 8, chunk: int = 8,
             max_seq_len: int = 256, eos: tuple[int, ...] = ()) -> Generator:
        c = weights.config
        cache = PagedKVCache(num_layers=c.num_layers, num_kv_heads=c.num_kv_heads,
                             head_dim=c.head_dim, num_pages=pages, page_size=page_size,
                             dtype=torch.float32, device=CPU)
        return Generator(weights, cache, tokenizer,
                         limits=GeneratorLimits(max_seq_len, batch, chunk), eos_ids=eos)
    return make


@attrs.define
class Outcome:
    text: str = ""
    tokens: list[int] = attrs.field(factory=list)
    chunks: list[str] = attrs.field(factory=list)
    final: JobResult | None = None


def drain(gen: Generator, outcomes: dict[str, Outcome] | None = None,
          steps: int | None = None) -> dict[str, Outcome]:
    out = outcomes if outcomes is not None else {}
    n = 0
    while gen.has_work() and (steps is None or n < steps):
        for r in gen.step():
            o = out.setdefault(r.job_id, Outcome())
            o.text += r.text
            o.chunks.append(r.text)
            o.tokens.extend(r.token_ids)
            if r.finished:
                o.final = r
        n += 1
    return out


def job(job_id: str, prompt: Iterable[int], n: int = 12, **kw: object) -> GenerationJob:
    return GenerationJob(job_id, tuple(prompt), n, sampler=GREEDY, **kw)  # type: ignore[arg-type]


def alone(make_gen: MakeGen, j: GenerationJob, **kw: object) -> Outcome:
    g = make_gen(**kw)
    g.enqueue(j)
    return drain(g)[j.job_id]


PROMPTS = {
    "a": [5, 17, 99, 250, 3, 41, 8, 77, 120, 64, 33, 2 + 100, 19],
    "b": [200, 201],
    "c": list(range(30, 60)),  # longer than a chunk: prefilled over several steps
    "d": [7],
}


def test_mixed_batch_equals_each_alone(make_gen: MakeGen) -> None:
    jobs = {k: job(k, p, n=10 + i) for i, (k, p) in enumerate(PROMPTS.items())}
    expected = {k: alone(make_gen, j) for k, j in jobs.items()}
    g = make_gen()
    g.enqueue(jobs["a"])
    g.enqueue(jobs["c"])
    out = drain(g, steps=3)  # d and b join mid-way, while c is still prefilling
    g.enqueue(jobs["d"])
    drain(g, out, steps=2)
    g.enqueue(jobs["b"])
    drain(g, out)
    for k, e in expected.items():
        assert out[k].tokens == e.tokens, k
        assert out[k].text == e.text
        final = out[k].final
        assert final is not None
        assert final.finish_reason == "length"
        assert final.stats is not None
        assert final.stats.generated_tokens == jobs[k].max_new_tokens
    assert g.stats().cache.pages_used == 0


def test_waiting_jobs_run_in_order_when_batch_is_full(make_gen: MakeGen) -> None:
    g = make_gen(batch=2)
    for k, p in PROMPTS.items():
        g.enqueue(job(k, p, n=4))
    g.step()
    assert (g.stats().live_jobs, g.stats().waiting_jobs) == (2, 2)
    out = drain(g)
    assert all(o.final is not None for o in out.values())
    assert out["d"].tokens == alone(make_gen, job("d", PROMPTS["d"], n=4)).tokens


def test_prefix_cache_hit_gives_identical_output(make_gen: MakeGen) -> None:
    g = make_gen()
    prompt = PROMPTS["c"] + [9, 10, 11]
    first = drain_one(g, job("x", prompt))
    second = drain_one(g, job("y", prompt))
    assert second.tokens == first.tokens
    assert first.final is not None
    assert first.final.stats is not None
    assert second.final is not None
    assert second.final.stats is not None
    assert first.final.stats.cached_tokens == 0
    # full pages strictly before the last prompt token: 32 of 33 tokens
    assert second.final.stats.cached_tokens == 32
    # A chat that grew: the earlier prompt plus its answer plus more.
    grown = prompt + first.tokens + [12, 13]
    third = drain_one(g, job("z", grown))
    assert third.final is not None
    assert third.final.stats is not None
    assert third.final.stats.cached_tokens >= 40
    assert third.tokens == alone(make_gen, job("z", grown)).tokens


def drain_one(g: Generator, j: GenerationJob) -> Outcome:
    g.enqueue(j)
    return drain(g)[j.job_id]


def test_stop_string_split_across_tokens_never_leaks(make_gen: MakeGen,
                                                     tokenizer: EngineTokenizer) -> None:
    base = alone(make_gen, job("s", PROMPTS["a"], n=20))
    pieces = [tokenizer.decode([t]) for t in base.tokens]
    # A stop string that starts inside one token and ends inside a later one.
    i = next(i for i in range(1, len(pieces) - 2) if len(pieces[i]) >= 2 and pieces[i + 1])
    start = sum(len(p) for p in pieces[:i]) + len(pieces[i]) - 1
    stop = base.text[start:start + 2]
    assert base.text.find(stop) == start, "pick a stop string that occurs first here"
    got = alone(make_gen, job("s", PROMPTS["a"], n=20, stop_strings=("zzz-unused", stop)))
    assert got.text == base.text[:start]
    assert all(stop not in c for c in got.chunks)
    assert got.final is not None
    assert (got.final.finish_reason, got.final.stop_reason) == ("stop", "stop_string")
    assert got.final.stop_str == stop


def test_banned_string_is_never_emitted(make_gen: MakeGen, tokenizer: EngineTokenizer) -> None:
    base = alone(make_gen, job("b", PROMPTS["a"], n=20))
    pieces = [tokenizer.decode([t]) for t in base.tokens]
    i = next(i for i in range(2, len(pieces)) if len(pieces[i]) >= 2 and pieces[i].isascii())
    banned = pieces[i].upper()  # matching ignores case
    got = alone(make_gen, job("b", PROMPTS["a"], n=20, banned_strings=(banned,)))
    assert banned.lower() not in got.text.lower()
    assert got.tokens[:i] == base.tokens[:i]
    assert got.tokens[i] != base.tokens[i]
    assert got.final is not None
    assert got.final.stats is not None
    assert got.final.stats.generated_tokens == 20


def test_stop_token_and_min_new_tokens(make_gen: MakeGen) -> None:
    base = alone(make_gen, job("t", PROMPTS["b"], n=10))
    stop_tok = base.tokens[3]
    got = alone(make_gen, job("t", PROMPTS["b"], n=10, stop_token_ids=(stop_tok,)))
    first = base.tokens.index(stop_tok)
    assert got.tokens == base.tokens[:first]
    assert got.final is not None
    assert got.final.stop_reason == "stop_token"
    held = alone(make_gen, job("t", PROMPTS["b"], n=10, stop_token_ids=(stop_tok,),
                               min_new_tokens=first + 2))
    assert held.tokens[:first] == base.tokens[:first]
    assert held.tokens[first] != stop_tok


def test_eos_ends_the_job(make_gen: MakeGen) -> None:
    base = alone(make_gen, job("e", PROMPTS["d"], n=8))
    g = make_gen(eos=(base.tokens[2], EOS_ID))
    out = drain_one(g, job("e", PROMPTS["d"], n=8))
    assert out.final is not None
    assert (out.final.finish_reason, out.final.stop_reason) == ("stop", "stop_token")
    assert out.final.stats is not None
    assert out.final.stats.generated_tokens <= 3


def test_logprobs_report_the_chosen_token_and_alternatives(make_gen: MakeGen) -> None:
    g = make_gen()
    g.enqueue(job("l", PROMPTS["a"], n=3, logprobs=True, top_logprobs=3))
    results = [r for _ in range(10) for r in g.step()]
    lps = [lp for r in results for lp in r.logprobs]
    assert len(lps) == 3
    for lp in lps:
        assert len(lp.top) == 3
        assert lp.top[0][0] == lp.token_id  # greedy picks the best
        assert lp.top[0][2] == pytest.approx(lp.logprob)
        assert lp.top[0][2] >= lp.top[1][2] >= lp.top[2][2]
        assert lp.logprob <= 0


def test_cancel_frees_pages(make_gen: MakeGen) -> None:
    g = make_gen()
    for k, p in PROMPTS.items():
        g.enqueue(job(k, p, n=50))
    for _ in range(6):
        g.step()
    assert g.stats().cache.pages_used > 0
    for k in PROMPTS:
        g.cancel(k)
    g.cancel("unknown")
    s = g.stats()
    assert (s.live_jobs, s.waiting_jobs, s.cache.pages_used) == (0, 0, 0)
    assert not g.has_work()


def test_too_long_jobs_are_refused(make_gen: MakeGen) -> None:
    g = make_gen(max_seq_len=64, pages=8, page_size=4)
    with pytest.raises(ContextLengthExceeded, match="max_seq_len of 64"):
        g.enqueue(job("x", range(60), n=10))
    with pytest.raises(ContextLengthExceeded, match="KV cache of 32 tokens"):
        g.enqueue(job("y", range(20), n=20))
    g.enqueue(job("z", range(10), n=5))  # fits
    assert g.has_work()


def test_rewind_into_a_cached_page_leaves_it_intact(make_gen: MakeGen,
                                                    tokenizer: EngineTokenizer) -> None:
    prompt = PROMPTS["a"]
    base = alone(make_gen, job("r", prompt, n=24), page_size=2)
    pieces = [tokenizer.decode([t]) for t in base.tokens]
    # A banned string starting at a token that fills a page (odd position, pages of 2),
    # so the rewind lands inside a page already published to the prefix cache.
    i = next(i for i in range(2, 20)
             if (len(prompt) + i) % 2 == 1 and pieces[i].isascii() and pieces[i].strip()
             and pieces[i + 1].isascii())
    banned = pieces[i] + pieces[i + 1]
    assert base.text.lower().find(banned.lower()) == len("".join(pieces[:i]))
    g = make_gen(page_size=2)
    got = drain_one(g, job("r1", prompt, n=24, banned_strings=(banned,)))
    assert got.tokens[:i] == base.tokens[:i]
    assert got.tokens[i] != base.tokens[i]
    # A later prompt that runs through the rewound page must see the original content.
    longer = prompt + base.tokens[: i + 4]
    reused = drain_one(g, job("r2", longer, n=8))
    assert reused.final is not None
    assert reused.final.stats is not None
    assert reused.final.stats.cached_tokens >= len(prompt) + i
    assert reused.tokens == alone(make_gen, job("r2", longer, n=8), page_size=2).tokens


def test_constraint_masker_shapes_and_ends_the_output(make_gen: MakeGen,
                                                      tokenizer: EngineTokenizer) -> None:
    compiler = ConstraintCompiler(tokenizer, eos_ids=(EOS_ID,), vocab_size=320)
    spec = ConstraintSpec("regex", "(the|fox) (quick|lazy) [0-9]{2}")
    g = make_gen(eos=(EOS_ID,))
    out = drain_one(g, job("m", PROMPTS["a"], n=30, constraint=spec,
                           masker=compiler.masker(spec)))
    assert out.final is not None
    assert out.final.stop_reason in ("constraint", "stop_token")
    assert re.fullmatch("(the|fox) (quick|lazy) [0-9]{2}", out.text), out.text


def test_before_head_runs_once_per_pass_before_the_lm_head(
    make_gen: MakeGen, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tabby.engine.model as model

    seen: list[str] = []
    real_linear = model.linear

    def spy_linear(
        x: torch.Tensor, lin: model.Linear, kernel_rows: int | None = None
    ) -> torch.Tensor:
        seen.append("head" if lin is g.weights.lm_head else "layer")
        return real_linear(x, lin, kernel_rows)

    monkeypatch.setattr(model, "linear", spy_linear)
    g = make_gen()
    expected = alone(make_gen, job("a", PROMPTS["a"]))
    g.enqueue(job("a", PROMPTS["a"]))
    out = Outcome()
    steps = 0
    while g.has_work():
        seen.clear()
        for r in g.step(before_head=lambda: seen.append("hook")):
            out.text += r.text
            out.tokens.extend(r.token_ids)
        steps += 1
        assert seen.count("hook") == 1
        assert seen.index("hook") == len(seen) - 2  # right before the head, after every layer
        assert seen[-1] == "head"
    assert steps > 1
    assert out.tokens == expected.tokens  # the hook changes nothing
    seen.clear()
    assert g.step(before_head=lambda: seen.append("hook")) == []
    assert seen == []  # nothing to run: no pass, no hook
