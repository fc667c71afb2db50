"""GenerationScheduler driven through its handle, with the scripted backend and a tiny
real model."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import trio

from tabby.actors.health import HealthHandle, HealthMonitor
from tabby.actors.scheduler import (
    HOLD_MIN_STREAMS,
    JOB_EVENT_BUFFER,
    GenerationScheduler,
    SchedulerHandle,
)
from tabby.actors.scheduler.backend_calls import step_in_thread
from tabby.backends.base import Capabilities, LoadSpec, handoff_step
from tabby.backends.scripted import ScriptedBackend
from tabby.errors import (
    Conflict,
    ContextLengthExceeded,
    GenerationFailed,
    NoModelLoaded,
    ServiceUnavailable,
    TooManyRequests,
)
from tabby.jobs import GenerationJob, JobResult, SamplerSettings
from tabby.jobs.events import Failed, Finished, JobEvent, TextChunk

LONG = 100_000  # tokens: a job that outlives any test unless stopped


def job(job_id: str, max_new_tokens: int = LONG, **kw: object) -> GenerationJob:
    return GenerationJob(job_id, (1, 2, 3), max_new_tokens, **kw)  # type: ignore[arg-type]


@attrs.frozen
class Rig:
    handle: SchedulerHandle
    scheduler: GenerationScheduler
    health: HealthHandle


@pytest.fixture
async def health(nursery: trio.Nursery) -> HealthHandle:
    handle: HealthHandle = await nursery.start(HealthMonitor().run)
    return handle


async def start(
    nursery: trio.Nursery, health: HealthHandle, backend: ScriptedBackend | None, **kw: object
) -> Rig:
    scheduler = GenerationScheduler(health=health, **kw)  # type: ignore[arg-type]
    handle: SchedulerHandle = await nursery.start(scheduler.run)
    if backend is not None:
        await handle.attach(backend, epoch=1)
    return Rig(handle, scheduler, health)


async def collect(events: trio.MemoryReceiveChannel[JobEvent]) -> list[JobEvent]:
    async with events:
        return [event async for event in events]


def text_of(events: list[JobEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextChunk))


async def barrier(handle: SchedulerHandle) -> None:
    """Returns after the scheduler went through at least one full loop iteration."""
    await handle.statistics()
    await handle.statistics()


async def test_job_streams_its_script_then_finishes(
    nursery: trio.Nursery, health: HealthHandle
) -> None:
    rig = await start(nursery, health, ScriptedBackend(script="héllo wörld"))
    events = await collect(await rig.handle.submit(job("a")))
    assert text_of(events) == "héllo wörld"
    assert all(isinstance(e, TextChunk) for e in events[:-1])
    final = events[-1]
    assert isinstance(final, Finished)
    assert (final.finish_reason, final.stop_reason) == ("stop", "stop_token")
    assert final.stats is not None
    assert final.stats.generated_tokens == len("héllo wörld".encode())
    stats = await rig.handle.statistics()
    assert (stats.jobs_submitted, stats.jobs_finished, stats.live, stats.queued) == (1, 1, 0, 0)


async def test_max_tokens_and_stop_strings(nursery: trio.Nursery, health: HealthHandle) -> None:
    rig = await start(nursery, health, ScriptedBackend(script="one two three four"))
    events = await collect(await rig.handle.submit(job("a", max_new_tokens=7)))
    assert text_of(events) == "one two"
    assert events[-1] == Finished("length", "max_new_tokens", None, events[-1].stats)  # type: ignore[union-attr]
    events = await collect(await rig.handle.submit(job("b", stop_strings=("thr",))))
    assert text_of(events) == "one two "
    assert isinstance(events[-1], Finished)
    assert (events[-1].stop_reason, events[-1].stop_str) == ("stop_string", "thr")


async def test_concurrent_jobs_are_batched(nursery: trio.Nursery, health: HealthHandle) -> None:
    backend = ScriptedBackend(script="x" * 50, max_batch_size=8)
    rig = await start(nursery, health, backend)
    results: dict[str, list[JobEvent]] = {}

    async def run(job_id: str) -> None:
        results[job_id] = await collect(await rig.handle.submit(job(job_id)))

    # The clients run in one trio batch: all four Submits are in the inbox when the
    # scheduler wakes, so one step advances them together.
    async with trio.open_nursery() as clients:
        for i in range(4):
            clients.start_soon(run, f"j{i}")
    assert all(text_of(r) == "x" * 50 for r in results.values())
    stats = await rig.handle.statistics()
    assert stats.last_batch_size == 4
    assert stats.tokens_generated == 200
    assert backend.steps <= 51  # four jobs in ~50 steps, not 200


async def test_closed_channel_cancels_job_within_one_step(
    nursery: trio.Nursery, health: HealthHandle
) -> None:
    backend = ScriptedBackend(script="y" * LONG)
    rig = await start(nursery, health, backend)
    events = await rig.handle.submit(job("gone"))
    assert isinstance(await events.receive(), TextChunk)
    steps_at_close = backend.steps
    events.close()
    await barrier(rig.handle)
    assert backend.cancelled == ["gone"]
    assert backend.steps <= steps_at_close + 1
    backend_stats = backend.statistics()
    assert (backend_stats.live_jobs, backend_stats.cache_pages_used) == (0, 0)
    stats = await rig.handle.statistics()
    assert (stats.live, stats.cache_pages_used, stats.jobs_cancelled) == (0, 0, 1)
    assert stats.cache_pages_free == backend_stats.cache_pages_total


async def test_explicit_cancel_ends_stream_as_cancelled(
    nursery: trio.Nursery, health: HealthHandle
) -> None:
    backend = ScriptedBackend(script="z" * LONG)
    rig = await start(nursery, health, backend)
    async with await rig.handle.submit(job("k")) as events:
        assert isinstance(await events.receive(), TextChunk)
        await rig.handle.cancel("k")
        rest = [e async for e in events]
    assert rest[-1] == Finished("stop", "cancelled", None, None)
    assert backend.cancelled == ["k"]


async def test_slow_consumer_gets_merged_chunks_and_nothing_is_lost(
    nursery: trio.Nursery, health: HealthHandle
) -> None:
    script = "".join(chr(ord("a") + i % 26) for i in range(1000))
    rig = await start(nursery, health, ScriptedBackend(script=script))
    slow = await rig.handle.submit(job("slow"))
    # A fast client meanwhile is served in full: the slow one blocks nobody.
    fast = await collect(await rig.handle.submit(job("fast")))
    assert text_of(fast) == script
    await barrier(rig.handle)
    events = await collect(slow)
    assert text_of(events) == script
    assert isinstance(events[-1], Finished)
    assert len(events) <= JOB_EVENT_BUFFER + 2  # 1000 tokens arrived in merged chunks
    token_ids = [t for e in events if isinstance(e, TextChunk) for t in e.token_ids]
    assert bytes(token_ids).decode() == script


async def test_enqueue_error_fails_only_that_job(
    nursery: trio.Nursery, health: HealthHandle
) -> None:
    def refuse(job: GenerationJob) -> Exception | None:
        return RuntimeError("bad job") if job.job_id == "bad" else None

    backend = ScriptedBackend(script="ok", max_seq_len=16, fail_enqueue=refuse)
    rig = await start(nursery, health, backend)
    with pytest.raises(ContextLengthExceeded):
        await rig.handle.submit(GenerationJob("long", tuple(range(20)), 5))
    with pytest.raises(GenerationFailed, match="bad job"):
        await rig.handle.submit(job("bad"))
    assert text_of(await collect(await rig.handle.submit(job("good")))) == "ok"
    assert (await health.get()).healthy


async def test_step_error_fails_live_jobs_reports_health_then_recovers(
    nursery: trio.Nursery, health: HealthHandle
) -> None:
    backend = ScriptedBackend(script="w" * LONG)
    rig = await start(nursery, health, backend)
    first = await rig.handle.submit(job("a"))
    second = await rig.handle.submit(job("b"))
    backend.fail_next_steps(RuntimeError("device fell over"))
    for events in (first, second):
        final = (await collect(events))[-1]
        assert isinstance(final, Failed)
        assert isinstance(final.error, GenerationFailed)
        assert "device fell over" in final.error.message
    report = await health.get()
    assert [p.source for p in report.problems] == ["scheduler"]
    assert "device fell over" in report.problems[0].description
    assert sorted(backend.cancelled) == ["a", "b"]
    backend_after = ScriptedBackend(script="fine")
    await rig.handle.detach("drain")
    await rig.handle.attach(backend_after, epoch=2)
    assert text_of(await collect(await rig.handle.submit(job("c")))) == "fine"
    assert (await health.get()).healthy
    stats = await rig.handle.statistics()
    assert (stats.jobs_failed, stats.jobs_finished) == (2, 1)


async def test_a_job_the_backend_fails_alone_ends_alone(
    nursery: trio.Nursery, health: HealthHandle
) -> None:
    backend = ScriptedBackend(script="v" * LONG)
    rig = await start(nursery, health, backend)
    doomed = await rig.handle.submit(job("doomed"))
    other = await rig.handle.submit(job("other", max_new_tokens=200))
    backend.fail_job("doomed", "NaN in logits")
    final = (await collect(doomed))[-1]
    assert isinstance(final, Failed)
    assert isinstance(final.error, GenerationFailed)
    assert "NaN in logits" in final.error.message
    assert text_of(await collect(other)) == "v" * 200


async def test_queue_full_is_refused_at_once(nursery: trio.Nursery, health: HealthHandle) -> None:
    backend = ScriptedBackend(script="q" * LONG, max_batch_size=1)
    rig = await start(nursery, health, backend, max_queued=2)
    streams = [await rig.handle.submit(job(f"j{i}")) for i in range(3)]  # 1 live + 2 queued
    with pytest.raises(TooManyRequests) as refused:
        await rig.handle.submit(job("j3"))
    assert refused.value.retry_after > 0
    assert refused.value.status == 429
    stats = await rig.handle.statistics()
    assert (stats.live, stats.queued, stats.jobs_rejected) == (1, 2, 1)
    for stream in streams:
        stream.close()
    await barrier(rig.handle)
    # Room again once the queue moved on.
    async with await rig.handle.submit(job("j4")) as events:
        assert isinstance(await events.receive(), TextChunk)


async def test_no_backend_and_stale_epoch_and_duplicates(
    nursery: trio.Nursery, health: HealthHandle
) -> None:
    rig = await start(nursery, health, None)
    with pytest.raises(NoModelLoaded):
        await rig.handle.submit(job("a"))
    assert await rig.handle.detach("drain") is None
    await rig.handle.attach(ScriptedBackend(script="s" * LONG), epoch=7)
    with pytest.raises(Conflict):
        await rig.handle.attach(ScriptedBackend(), epoch=8)
    with pytest.raises(NoModelLoaded, match="model changed"):
        await rig.handle.submit(job("a"), model_epoch=6)
    async with await rig.handle.submit(job("a"), model_epoch=7):
        with pytest.raises(Conflict):
            await rig.handle.submit(job("a"))


async def test_detach_drain_waits_for_jobs_and_refuses_new_ones(
    nursery: trio.Nursery, health: HealthHandle
) -> None:
    backend = ScriptedBackend(script="d" * 300)
    rig = await start(nursery, health, backend)
    events = await rig.handle.submit(job("a"))
    detached: list[object] = []

    async def detach() -> None:
        detached.append(await rig.handle.detach("drain"))

    async with trio.open_nursery() as inner:
        inner.start_soon(detach)
        await barrier(rig.handle)
        with pytest.raises(NoModelLoaded, match="being unloaded"):
            await rig.handle.submit(job("b"))
        received = await collect(events)
    assert text_of(received) == "d" * 300  # the running job finished in full
    assert detached == [backend]
    assert not (await rig.handle.statistics()).attached


async def test_detach_cancel_fails_running_jobs(
    nursery: trio.Nursery, health: HealthHandle
) -> None:
    backend = ScriptedBackend(script="c" * LONG)
    rig = await start(nursery, health, backend)
    events = await rig.handle.submit(job("a"))
    assert await rig.handle.detach("cancel") is backend
    final = (await collect(events))[-1]
    assert isinstance(final, Failed)
    assert isinstance(final.error, ServiceUnavailable)
    assert backend.cancelled == ["a"]
    assert backend.statistics().live_jobs == 0


async def test_shutdown_ends_streams_with_an_error(health: HealthHandle) -> None:
    backend = ScriptedBackend(script="s" * LONG)
    async with trio.open_nursery() as outer:
        rig = await start(outer, health, backend)
        events = await rig.handle.submit(job("a"))
        outer.cancel_scope.cancel()
    received = await collect(events)
    assert isinstance(received[-1], Failed)
    assert received[-1].error.message == "server shutting down"
    with pytest.raises(ServiceUnavailable):
        await rig.handle.submit(job("b"))


async def test_stop_after_detach_ends_the_scheduler(health: HealthHandle) -> None:
    backend = ScriptedBackend(script="s" * LONG)
    async with trio.open_nursery() as outer:
        rig = await start(outer, health, backend)
        events = await rig.handle.submit(job("a"))
        with pytest.raises(Conflict, match="detach"):
            await rig.handle.stop()
        assert await rig.handle.detach("cancel") is backend
        await rig.handle.stop()
        # run() has returned by itself: nothing is left for the nursery to cancel.
    assert not outer.cancel_scope.cancelled_caught
    final = (await collect(events))[-1]
    assert isinstance(final, Failed)
    with pytest.raises(NoModelLoaded, match="model changed"):
        await rig.handle.submit(job("b"))
    with pytest.raises(NoModelLoaded):
        await rig.handle.statistics()
    await rig.handle.cancel("b")  # a stopped scheduler runs nothing: ignored


async def test_next_step_starts_before_the_clients_handle_the_last_one(
    nursery: trio.Nursery, health: HealthHandle
) -> None:
    # The device must not idle while clients format what the previous step produced:
    # when a client receives step 1's text, step 2 is already running in the worker.
    steps_started = 0
    second_step = threading.Event()

    def before_step() -> None:
        nonlocal steps_started
        steps_started += 1
        if steps_started == 2:
            second_step.set()

    rig = await start(nursery, health, ScriptedBackend(script="abc", before_step=before_step))
    async with await rig.handle.submit(job("a")) as events:
        first = await events.receive()
        assert isinstance(first, TextChunk)
        # Blocks the event loop on purpose: only a step already started can set it.
        assert second_step.wait(timeout=5), "the next step waited for the client"
        rest = [event async for event in events]
    assert first.text + text_of(rest) == "abc"


# -- with the real reference engine -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tabby.testing.tiny import make_tiny_hf

    return make_tiny_hf(tmp_path_factory.mktemp("tiny") / "tiny-llama")


async def reference_backend(path: Path) -> object:
    from tabby.backends import reference

    spec = LoadSpec(path=path, name="tiny", max_seq_len=256, cache_size=1024, max_batch_size=4)
    return await trio.to_thread.run_sync(reference.load, spec, lambda _: None)


async def test_reference_engine_batches_and_frees_cache_on_disconnect(
    nursery: trio.Nursery, health: HealthHandle, tiny_model: Path
) -> None:
    from tabby.backends.reference import ReferenceBackend

    backend = await reference_backend(tiny_model)
    assert isinstance(backend, ReferenceBackend)
    rig = await start(nursery, health, None)
    await rig.handle.attach(backend, epoch=1)
    prompt = tuple(backend.tokenizer.encode("The quick brown fox"))
    greedy = GenerationJob("x", prompt, 24, sampler=SamplerSettings(temperature=0.0))
    gone = await rig.handle.submit(attrs.evolve(greedy, job_id="gone", max_new_tokens=200))
    results: list[list[JobEvent]] = []

    async def run(job_id: str) -> None:
        results.append(await collect(await rig.handle.submit(attrs.evolve(greedy, job_id=job_id))))

    async with trio.open_nursery() as clients:
        for i in range(3):
            clients.start_soon(run, f"j{i}")
        assert isinstance(await gone.receive(), TextChunk)
        gone.close()
    assert all(isinstance(r[-1], Finished) for r in results)
    assert len({text_of(r) for r in results}) == 1  # same greedy prompt, same text
    await barrier(rig.handle)
    stats = await rig.handle.statistics()
    assert stats.steps < 3 * 24  # batched, not one job after the other
    assert (stats.live, stats.queued, stats.cache_pages_used) == (0, 0, 0)
    assert backend.statistics().cache_pages_used == 0


HANDOFF = Capabilities(handoff=True)


class HandoffScripted(ScriptedBackend):
    """A scripted backend with a hand-off point the test can hold closed."""

    def __init__(self, **kw: object) -> None:
        super().__init__(capabilities=HANDOFF, **kw)  # type: ignore[arg-type]
        self.at_handoff = threading.Event()
        self.go = threading.Semaphore(0)
        self.gated = False
        self.produced: dict[str, int] = {}  # bytes of text per job, as the steps made them

    def step_with_handoff(self, handoff: Callable[[], None]) -> list[JobResult]:
        if self.gated:
            self.at_handoff.set()
            assert self.go.acquire(timeout=10), "the test never opened the hand-off"
        handoff()
        results = self.step()
        for r in results:
            self.produced[r.job_id] = self.produced.get(r.job_id, 0) + len(r.text)
        return results


async def _reach_handoff(backend: HandoffScripted) -> None:
    assert await trio.to_thread.run_sync(backend.at_handoff.wait, 10)
    backend.at_handoff.clear()


def _drain(channel: trio.MemoryReceiveChannel[JobEvent]) -> str:
    text = ""
    while True:
        try:
            event = channel.receive_nowait()
        except trio.WouldBlock:
            return text
        if isinstance(event, TextChunk):
            text += event.text


@pytest.mark.parametrize("streams", [HOLD_MIN_STREAMS, HOLD_MIN_STREAMS - 1])
async def test_results_of_many_streams_go_out_at_the_next_steps_handoff(
    nursery: trio.Nursery, health: HealthHandle, streams: int
) -> None:
    script = "abcdefghijklmnopqrstuvwxyz" * 4
    backend = HandoffScripted(script=script)
    rig = await start(nursery, health, backend)
    channels = [await rig.handle.submit(job(f"j{i}")) for i in range(streams)]
    received = [""] * streams
    backend.gated = True
    for _ in range(2):  # the last job's first token may come in the first of these
        await _reach_handoff(backend)
        backend.go.release()
    await _reach_handoff(backend)  # the next step, stopped before its hand-off
    await trio.sleep(0.05)
    for i, channel in enumerate(channels):
        received[i] += _drain(channel)
    behind = [backend.produced[f"j{i}"] - len(received[i]) for i in range(streams)]
    # Enough streams: the last step's text waits for this step's hand-off; fewer: it
    # went out as soon as that step ended.
    assert behind == [1 if streams >= HOLD_MIN_STREAMS else 0] * streams
    backend.gated = False
    backend.go.release()
    with trio.fail_after(5):
        for i, channel in enumerate(channels):
            received[i] += text_of(await collect(channel))
    assert received == [script] * streams  # nothing lost or reordered by holding back
    stats = await rig.handle.statistics()
    assert (stats.jobs_finished, stats.live) == (streams, 0)


def test_step_in_thread_hands_off_exactly_once() -> None:
    calls: list[str] = []

    class Plain(ScriptedBackend):
        def step(self) -> list[JobResult]:
            calls.append("step")
            return super().step()

    class Silent(ScriptedBackend):  # has a hand-off point but nothing to run this time
        def step_with_handoff(self, handoff: Callable[[], None]) -> list[JobResult]:
            calls.append("step")
            return []

    class Failing(ScriptedBackend):
        def step_with_handoff(self, handoff: Callable[[], None]) -> list[JobResult]:
            raise RuntimeError("device lost")

    def handoff() -> None:
        calls.append("handoff")

    step_in_thread(Plain(), handoff)
    assert calls == ["handoff", "step"]  # no hand-off point: before the step
    calls.clear()
    step_in_thread(Silent(capabilities=HANDOFF), handoff)
    assert calls == ["step", "handoff"]  # never reached: after the step
    calls.clear()
    results, _, _ = step_in_thread(Failing(capabilities=HANDOFF), handoff)
    assert isinstance(results, RuntimeError)
    assert calls == ["handoff"]
    calls.clear()
    backend = HandoffScripted(script="ab")
    backend.enqueue(job("x"))
    step_in_thread(backend, handoff)
    assert calls == ["handoff"]


def test_a_handoff_point_counts_only_when_the_capabilities_declare_it() -> None:
    calls: list[str] = []

    class Undeclared(ScriptedBackend):  # has the method, but does not declare it
        def step_with_handoff(self, handoff: Callable[[], None]) -> list[JobResult]:
            calls.append("step_with_handoff")
            return super().step_with_handoff(handoff)

    assert handoff_step(Undeclared()) is None
    step_in_thread(Undeclared(), lambda: calls.append("handoff"))
    assert calls == ["handoff"]  # the plain step, handed off before it
    declared = Undeclared(capabilities=HANDOFF)
    assert handoff_step(declared) is declared
    calls.clear()
    step_in_thread(declared, lambda: calls.append("handoff"))
    assert calls == ["step_with_handoff", "handoff"]


async def test_a_step_with_a_first_token_is_not_held(
    nursery: trio.Nursery, health: HealthHandle
) -> None:
    backend = HandoffScripted(script="x" * 200)
    rig = await start(nursery, health, backend)
    ids = [f"j{i}" for i in range(HOLD_MIN_STREAMS)]
    channels = {i: await rig.handle.submit(job(i)) for i in ids}
    backend.gated = True
    await _reach_handoff(backend)

    async def late() -> None:
        channels["late"] = await rig.handle.submit(job("late"))

    nursery.start_soon(late)
    await trio.sleep(0.05)  # the submit waits in the inbox while the step runs
    backend.go.release()  # this step's results are held: every job had its first token
    await _reach_handoff(backend)  # the step that admits "late" and makes its first token
    backend.go.release()
    await _reach_handoff(backend)  # the step after it
    await trio.sleep(0.05)
    received = {i: len(_drain(c)) for i, c in channels.items()}
    behind = {i: backend.produced[i] - received[i] for i in channels}
    assert behind == dict.fromkeys(channels, 0)  # nothing held: "late" had its first token
    backend.gated = False
    backend.go.release()
    for channel in channels.values():
        channel.close()
