"""One generation path for every protocol: a neutral request in, one event stream out.

A protocol maps its body onto a :class:`~tabby.serving.requests.ChatRequest` or
:class:`~tabby.serving.requests.CompletionRequest` and asks its
:class:`GenerationService` for a :class:`Generation`::

    generation = await service.prepare(request, permission, request_id, label="chat")
    await generation.submit()          # every job admitted, or an error before any stream
    async with generation.stream() as events:
        async for event in events:     # ChoiceText ..., ChoiceFinished per choice, Usage
            ...

:meth:`GenerationService.prepare` resolves the serving state (waiting for a model that
is loading; the model ``request.model`` names, or the inline load it asks for: 404 for a
name nothing serves; 503 without a model), plans in a worker thread
(constraints compile there) and logs the request. The stream carries, per choice, its
new text (split into reasoning and content, with its logprobs), the held-back tail and
the tool calls when it finishes (after its constrained second pass, if it wants one),
then the usage of the whole request (the metrics line is logged then).
:meth:`Generation.collect` is the same stream gathered into whole answers.

Leaving the stream, normally or not, cancels every job still running.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio

from tabby.config import TabbyConfig
from tabby.errors import NoModelLoaded
from tabby.jobs import FinishReason, TokenLogprob
from tabby.jobs.events import Finished, TextChunk
from tabby.serving.permission import Permission
from tabby.serving.planning import GenerationPlan, plan_chat, plan_completion
from tabby.serving.ports import ModelSource
from tabby.serving.requests import ChatRequest, CompletionRequest
from tabby.serving.running import (
    ChoiceAccumulator,
    ChoiceEvent,
    JobSource,
    RunningGeneration,
    submit_all,
)
from tabby.serving.state import ServingState
from tabby.serving.tool_flow import ChoiceOutput, run_tool_pass
from tabby.serving.tools import ToolCall
from tabby.serving.usage import UsageStats, log_metrics, log_request, make_usage

__all__ = [
    "ChoiceFinished",
    "ChoiceResult",
    "ChoiceText",
    "Generation",
    "GenerationEvent",
    "GenerationResult",
    "GenerationService",
    "Usage",
]

# How soon a request refused after waiting for a load may try again.
_RETRY_AFTER_S = 5.0


@attrs.frozen
class ChoiceText:
    """New output of one choice. ``content`` is None when there is none to show (a
    chat choice whose text is reasoning or held back); ``offset`` is where it starts in
    the choice's generated text."""

    index: int
    content: str | None
    reasoning: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    offset: int = 0


@attrs.frozen
class ChoiceFinished:
    """One choice ended. ``stop_str`` is None when it ended with tool calls;
    ``cancelled`` when it was stopped by an explicit cancel (e.g. an abort)."""

    index: int
    finish_reason: FinishReason
    stop_str: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    cancelled: bool = False


@attrs.frozen
class Usage:
    """The last event: what the whole request cost."""

    stats: UsageStats


GenerationEvent = ChoiceText | ChoiceFinished | Usage


@attrs.frozen
class ChoiceResult:
    """One choice's whole answer."""

    index: int
    text: str  # everything generated (the completion's text)
    content: str | None  # the chat message content (None when only tool calls)
    reasoning: str | None  # the reasoning split off, when the model's is
    logprobs: tuple[TokenLogprob, ...]
    finished: ChoiceFinished | None  # None: its job ended without finishing

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self.finished.tool_calls if self.finished is not None else ()


@attrs.frozen
class GenerationResult:
    choices: tuple[ChoiceResult, ...]
    usage: UsageStats


