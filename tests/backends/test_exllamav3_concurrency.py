"""tabby's exllamav3 backend over the CPU stand-in library: do submitted jobs run together?

The real scheduler drives the real adapter; only the library is the stand-in of
``fake_exllamav3`` (page accounting as the library's), which records how many jobs made
a token in each ``iterate()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from tabby.actors.scheduler import GenerationScheduler
from tabby.backends import exllamav3 as v3
from tabby.backends.base import LoadProgress, LoadSpec
from tabby.jobs import GenerationJob, SamplerSettings
from tabby.jobs.events import Failed, Finished, TextChunk
from tests.backends import fake_exllamav3 as fake

GREEDY = SamplerSettings(temperature=0.0)
PROMPT, NEW = 128, 256


def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **spec: Any) -> tuple[v3.ExLlamaV3Backend, list[LoadProgress]]:
    monkeypatch.setattr(v3, "import_library", lambda name, **kw: fake)
    progress: list[LoadProgress] = []
    backend = v3.load(
        LoadSpec(path=fake.model_folder(tmp_path / "m"), name="m", **spec), progress.append
    )
    return backend, progress


def generator(backend: v3.ExLlamaV3Backend) -> fake.Generator:
    gen = backend._require().generator
    assert isinstance(gen, fake.Generator)
    return gen


def prompt(i: int) -> tuple[int, ...]:
    return tuple(3 + (i * 5 + k) % 50 for k in range(PROMPT))


async def run_jobs(backend: v3.ExLlamaV3Backend, jobs: list[GenerationJob]) -> dict[str, list[Any]]:
    """Submit ``jobs`` at once through the scheduler; each job's events."""
    events: dict[str, list[Any]] = {}
    async with trio.open_nursery() as nursery:
        scheduler = await nursery.start(GenerationScheduler().run)
        await scheduler.attach(backend, epoch=7)

        async def one(job: GenerationJob) -> None:
            got = events.setdefault(job.job_id, [])
            async with await scheduler.submit(job, model_epoch=7) as stream:
                async for event in stream:
                    got.append(event)

        async with trio.open_nursery() as clients:
            for job in jobs:
                clients.start_soon(one, job)
        nursery.cancel_scope.cancel()
    return events


def tokens_of(events: list[Any]) -> list[int]:
    return [t for e in events if isinstance(e, TextChunk) for t in e.token_ids]


async def test_sixteen_jobs_run_together_when_the_cache_holds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As measured on the GPU: 16 jobs of 128 + 256 tokens, a cache of 32 pages.
    backend, _ = load(tmp_path, monkeypatch, max_seq_len=1024, cache_size=8192,
                      chunk_size=2048, max_batch_size=16)
    jobs = [GenerationJob(f"j{i}", prompt(i), NEW, GREEDY, min_new_tokens=NEW) for i in range(16)]
    events = await run_jobs(backend, jobs)
    gen = generator(backend)
    assert max(gen.steps) == 16
    # Every token of every job came from a step that ran all 16, but for the admission
    # steps (the submits may arrive over two scheduler iterations).
    assert sum(1 for n in gen.steps if n == 16) >= NEW - 2
    assert len([n for n in gen.steps if n]) <= NEW + 2
    for job in jobs:
        got = events[job.job_id]
        assert len(tokens_of(got)) == NEW
        final = got[-1]
        assert isinstance(final, Finished)
        assert final.finish_reason == "length"
    assert gen.free_pages == 8192 // fake.PAGE_SIZE
    assert backend.statistics().live_jobs == 0


def test_a_chunk_sized_budget_holds_jobs_back() -> None:
    # The cause: each job reserved its prompt plus a whole chunk (9 pages, not 2), so a
    # 32-page cache ran 3 of 16 jobs at once.
    cache = fake.Cache(fake.Model(fake.Config("m")), max_num_tokens=8192)
    gen = fake.Generator(cache.model, cache, fake.Tokenizer(), max_batch_size=16)
    import torch

    for i in range(16):
        ids = torch.tensor([list(prompt(i))])
        gen.enqueue(fake.Job(ids, NEW, identifier=i, max_rq_tokens=2048))
    while gen.num_remaining_jobs():
        gen.iterate()
    assert max(gen.steps) == 3
    assert v3.requeue_budget(NEW, 2048) is None  # what tabby asks for now


async def test_a_small_cache_runs_jobs_in_waves_and_finishes_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, _ = load(tmp_path, monkeypatch, max_seq_len=1024, cache_size=2048,
                      chunk_size=2048, max_batch_size=16)
    jobs = [GenerationJob(f"w{i}", prompt(i), NEW, GREEDY) for i in range(16)]
    events = await run_jobs(backend, jobs)
    gen = generator(backend)
    assert max(gen.steps) == 4  # 8 pages, 2 per job
    assert all(len(tokens_of(events[j.job_id])) == NEW for j in jobs)
    assert gen.free_pages == 8


async def test_batched_output_equals_each_job_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, _ = load(tmp_path, monkeypatch, max_seq_len=1024, cache_size=8192,
                      chunk_size=2048, max_batch_size=16)
    jobs = [GenerationJob(f"e{i}", prompt(i), 8, GREEDY) for i in range(4)]
    together = await run_jobs(backend, jobs)
    for job in jobs:
        alone = await run_jobs(backend, [job])
        assert tokens_of(alone[job.job_id]) == tokens_of(together[job.job_id])


async def test_long_answers_go_chunk_by_chunk_and_end_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, _ = load(tmp_path, monkeypatch, max_seq_len=2048, cache_size=2048,
                      chunk_size=256, max_batch_size=4)
    jobs = [GenerationJob(f"l{i}", prompt(i)[:100], 600, GREEDY) for i in range(3)]
    events = await run_jobs(backend, jobs)
    gen = generator(backend)
    assert gen.requeues > 0
    assert max(gen.steps) == 3
    assert all(len(tokens_of(events[j.job_id])) == 600 for j in jobs)
    assert gen.free_pages == 8


async def test_a_cancelled_job_gives_its_pages_to_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, _ = load(tmp_path, monkeypatch, max_seq_len=1024, cache_size=1024,
                      chunk_size=2048, max_batch_size=16)
    gen = generator(backend)
    async with trio.open_nursery() as nursery:
        scheduler = await nursery.start(GenerationScheduler().run)
        await scheduler.attach(backend, epoch=1)
        first = await scheduler.submit(GenerationJob("a", prompt(0), 10_000 - PROMPT, GREEDY))
        second = await scheduler.submit(GenerationJob("b", prompt(1), NEW, GREEDY))
        async with first:
            await first.receive()
        # "a" holds every page until it is cancelled; "b" then runs to its end.
        async with second:
            got = [event async for event in second]
        assert len(tokens_of(got)) == NEW
        assert isinstance(got[-1], Finished)
        nursery.cancel_scope.cancel()
    assert gen.free_pages == 4
    assert not any(isinstance(e, Failed) for e in got)


def test_load_onto_one_device_reports_each_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend, progress = load(tmp_path, monkeypatch, max_seq_len=1024, cache_size=1024)
    modules = len(backend._require().model.modules)
    assert [(p.module, p.modules, p.status) for p in progress] == [
        *((i, modules, "processing") for i in range(1, modules + 1)),
        (modules, modules, "finished"),
    ]
    # The modules' own load is theirs again afterwards.
    assert all("load" not in vars(m) for m in backend._require().model.modules)
    # Warmed up at load, for the batch and chunk it will serve.
    assert backend._require().model.warmed == {"max_chunk_size": 2048, "max_batch_size": 128}
    backend.close()
