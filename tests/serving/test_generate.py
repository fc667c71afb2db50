"""The one generation path (no server): a neutral request in, one event stream out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tabby.backends.scripted import ScriptedBackend
from tabby.config import ModelConfigSection, ModelSettings, TabbyConfig
from tabby.errors import GenerationFailed, NoModelLoaded
from tabby.jobs import GenerationJob, JobStats
from tabby.jobs.events import Failed, Finished, JobEvent, TextChunk
from tabby.serving.generate import (
    ChoiceFinished,
    ChoiceText,
    GenerationEvent,
    GenerationService,
    Usage,
)
from tabby.serving.permission import Permission
from tabby.serving.requests import ChatMessage, ChatRequest, CompletionRequest
from tabby.serving.sampling import SamplerParams
from tabby.serving.state import ServingState
from tabby.serving.templating import load_named_template

REPO = Path(__file__).resolve().parents[2]


def stats(generated: int, cached: int = 0) -> JobStats:
    return JobStats(
        prompt_tokens=3, cached_tokens=cached, generated_tokens=generated,
        queue_time=0.5, prefill_time=0.25, decode_time=1.0,
    )  # fmt: skip


@attrs.define
class FakeScheduler:
    """Answers every job with the scripted events of its choice (by job id suffix)."""

    scripts: dict[str, list[JobEvent]]
    submitted: list[GenerationJob] = attrs.Factory(list)
    channels: list[trio.MemorySendChannel[JobEvent]] = attrs.Factory(list)
    cancelled: list[str] = attrs.Factory(list)

    async def submit(
        self, job: GenerationJob, *, model_epoch: int | None = None
    ) -> trio.MemoryReceiveChannel[JobEvent]:
        self.submitted.append(job)
        events = self.scripts[job.job_id.rsplit("-", 1)[-1]]
        send, receive = trio.open_memory_channel[JobEvent](len(events) + 1)
        for event in events:
            send.send_nowait(event)
        self.channels.append(send)
        if events and isinstance(events[-1], Finished | Failed):
            send.close()  # as the scheduler does after a job's last event
        return receive

    async def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)


@attrs.define
class FakeModels:
    state: ServingState
    loads: list[str | None] = attrs.Factory(list)

    def serving_state(self) -> ServingState:
        return self.state

    loaded: trio.Event = attrs.Factory(trio.Event)

    async def ensure_model(self, name: str | None, permission: Permission) -> ServingState:
        self.loads.append(name)
        return attrs.evolve(self.state, model_name=name)

    async def wait_for_load(self) -> ServingState:
        await self.loaded.wait()
        return self.state


def service(scripts: dict[str, list[JobEvent]], **config: Any) -> tuple[GenerationService, Any]:
    backend = ScriptedBackend(name="m", max_seq_len=64)
    scheduler = FakeScheduler(scripts)
    state = ServingState(
        epoch=1,
        model=backend.info,
        tokenizer=backend.tokenizer,
        model_name="m",
        template=load_named_template(REPO / "templates", "chatml"),
        settings=ModelSettings(**config.pop("settings", {})),
        scheduler=scheduler,
    )
    return GenerationService(FakeModels(state), TabbyConfig(**config)), scheduler


async def events_of(
    svc: GenerationService, request: ChatRequest | CompletionRequest, label: str = "test"
) -> list[GenerationEvent]:
    generation = await svc.start(request, Permission.API, "rid", label=label)
    async with generation.stream() as events:
        return [event async for event in events]


def without_usage(events: Sequence[GenerationEvent]) -> list[GenerationEvent]:
    assert isinstance(events[-1], Usage)
    return list(events[:-1])


async def test_completion_events_usage_and_metrics_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tabby.metrics")
    script: list[JobEvent] = [
        TextChunk("Hel", (1,)),
        TextChunk("lo", (2,)),
        Finished("stop", stop_str="\n", stats=stats(2, cached=1)),
    ]
    svc, scheduler = service({"0": script})
    events = await events_of(svc, CompletionRequest(prompts=("ab",)), label="kobold")
    assert without_usage(events) == [
        ChoiceText(0, "Hel", None, (), 0),
        ChoiceText(0, "lo", None, (), 3),
        ChoiceFinished(0, "stop", "\n"),
    ]
    usage = events[-1]
    assert isinstance(usage, Usage)
    assert (usage.stats.prompt_tokens, usage.stats.completion_tokens) == (3, 2)
    assert (usage.stats.cached_tokens, usage.stats.total_tokens) == (1, 5)
    assert [job.job_id for job in scheduler.submitted] == ["rid-0"]
    assert "kobold rid: 3 prompt tokens (1 cached" in caplog.text


async def test_choices_merge_and_collect() -> None:
    scripts: dict[str, list[JobEvent]] = {
        "0": [TextChunk("a", (1,)), Finished("length", stats=stats(1))],
        "1": [TextChunk("b", (1,)), TextChunk("c", (2,)), Finished("stop", stats=stats(2))],
    }
    svc, _ = service(scripts)
    generation = await svc.start(CompletionRequest(prompts=("x",), n=2), Permission.API, "rid", label="t")
    result = await generation.collect()
    assert [(c.text, c.finished) for c in result.choices] == [
        ("a", ChoiceFinished(0, "length")),
        ("bc", ChoiceFinished(1, "stop")),
    ]
    assert result.usage.completion_tokens == 3
    assert result.usage.prompt_tokens == 2  # BOS + "x", counted once for both choices


async def test_chat_reasoning_is_split_and_the_tail_released() -> None:
    script: list[JobEvent] = [
        TextChunk("<think>why", (1,)),
        TextChunk("</think>be", (2,)),
        TextChunk("cause", (3,)),
        Finished("stop", stats=stats(3)),
    ]
    svc, _ = service({"0": script}, settings={"reasoning": True})
    request = ChatRequest(messages=(ChatMessage(content="Hi"),))
    events = without_usage(await events_of(svc, request))
    reasoning = "".join(e.reasoning or "" for e in events if isinstance(e, ChoiceText))
    content = "".join(e.content or "" for e in events if isinstance(e, ChoiceText))
    assert (reasoning, content) == ("why", "because")
    assert events[-1] == ChoiceFinished(0, "stop")
    collected = await (await svc.start(request, Permission.API, "r2", label="t")).collect()
    choice = collected.choices[0]
    assert (choice.reasoning, choice.content, choice.text) == ("why", "because", "<think>why</think>because")


async def test_a_failed_job_raises_and_leaving_cancels_the_jobs() -> None:
    scripts: dict[str, list[JobEvent]] = {
        "0": [TextChunk("a", (1,)), Failed(GenerationFailed("boom"))],
        "1": [TextChunk("b", (1,))],  # never finishes: cancelled when the stream ends
    }
    svc, scheduler = service(scripts)
    generation = await svc.start(CompletionRequest(prompts=("x",), n=2), Permission.API, "r", label="t")
    with pytest.raises(GenerationFailed):
        await generation.collect()
    # The job still running saw its stream closed: the scheduler cancels it.
    with pytest.raises(trio.BrokenResourceError):
        scheduler.channels[1].send_nowait(TextChunk("late", (9,)))


async def test_state_resolution_and_inline_loading() -> None:
    with pytest.raises(NoModelLoaded):
        await GenerationService(None, TabbyConfig()).serving_state(None, Permission.API)
    empty = GenerationService(FakeModels(ServingState()), TabbyConfig())
    with pytest.raises(NoModelLoaded):
        empty.loaded_state()
    assert empty.current_state() == ServingState()
    svc, _ = service({})
    models = svc._models
    # The loaded model's id, a dummy name and no name answer without asking the source.
    for name in ("m", "gpt-3.5-turbo", "", None):
        assert (await svc.serving_state(name, Permission.API)).model_name == "m"
    assert models.loads == []
    # Any other name is the model manager's to resolve (alias, inline load or 404).
    loaded = await svc.serving_state("other", Permission.API)
    assert (loaded.model_name, models.loads) == ("other", ["other"])


async def test_requests_wait_for_a_load_in_progress(autojump_clock: trio.abc.Clock) -> None:
    svc, _ = service({}, model=ModelConfigSection(switch_wait_timeout=10.0))
    models = svc._models
    ready = models.state
    models.state = attrs.evolve(ready, loading="m", model=None, model_name=None)
    got: list[ServingState] = []
    async with trio.open_nursery() as nursery:

        async def ask() -> None:
            got.append(await svc.serving_state("m", Permission.API))

        nursery.start_soon(ask)
        await trio.sleep(5)
        assert got == []
        models.state = ready
        models.loaded.set()
    assert got == [ready]
    # A load that outlasts the wait: 503 with a hint when to retry.
    models.state = attrs.evolve(ready, loading="n")
    models.loaded = trio.Event()
    start = trio.current_time()
    with pytest.raises(NoModelLoaded) as late:
        await svc.serving_state(None, Permission.API)
    assert trio.current_time() - start == pytest.approx(10.0)
    assert late.value.retry_after is not None


def test_sampling_is_plain_sampler_params() -> None:
    assert type(CompletionRequest(prompts=("x",)).sampling) is SamplerParams