class Generation:
    """One planned request: submit it, then read its stream once (see the module doc)."""

    def __init__(self, plan: GenerationPlan, *, label: str) -> None:
        self.plan = plan
        self._label = label
        # Per choice, everything generated so far (also read while it runs, e.g. by
        # Kobold's generate/check).
        self.choices = tuple(ChoiceAccumulator(i) for i in range(len(plan.jobs)))
        self._outputs = tuple(ChoiceOutput(plan.chat) for _ in plan.jobs)
        self._plain = plan.chat is None or plan.chat.plain
        self._running: RunningGeneration | None = None
        self._started = time.perf_counter()

    async def submit(self) -> None:
        """Admit every job; on any refusal the admitted ones are cancelled."""
        self._running = await submit_all(self.plan)

    @asynccontextmanager
    async def stream(self) -> AsyncIterator[AsyncIterator[GenerationEvent]]:
        """The request's events; enter it in the task that reads them (it may own the
        tasks that merge several jobs' streams)."""
        running = self._running
        if running is None:
            raise RuntimeError("submit() the generation before streaming it")
        try:
            events = self._events(await running.open())
            try:
                yield events
            finally:
                # Closed here, not left suspended for the garbage collector to finalize.
                await events.aclose()
        finally:
            await running.aclose()

    async def collect(self) -> GenerationResult:
        """Run the stream to its end; every choice's whole answer and the usage."""
        finished: dict[int, ChoiceFinished] = {}
        usage: UsageStats | None = None
        async with self.stream() as events:
            async for event in events:
                if isinstance(event, ChoiceFinished):
                    finished[event.index] = event
                elif isinstance(event, Usage):
                    usage = event.stats
        assert usage is not None  # the stream always ends with it
        return GenerationResult(
            tuple(self._result(acc, finished.get(acc.index)) for acc in self.choices), usage
        )

    def _result(self, acc: ChoiceAccumulator, finished: ChoiceFinished | None) -> ChoiceResult:
        out = self._outputs[acc.index]
        text = acc.text
        content = text if self._plain else out.message_content()
        reasoning = None if self._plain else out.message_reasoning()
        return ChoiceResult(acc.index, text, content, reasoning, tuple(acc.logprobs), finished)

    async def _events(self, source: JobSource) -> AsyncGenerator[GenerationEvent, None]:
        plan, choices, outputs, plain = self.plan, self.choices, self._outputs, self._plain
        async for item in source:
            if isinstance(item, ChoiceEvent):
                index, event = item.index, item.event
            else:
                index, event = 0, item
            acc = choices[index]
            offset = acc.length
            acc.add(event)  # a Failed event raises its error here
            if isinstance(event, TextChunk):
                if plain:
                    yield ChoiceText(index, event.text, None, event.logprobs, offset)
                else:
                    part = outputs[index].feed(event.text)
                    content, reasoning = part.content or None, part.reasoning or None
                    yield ChoiceText(index, content, reasoning, event.logprobs, offset)
            elif isinstance(event, Finished):
                out = outputs[index]
                if out.wants_tool_pass(event):
                    await run_tool_pass(plan, index, out)
                tail = out.finish(event)
                if tail.content or tail.reasoning:
                    yield ChoiceText(index, tail.content or None, tail.reasoning or None)
                calls = out.calls
                yield ChoiceFinished(
                    index,
                    out.finish_reason(event),
                    None if calls else event.stop_str,
                    calls,
                    cancelled=event.stop_reason == "cancelled",
                )
        extra = sum(out.extra_tokens for out in outputs)
        elapsed = time.perf_counter() - self._started
        stats = make_usage(plan, choices, elapsed).with_extra_tokens(extra)
        log_metrics(plan, stats, endpoint=self._label)
        yield Usage(stats)


def _plan(request: ChatRequest | CompletionRequest, state: ServingState, rid: str) -> GenerationPlan:
    if isinstance(request, ChatRequest):
        return plan_chat(request, state, rid)
    return plan_completion(request, state, rid)


class GenerationService:
    """Where every protocol's generation requests go; one per app, holding no state of
    its own beside the model source and the config."""

    def __init__(self, models: ModelSource | None, config: TabbyConfig) -> None:
        self._models = models
        self._config = config
        self._dummy_names = frozenset(config.model.dummy_model_names)

    def current_state(self) -> ServingState:
        """The serving state now (empty without a model manager): its preset applies to
        bodies before they are validated."""
        models = self._models
        return models.serving_state() if models is not None else ServingState()

    def loaded_state(self) -> ServingState:
        """The serving state now; 503 when no model is loaded."""
        return _loaded(self.current_state())

    def switching(self) -> bool:
        """Whether a model is loading now (a request would wait for it)."""
        return self.current_state().loading is not None

    async def serving_state(self, model: str | None, permission: Permission) -> ServingState:
        """The state to generate with: the one after a load in progress (waited for up
        to ``model.switch_wait_timeout``), checked against the ``model`` field (an empty
        one means the loaded model), after an inline load it asks for."""
        models = self._models
        if models is None:
            raise NoModelLoaded("no model is loaded")
        state = models.serving_state()
        if state.loading is not None:
            state = await self._wait_for_load(models, state.loading)
        # The common names answer without asking the model manager.
        if model and model != state.model_name and model not in self._dummy_names:
            state = await models.ensure_model(model, permission)
            if state.loading is not None:  # a load began meanwhile
                state = await self._wait_for_load(models, state.loading)
        return _loaded(state)

    async def _wait_for_load(self, models: ModelSource, loading: str) -> ServingState:
        timeout = self._config.model.switch_wait_timeout
        with trio.move_on_after(timeout):
            return await models.wait_for_load()
        raise NoModelLoaded(
            f"the model {loading!r} is still loading; retry later", retry_after=_RETRY_AFTER_S
        )

    async def prepare(
        self,
        request: ChatRequest | CompletionRequest,
        permission: Permission,
        request_id: str,
        *,
        label: str,
        state: ServingState | None = None,
    ) -> Generation:
        """The planned request (nothing submitted yet); ``label`` names it in the
        metrics line, ``state`` (if given) skips the lookup."""
        if state is None:
            state = await self.serving_state(request.model, permission)
        # Planning may compile constraints (and, once per model, the constraint
        # tokenizer): off the event loop.
        plan = await trio.to_thread.run_sync(_plan, request, state, request_id)
        log_request(self._config.logging, plan, request.ignored_fields)
        return Generation(plan, label=label)

    async def start(
        self,
        request: ChatRequest | CompletionRequest,
        permission: Permission,
        request_id: str,
        *,
        label: str,
    ) -> Generation:
        """:meth:`prepare`, then :meth:`Generation.submit`."""
        generation = await self.prepare(request, permission, request_id, label=label)
        await generation.submit()
        return generation


def _loaded(state: ServingState) -> ServingState:
    if not state.loaded or state.tokenizer is None or state.model is None:
        raise NoModelLoaded("no model is loaded")
    return state
