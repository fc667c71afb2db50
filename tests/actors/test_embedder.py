"""The Embedder actor with the real infinity-emb engine and the embedded MiniLM model."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import attrs
import numpy as np
import numpy.typing as npt
import pytest
import trio

from tabby.actors.embedder import Embedder, EmbedderHandle
from tabby.actors.health import HealthMonitor
from tabby.backends.infinity import (
    EMBEDDED_MODEL_NAME,
    await_future,
    embedded_model_path,
    infinity_missing,
)
from tabby.errors import InvalidRequest, NotFound, ServiceUnavailable

pytestmark = pytest.mark.skipif(infinity_missing(), reason="needs infinity-emb")

TEXTS = ["The cat sat on the mat.", "Embeddings map text to vectors.", "trio actors"]


@pytest.fixture
async def embedder(nursery: trio.Nursery, tmp_path: Path) -> tuple[Embedder, EmbedderHandle]:
    actor = Embedder(model_dir=tmp_path, model_name=EMBEDDED_MODEL_NAME, device="cpu")
    handle = await nursery.start(actor.run)
    return actor, handle


async def test_vectors_match_sentence_transformers(
    embedder: tuple[Embedder, EmbedderHandle],
) -> None:
    from sentence_transformers import SentenceTransformer

    _, handle = embedder
    model, result = await handle.embed(TEXTS)
    assert model == EMBEDDED_MODEL_NAME
    reference = SentenceTransformer(str(embedded_model_path()), device="cpu").encode(TEXTS)
    assert result.vectors.shape == (3, 384)
    np.testing.assert_allclose(result.vectors, reference, atol=1e-5)
    # usage is counted in tokens of the model's tokenizer, not characters
    tokenizer = SentenceTransformer(str(embedded_model_path())).tokenizer
    expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    assert result.prompt_tokens == expected
    assert result.prompt_tokens < sum(len(t) for t in TEXTS)


async def test_concurrent_requests_are_all_answered(
    embedder: tuple[Embedder, EmbedderHandle],
) -> None:
    actor, handle = embedder
    solo = (await handle.embed(["request 7"]))[1].vectors[0]
    results: dict[int, npt.NDArray[np.float32]] = {}

    async def one(i: int) -> None:
        results[i] = (await handle.embed([f"request {i}"]))[1].vectors[0]

    async with trio.open_nursery() as nursery:
        for i in range(40):
            nursery.start_soon(one, i)
    assert sorted(results) == list(range(40))
    # batched together with others, a text still gets its own vector
    np.testing.assert_allclose(results[7], solo, atol=1e-5)
    stats = actor.statistics()
    assert (stats.requests, stats.texts, stats.model) == (41, 41, EMBEDDED_MODEL_NAME)


async def test_cancelled_request_stops_waiting_and_engine_keeps_serving(
    embedder: tuple[Embedder, EmbedderHandle],
) -> None:
    _, handle = embedder
    texts = [f"sentence number {i} " * 8 for i in range(96)]
    start = trio.current_time()
    with trio.move_on_after(0.1) as scope:
        await handle.embed(texts)
    assert scope.cancelled_caught
    assert trio.current_time() - start < 0.5
    _, after = await handle.embed(["still alive"])
    assert after.vectors.shape == (1, 384)


async def test_event_loop_stays_responsive_while_embedding(
    embedder: tuple[Embedder, EmbedderHandle],
) -> None:
    _, handle = embedder
    gaps: list[float] = []
    finished = trio.Event()

    async def ticker() -> None:
        last = trio.current_time()
        while not finished.is_set():
            await trio.sleep(0.005)
            now = trio.current_time()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        await handle.embed([f"keep the loop free {i} " * 6 for i in range(64)])
        finished.set()
    assert len(gaps) > 5
    assert max(gaps) < 0.5  # the engine works in its own threads, never on the trio loop


async def test_await_future_forwards_cancellation() -> None:
    pending: concurrent.futures.Future[int] = concurrent.futures.Future()
    with trio.move_on_after(0.05):
        await await_future(pending)
    assert pending.cancelled()
    done: concurrent.futures.Future[int] = concurrent.futures.Future()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, done.set_result, 42)
        assert await await_future(done) == 42


async def test_load_unload_and_errors(
    embedder: tuple[Embedder, EmbedderHandle], tmp_path: Path
) -> None:
    actor, handle = embedder
    assert EMBEDDED_MODEL_NAME in await handle.list_models()
    await handle.unload()
    with pytest.raises(ServiceUnavailable) as exc_info:
        await handle.embed(["x"])
    assert exc_info.value.code == "embedding_model_not_loaded"
    with pytest.raises(ServiceUnavailable):
        await handle.unload()
    with pytest.raises(NotFound):
        await handle.load("no-such-model")
    with pytest.raises(InvalidRequest):
        await handle.load("../escape")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ServiceUnavailable) as broken:
        await handle.load("broken")
    assert broken.value.code == "embedding_load_failed"
    assert await handle.load(EMBEDDED_MODEL_NAME) == EMBEDDED_MODEL_NAME
    status = await handle.statistics()
    assert (status.model, status.loads, status.available) == (EMBEDDED_MODEL_NAME, 2, True)
    assert (status.unloads, status.refused) == (1, 1)  # the embed while none was loaded
    assert (await handle.embed(["back"]))[1].vectors.shape == (1, 384)
    assert actor.statistics() == attrs.evolve(status, requests=1, texts=1)


async def test_no_model_configured(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "other-model").mkdir()
    handle = await nursery.start(Embedder(model_dir=tmp_path, model_name=None).run)
    assert (await handle.statistics()).model is None
    assert "other-model" in await handle.list_models()
    with pytest.raises(ServiceUnavailable):
        await handle.embed(["x"])


async def test_startup_failure_is_a_health_problem_until_a_model_loads(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    health = await nursery.start(HealthMonitor().run)
    actor = Embedder(model_dir=tmp_path, model_name="no-such-model", device="cpu", health=health)
    handle = await nursery.start(actor.run)
    report = await health.get()
    assert not report.healthy
    (problem,) = report.problems
    assert (problem.source, problem.key) == ("embedder", "startup")
    assert "no-such-model" in problem.description
    assert await handle.load(EMBEDDED_MODEL_NAME) == EMBEDDED_MODEL_NAME
    assert (await health.get()).healthy
