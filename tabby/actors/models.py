"""ModelManager: which model, draft, LoRAs, chat template and sampler preset are served.

It owns the backend object between loads and publishes a frozen :class:`ServingState`
after every change. Reading the state is cheap: the manager replaces the reference held
by a :class:`StateHolder` that only it writes; readers (``handle.serving_state()``)
take the reference, an immutable snapshot. That keeps one owner: nobody else can change
the state, and a reader never sees half an update, because the whole snapshot is swapped
in one assignment on the event loop's thread.

Loads, unloads and LoRA changes run one at a time in the manager's own load task, in
the order they arrive (concurrent load requests are serialized); listings, template and
preset switches are answered by the main loop meanwhile. A load (DESIGN.md, "Model
load"): validate and plan it (the name must resolve inside ``model_dir``), detach the
scheduler (drain, or cancel with ``skip_queue``), close the old backend, load the new one
in a worker thread streaming ``LoadProgress``, attach it, publish the new state. A
failed load leaves no model (the previous one is already gone), a health problem that the
next successful load clears, and a :class:`LoadFailed` event for the caller.

The module is one actor: its messages, the actor and its handle (about a third of it
docstrings). Planning, listing and the load operations already live in
``model_planning``, ``model_listing`` and ``model_loading``; the handle stays here
because it builds this module's messages, and moving it out would make an import cycle.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

import attrs
import trio

from tabby.actors.health import HealthHandle
from tabby.actors.mailbox import Answer, Mailbox, Reply, answer
from tabby.actors.messages import LoadEvent, LoadFailed, ModelLoaded
from tabby.actors.model_loading import (
    LoadOp,
    Operation,
    UnloadOp,
    as_load_error,
    progress_sender,
    send_final,
)
from tabby.actors.model_planning import LoadPlan, Planner
from tabby.actors.scheduler import SchedulerHandle
from tabby.backends.base import Backend, LoadProgress, LoraSpec
from tabby.backends.registry import BackendRegistry, default_registry
from tabby.config import TabbyConfig
from tabby.errors import (
    AuthenticationError,
    InvalidRequest,
    NoModelLoaded,
    TabbyError,
)
from tabby.serving.model_settings import LoraLoadResult, LoraRequest, ModelLoadRequest
from tabby.serving.permission import Permission
from tabby.serving.presets import SamplerPreset, load_preset, preset_from_dict
from tabby.serving.state import ServingState
from tabby.serving.structured import compiler_for

__all__ = [
    "EnsureModel",
    "GetManagerStats",
    "GetServingState",
    "ListKind",
    "ListModels",
    "LoadLoras",
    "LoadModel",
    "LoraLoadResult",
    "ModelManager",
    "ModelManagerHandle",
    "ModelManagerStats",
    "StateHolder",
    "SwitchPreset",
    "SwitchTemplate",
    "UnloadLoras",
    "UnloadModel",
    "UnloadPreset",
    "UnloadTemplate",
]

log = logging.getLogger(__name__)

# Admin commands are rare and small; a full inbox only delays the caller briefly.
INBOX_BUFFER = 64
# Progress events a slow load client may lag behind; beyond it "processing" events are
# dropped (the load itself never waits for a client).
PROGRESS_BUFFER = 256
HEALTH_SOURCE = "models"

ListKind = Literal["models", "drafts", "loras", "templates", "presets"]


# -- messages ---------------------------------------------------------------------------


@attrs.frozen
class LoadModel:
    """Load a model; ``accepted`` answers once the request is validated (errors before
    any progress), then ``progress`` streams LoadProgress and ModelLoaded/LoadFailed."""

    request: ModelLoadRequest
    progress: trio.MemorySendChannel[LoadEvent]
    accepted: Reply[None]


@attrs.frozen
class UnloadModel:
    skip_queue: bool
    reply: Reply[None]


@attrs.frozen
class LoadLoras:
    loras: tuple[LoraRequest, ...]
    skip_queue: bool
    reply: Reply[LoraLoadResult]


@attrs.frozen
class UnloadLoras:
    reply: Reply[None]


@attrs.frozen
class SwitchTemplate:
    name: str
    reply: Reply[None]


@attrs.frozen
class UnloadTemplate:
    reply: Reply[None]


@attrs.frozen
class SwitchPreset:
    """Select a preset by name, or inline ``overrides``; the name wins if both are given."""

    name: str | None
    overrides: Mapping[str, Any] | None
    reply: Reply[None]


@attrs.frozen
class UnloadPreset:
    reply: Reply[None]


@attrs.frozen
class ListModels:
    kind: ListKind
    reply: Reply[tuple[str, ...]]


@attrs.frozen
class EnsureModel:
    """The inline load of a request's ``model`` field (see ``handle.ensure_model``)."""

    name: str | None
    permission: Permission
    reply: Reply[ServingState]


