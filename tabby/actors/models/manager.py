"""ModelManager: which models are loaded, with which draft, LoRAs, template and preset.

It publishes a frozen :class:`ServingState` after every change (see
:class:`~tabby.actors.models.handle.StateHolder`) and owns the resident models, each
with its own GenerationScheduler (see ``residency``). Loads, unloads and LoRA changes run
one at a time in the manager's load task (``loading``), in the order they arrive
(concurrent load requests are serialized); listings, template and preset switches are
answered by the main loop meanwhile. One model is loaded at a time.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from tabby.actors.health import HealthHandle
from tabby.actors.mailbox import Answer, Mailbox, Reply, answer
from tabby.actors.models.handle import ModelManagerHandle, StateHolder
from tabby.actors.models.loading import LoadTask
from tabby.actors.models.messages import (
    AwaitLoad,
    EnsureModel,
    GetServingState,
    ListModels,
    LoadLoras,
    LoadModel,
    ManagerMessage,
    ModelManagerStats,
    SwitchPreset,
    SwitchTemplate,
    UnloadLoras,
    UnloadModel,
    UnloadPreset,
    UnloadTemplate,
)
from tabby.actors.models.operations import LoadOp, Problems, UnloadOp
from tabby.actors.models.planning import Planner
from tabby.actors.models.residency import Residency
from tabby.backends.base import LoraSpec
from tabby.backends.registry import BackendRegistry, default_registry
from tabby.config import ModelConfigSection, TabbyConfig
from tabby.errors import (
    AuthenticationError,
    InvalidRequest,
    ModelNotFound,
    NoModelLoaded,
    TabbyError,
)
from tabby.serving.model_settings import LoraLoadResult, LoraRequest, ModelLoadRequest
from tabby.serving.permission import Permission
from tabby.serving.presets import SamplerPreset, load_preset, preset_from_dict
from tabby.serving.state import ServingState

__all__ = ["ModelManager"]

log = logging.getLogger(__name__)

# Admin commands are rare and small; a full inbox only delays the caller briefly.
INBOX_BUFFER = 64


class ModelManager:
    """See the module docstring."""

    def __init__(
        self,
        config: TabbyConfig,
        *,
        health: HealthHandle | None = None,
        registry: BackendRegistry | None = None,
        startup_load: bool = True,
    ) -> None:
        self._config = config
        self._problems = Problems(health)
        self._planner = Planner(config, registry if registry is not None else default_registry())
        self._startup_load = startup_load
        self._holder = StateHolder()
        self._inbox_send, self._inbox = trio.open_memory_channel[ManagerMessage](INBOX_BUFFER)
        self._residency = Residency(max_queued=config.network.max_queued_requests, health=health)
        self._loads = LoadTask(
            planner=self._planner,
            holder=self._holder,
            residency=self._residency,
            problems=self._problems,
        )

    @property
    def handle(self) -> ModelManagerHandle:
        return ModelManagerHandle(Mailbox(self._inbox_send, "model manager"), self._holder)

    @property
    def _state(self) -> ServingState:
        return self._holder.state

    def _publish(self, **changes: Any) -> None:
        state = self._holder.publish(**changes)
        resident = self._residency.get(state.model_name)
        if resident is not None:
            resident.state = state

    def statistics(self) -> ModelManagerStats:
        state, loads = self._state, self._loads
        return ModelManagerStats(
            model_name=state.model_name,
            backend_name=state.backend_name,
            epoch=state.epoch,
            version=state.version,
            loading=loads.loading,
            load_waiters=loads.load_waiters,
            queued_operations=loads.queued,
            loads=loads.loads,
            load_failures=loads.load_failures,
            unloads=loads.unloads,
            resident=self._residency.names(),
            devices=self._residency.limiters.statistics(),
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
                self._residency.serve_in(nursery)
                nursery.start_soon(self._loads.run)
                await self._startup()
                task_status.started(self.handle)
                async with self._inbox:
                    async for message in self._inbox:
                        await self._handle(message)
        finally:
            await self._residency.close_all()

    async def _startup(self) -> None:
        preset = await _startup_preset(self._config, self._problems)
        if preset is not None:
            self._publish(preset_name=self._config.sampling.override_preset, preset=preset)
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
            self._problems.report("load", f"startup model {name!r}: {exc.message}")
            return
        self._loads.queue(LoadOp(plan, None, done_send))
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
            self._loads.queue(LoadOp(plan, message.progress, None))
            answer(message.accepted)
        elif isinstance(message, UnloadModel):
            self._loads.queue(UnloadOp(message.skip_queue, message.reply))
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
        elif isinstance(message, AwaitLoad):
            self._loads.when_loaded(message.reply)
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
        self._loads.queue(LoadOp(plan, None, done_send, force=True))
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
        name, state, config = message.name, self._state, self._config.model
        if not name or name in config.dummy_model_names:
            answer(message.reply, state)
            return
        if await trio.to_thread.run_sync(self._planner.names_loaded, name, state):
            answer(message.reply, state)
            return
        plan = None
        if config.inline_model_loading:
            try:
                plan = await trio.to_thread.run_sync(
                    self._planner.plan, ModelLoadRequest(model_name=name), True
                )
            except InvalidRequest as exc:
                if exc.code != "model_not_found":
                    raise
        if plan is None:
            if not state.loaded:
                # Nothing is served under any name: that is what the caller must hear.
                answer(message.reply, state)
                return
            raise ModelNotFound(_not_found_message(name, state, config), param="model")
        if message.permission is not Permission.ADMIN:
            raise AuthenticationError(
                f"switching to model {name!r} through the model field needs the admin key",
                param="model",
            )
        self._loads.queue(LoadOp(plan, None, message.reply))


async def _startup_preset(config: TabbyConfig, problems: Problems) -> SamplerPreset | None:
    """The configured sampler preset; a missing or bad one is a health problem, not fatal."""
    name = config.sampling.override_preset
    if not name:
        return None
    directory = config.resolve_shipped(config.sampling.overrides_dir)
    try:
        preset: SamplerPreset = await trio.to_thread.run_sync(load_preset, directory, name)
    except TabbyError as exc:
        log.warning("sampler preset %r not selected: %s", name, exc.message)
        problems.report("preset", f"sampler preset {name!r}: {exc.message}")
        return None
    return preset


def _not_found_message(name: str, state: ServingState, config: ModelConfigSection) -> str:
    served = state.model_name
    hint = "" if config.inline_model_loading else " (inline model loading is off)"
    return (
        f"the model {name!r} does not exist or is not served here{hint}; "
        f"this server serves {served!r} (see GET /v1/models)"
    )