@attrs.frozen
class GetServingState:
    reply: Reply[ServingState]


@attrs.frozen
class GetManagerStats:
    reply: Reply[ModelManagerStats]


ManagerMessage = (
    LoadModel
    | UnloadModel
    | LoadLoras
    | UnloadLoras
    | SwitchTemplate
    | UnloadTemplate
    | SwitchPreset
    | UnloadPreset
    | ListModels
    | EnsureModel
    | GetServingState
    | GetManagerStats
)


@attrs.frozen
class ModelManagerStats:
    model_name: str | None
    backend_name: str | None
    epoch: int
    version: int
    loading: str | None  # the model being loaded now
    queued_operations: int
    loads: int
    load_failures: int
    unloads: int


@attrs.define
class StateHolder:
    """The published ServingState; written only by the ModelManager (see module doc)."""

    state: ServingState = attrs.Factory(ServingState)


# -- handle -----------------------------------------------------------------------------


@attrs.frozen
class ModelManagerHandle:
    """What request handlers hold: the manager's inbox and a read view of its state."""

    _mailbox: Mailbox[ManagerMessage]
    _holder: StateHolder

    def serving_state(self) -> ServingState:
        """The current snapshot; never blocks (see the module docstring)."""
        return self._holder.state

    async def load_model(self, request: ModelLoadRequest) -> trio.MemoryReceiveChannel[LoadEvent]:
        """Validate and queue a load; return its event stream.

        Raises before any event for a bad request (unknown or escaping name, unknown or
        unavailable backend, draft/LoRA unsupported, bad ``tabby_config.toml``). The
        stream then carries ``LoadProgress`` events and ends with one ``ModelLoaded``
        or ``LoadFailed``. Closing the stream does not stop the load. A model that is
        already loaded yields a single finished ``LoadProgress`` and ``ModelLoaded``.
        """
        progress_send, progress_receive = trio.open_memory_channel[LoadEvent](PROGRESS_BUFFER)
        try:
            await self._mailbox.ask(partial(LoadModel, request, progress_send))
        except BaseException:
            progress_receive.close()
            raise
        return progress_receive

    async def load_model_and_wait(self, request: ModelLoadRequest) -> ServingState:
        """Load and wait for the end; raises the load's error."""
        async with await self.load_model(request) as events:
            async for event in events:
                if isinstance(event, ModelLoaded):
                    return event.state
                if isinstance(event, LoadFailed):
                    raise event.error
        raise self._mailbox.unavailable()

    async def unload_model(self, *, skip_queue: bool = True) -> None:
        """Unload the model; by default running jobs are cancelled (as upstream)."""
        await self._mailbox.ask(partial(UnloadModel, skip_queue))

    async def load_loras(
        self, loras: tuple[LoraRequest, ...], *, skip_queue: bool = False
    ) -> LoraLoadResult:
        """Replace the active LoRAs (reloads the model with them); NotSupported when
        the backend has no LoRA support."""
        return await self._mailbox.ask(partial(LoadLoras, loras, skip_queue))

    async def unload_loras(self) -> None:
        await self._mailbox.ask(UnloadLoras)

    async def switch_template(self, name: str) -> None:
        """Serve ``templates/<name>.jinja`` as the chat template (NotFound if missing)."""
        await self._mailbox.ask(partial(SwitchTemplate, name))

    async def unload_template(self) -> None:
        """Serve no chat template (chat completions are refused until a switch or load)."""
        await self._mailbox.ask(UnloadTemplate)

    async def switch_preset(
        self, name: str | None = None, overrides: Mapping[str, Any] | None = None
    ) -> None:
        """Select a sampler preset by name (wins) or from inline ``overrides``."""
        await self._mailbox.ask(partial(SwitchPreset, name, overrides))

    async def unload_preset(self) -> None:
        """No sampler preset: both the preset and its name are cleared."""
        await self._mailbox.ask(UnloadPreset)

    async def list(self, kind: ListKind) -> tuple[str, ...]:
        """Names of loadable models, draft models, LoRAs, templates or presets."""
        return await self._mailbox.ask(partial(ListModels, kind))

    async def ensure_model(self, name: str | None, permission: Permission) -> ServingState:
        """Apply a request's ``model`` field (inline loading) and return the state to use.

        Nothing happens when ``name`` is empty, names the loaded model, inline loading
        is off, or names a dummy model. A non-admin caller naming another model gets
        :class:`AuthenticationError` (401). An admin naming a model that does not exist
        is ignored with a warning. Otherwise the model is loaded with the configured
        settings only (no per-request settings) and the call returns after the load.
        """
        return await self._mailbox.ask(partial(EnsureModel, name, permission))

    async def fetch_serving_state(self) -> ServingState:
        """The state after every command queued before this one was handled."""
        return await self._mailbox.ask(GetServingState)

    async def statistics(self) -> ModelManagerStats:
        return await self._mailbox.ask(GetManagerStats)


# -- actor ------------------------------------------------------------------------------


class ModelManager:
    """See the module docstring."""

    def __init__(
        self,
        config: TabbyConfig,
        scheduler: SchedulerHandle,
        *,
        health: HealthHandle | None = None,
        registry: BackendRegistry | None = None,
        limiter: trio.CapacityLimiter | None = None,
        startup_load: bool = True,
    ) -> None:
        self._config = config
        self._scheduler = scheduler
        self._health = health
        self._registry = registry if registry is not None else default_registry()
        self._planner = Planner(config, self._registry)
        # Shared with the scheduler: loading, closing and stepping never overlap on a device.
        self._limiter = limiter if limiter is not None else trio.CapacityLimiter(1)
        self._startup_load = startup_load
        self._holder = StateHolder()
        self._inbox_send, self._inbox = trio.open_memory_channel[ManagerMessage](INBOX_BUFFER)
        # Only the manager queues operations; unbounded so the main loop never waits.
        self._ops_send, self._ops = trio.open_memory_channel[Operation](math.inf)
        self._backend: Backend | None = None
        self._loading: str | None = None
        self._loads = 0
        self._load_failures = 0
        self._unloads = 0

    @property
    def handle(self) -> ModelManagerHandle:
        return ModelManagerHandle(Mailbox(self._inbox_send, "model manager"), self._holder)

    @property
    def _state(self) -> ServingState:
        return self._holder.state

    def _publish(self, **changes: Any) -> ServingState:
        """Swap in a new snapshot (the only place the state changes)."""
        state = attrs.evolve(self._state, version=self._state.version + 1, **changes)
        self._holder.state = state
        return state

    def statistics(self) -> ModelManagerStats:
        state = self._state
        return ModelManagerStats(
            model_name=state.model_name,
            backend_name=state.backend_name,
            epoch=state.epoch,
            version=state.version,
            loading=self._loading,
            queued_operations=self._ops.statistics().current_buffer_used,
            loads=self._loads,
            load_failures=self._load_failures,
            unloads=self._unloads,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[ModelManagerHandle] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Select the startup preset, load the startup model, then serve commands.

        ``task_status.started`` comes after the startup load has finished or failed (a
        failure is logged and reported to health, not fatal), so the HTTP server starts
        with the model ready.
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_operations)
                await self._startup()
                task_status.started(self.handle)
                async with self._inbox:
                    async for message in self._inbox:
                        await self._handle(message)
        finally:
            with trio.CancelScope(shield=True):
                await self._close_backend()

    async def _startup(self) -> None:
        preset_name = self._config.sampling.override_preset
        if preset_name:
            try:
                preset = await trio.to_thread.run_sync(
                    load_preset, self._config.resolve_shipped(self._config.sampling.overrides_dir),
                    preset_name,
                )
            except TabbyError as exc:
                log.warning("sampler preset %r not selected: %s", preset_name, exc.message)
                self._report("preset", f"sampler preset {preset_name!r}: {exc.message}")
            else:
                self._publish(preset_name=preset_name, preset=preset)
        name = self._config.model.model_name
        if not (self._startup_load and name):
            return
        done_send, done_receive = trio.open_memory_channel[Answer[ServingState]](1)
        try:
            plan = await trio.to_thread.run_sync(
                self._planner.plan, ModelLoadRequest(model_name=name), True
            )
        except TabbyError as exc:
            log.error("startup model %r not loaded: %s", name, exc.message)
            self._report("load", f"startup model {name!r}: {exc.message}")
            return
        self._ops_send.send_nowait(LoadOp(plan, None, done_send))
        async with done_receive:
            outcome = await done_receive.receive()
        if outcome.error is not None:
            log.error("startup model %r not loaded: %s", name, outcome.error.message)
        elif self._config.lora.loras:
            await self._startup_loras()

    async def _startup_loras(self) -> None:
        loras = tuple(LoraRequest(name=e.name, scaling=e.scaling) for e in self._config.lora.loras)
        reply_send, reply_receive = trio.open_memory_channel[Answer[LoraLoadResult]](1)
        await self._handle(LoadLoras(loras, False, reply_send))
        async with reply_receive:
            outcome = await reply_receive.receive()
        if outcome.error is not None:
            log.error("startup LoRAs not loaded: %s", outcome.error.message)

    def _report(self, key: str, description: str) -> None:
        if self._health is not None:
            self._health.report(HEALTH_SOURCE, key, description)

    def _clear(self, key: str) -> None:
        if self._health is not None:
            self._health.clear(HEALTH_SOURCE, key)

    # -- main loop ----------------------------------------------------------------------

    async def _handle(self, message: ManagerMessage) -> None:
        try:
            await self._dispatch(message)
        except TabbyError as exc:
            reply: Reply[Any] = message.accepted if isinstance(message, LoadModel) else message.reply
            if isinstance(message, LoadModel):
                message.progress.close()
            answer(reply, error=exc)

    async def _dispatch(self, message: ManagerMessage) -> None:
        if isinstance(message, LoadModel):
            plan = await trio.to_thread.run_sync(self._planner.plan, message.request, False)
            self._ops_send.send_nowait(LoadOp(plan, message.progress, None))
            answer(message.accepted)
        elif isinstance(message, UnloadModel):
            self._ops_send.send_nowait(UnloadOp(message.skip_queue, message.reply))
        elif isinstance(message, LoadLoras | UnloadLoras):
            await self._change_loras(message)
        elif isinstance(message, SwitchTemplate | UnloadTemplate):
            await self._switch_template(message)
        elif isinstance(message, SwitchPreset | UnloadPreset):
            await self._switch_preset(message)
        elif isinstance(message, ListModels):
            names = await trio.to_thread.run_sync(self._planner.list, message.kind)
            answer(message.reply, names)
        elif isinstance(message, EnsureModel):
            await self._ensure_model(message)
        elif isinstance(message, GetServingState):
            answer(message.reply, self._state)
        else:
            answer(message.reply, self.statistics())

    async def _change_loras(self, message: LoadLoras | UnloadLoras) -> None:
        state = self._state
        if state.model_path is None or state.load_spec is None or state.backend_name is None:
            raise NoModelLoaded("no model is loaded")
        self._planner.require_lora_support(state.backend_name)
        if isinstance(message, UnloadLoras):
            specs: tuple[LoraSpec, ...] = ()
            result = LoraLoadResult((), ())
            skip_queue = False
        else:
            specs, result = await trio.to_thread.run_sync(self._planner.resolve_loras, message.loras)
            skip_queue = message.skip_queue
        plan = self._planner.replan_with_loras(state, specs, skip_queue=skip_queue)
        done_send, done_receive = trio.open_memory_channel[Answer[ServingState]](1)
        self._ops_send.send_nowait(LoadOp(plan, None, done_send, force=True))
        async with done_receive:
            outcome = await done_receive.receive()
        reply: Reply[LoraLoadResult] = message.reply  # type: ignore[assignment]
        answer(reply, result, outcome.error)

    async def _switch_template(self, message: SwitchTemplate | UnloadTemplate) -> None:
        if not self._state.loaded:
            raise NoModelLoaded("no model is loaded")
        if isinstance(message, UnloadTemplate):
            self._publish(template=None)
        else:
            template = await trio.to_thread.run_sync(self._planner.named_template, message.name)
            self._publish(template=template)
        answer(message.reply)

    async def _switch_preset(self, message: SwitchPreset | UnloadPreset) -> None:
        if isinstance(message, UnloadPreset):
            self._publish(preset_name=None, preset=None)
        elif message.name:
            directory = self._config.resolve_shipped(self._config.sampling.overrides_dir)
            preset = await trio.to_thread.run_sync(load_preset, directory, message.name)
            self._publish(preset_name=message.name, preset=preset)
        elif message.overrides is not None:
            inline: SamplerPreset = preset_from_dict("overrides", message.overrides)
            self._publish(preset_name=None, preset=inline)
        else:
            raise InvalidRequest("give a preset name or overrides", param="preset")
        answer(message.reply)

    async def _ensure_model(self, message: EnsureModel) -> None:
        name, state, cfg = message.name, self._state, self._config.model
        admin = message.permission is Permission.ADMIN
        if not name or await trio.to_thread.run_sync(self._planner.names_loaded, name, state):
            answer(message.reply, state)
            return
        if not cfg.inline_model_loading:
            if admin:
                log.warning("model %r requested but inline_model_loading is off", name)
            answer(message.reply, state)
            return
        dummy = name in cfg.dummy_model_names
        if not admin and not dummy:
            raise AuthenticationError(
                f"switching to model {name!r} through the model field needs the admin key",
                param="model",
            )
        if dummy:
            answer(message.reply, state)
            return
        try:
            plan = await trio.to_thread.run_sync(
                self._planner.plan, ModelLoadRequest(model_name=name), True
            )
        except InvalidRequest as exc:
            if exc.code != "model_not_found":
                raise
            log.warning("model %r requested inline does not exist; ignored", name)
            answer(message.reply, state)
            return
        self._ops_send.send_nowait(LoadOp(plan, None, message.reply))

    # -- the load task ------------------------------------------------------------------

    async def _run_operations(self) -> None:
        async for operation in self._ops:
            if isinstance(operation, UnloadOp):
                error = None
                try:
                    await self._take_down(skip_queue=operation.skip_queue)
                except TabbyError as exc:
                    error = exc
                answer(operation.done, error=error)
            else:
                await self._load(operation)

    async def _load(self, op: LoadOp) -> None:
        plan, state = op.plan, self._state
        if not op.force and state.loaded and state.model_path == plan.entry.path and (
            state.backend_name == plan.backend.name
        ):
            if op.progress is not None:
                op.progress.send_nowait(LoadProgress("model", 1, 1, "finished"))  # room: fresh
            self._finish_load(op, state)
            return
        self._loading = plan.entry.name
        try:
            await self._take_down(skip_queue=plan.skip_queue)
            new_state = await self._bring_up(plan, op.progress)
        except TabbyError as exc:
            self._load_failures += 1
            log.error("loading %r failed: %s", plan.entry.name, exc.message)
            self._report("load", f"loading model {plan.entry.name!r} failed: {exc.message}")
            send_final(op.progress, LoadFailed(exc))
            if op.done is not None:
                answer(op.done, error=exc)
            return
        finally:
            self._loading = None
        self._loads += 1
        self._clear("load")
        self._finish_load(op, new_state)

    @staticmethod
    def _finish_load(op: LoadOp, state: ServingState) -> None:
        send_final(op.progress, ModelLoaded(state))
        if op.done is not None:
            answer(op.done, state)

    async def _take_down(self, *, skip_queue: bool) -> None:
        """Detach the scheduler, close the backend and publish a state without a model."""
        detached = await self._scheduler.detach("cancel" if skip_queue else "drain")
        if detached is not None and detached is not self._backend:
            log.warning("scheduler handed back a backend the manager did not load")
            await trio.to_thread.run_sync(detached.close, limiter=self._limiter)
        if self._backend is None and not self._state.loaded:
            return
        await self._close_backend()
        self._unloads += 1
        self._publish(
            epoch=self._state.epoch,
            model=None,
            tokenizer=None,
            constraints=None,
            model_name=None,
            model_path=None,
            backend_name=None,
            load_spec=None,
            settings={},
            template=None,
            loras=(),
            draft=None,
            scheduler=None,
        )

    async def _close_backend(self) -> None:
        backend, self._backend = self._backend, None
        if backend is not None:
            try:
                await trio.to_thread.run_sync(backend.close, limiter=self._limiter)
            except Exception:
                log.exception("closing the backend failed")

    async def _bring_up(
        self, plan: LoadPlan, progress: trio.MemorySendChannel[LoadEvent] | None
    ) -> ServingState:
        log.info("loading %s with the %s backend", plan.entry.name, plan.backend.name)
        try:
            backend = await trio.to_thread.run_sync(
                plan.backend.load, plan.spec, progress_sender(progress), limiter=self._limiter
            )
        except Exception as exc:
            raise as_load_error(exc, plan.entry.name) from exc
        self._backend = backend
        try:
            template = await trio.to_thread.run_sync(
                self._planner.model_template, plan, backend.info.chat_template
            )
            epoch = self._state.epoch + 1
            await self._scheduler.attach(backend, epoch=epoch)
        except BaseException:
            await self._close_backend()
            raise
        return self._publish(
            epoch=epoch,
            model=backend.info,
            tokenizer=backend.tokenizer,
            constraints=compiler_for(backend.tokenizer, backend.info),
            model_name=plan.entry.name,
            model_path=plan.entry.path,
            backend_name=plan.backend.name,
            load_spec=plan.spec,
            settings=plan.settings,
            template=template,
            loras=plan.spec.loras,
            draft=plan.spec.draft,
            scheduler=self._scheduler,
        )
