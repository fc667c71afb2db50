"""ModelManagerHandle: what request handlers hold of the ModelManager."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import attrs
import trio

from tabby.actors.mailbox import Mailbox
from tabby.actors.messages import LoadEvent, LoadFailed, ModelLoaded
from tabby.actors.models.messages import (
    AwaitLoad,
    EnsureModel,
    GetManagerStats,
    GetServingState,
    ListKind,
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
from tabby.actors.scheduler import SchedulerHandle, SchedulerStats
from tabby.serving.model_settings import LoraLoadResult, LoraRequest, ModelLoadRequest
from tabby.serving.permission import Permission
from tabby.serving.state import ServingState

__all__ = ["PROGRESS_BUFFER", "ModelManagerHandle", "StateHolder"]

# Progress events a slow load client may lag behind; beyond it "processing" events are
# dropped (the load itself never waits for a client).
PROGRESS_BUFFER = 256


@attrs.define
class StateHolder:
    """The published ServingState, written only by the ModelManager.

    Reading the state is cheap: the manager replaces the reference held here; readers
    (``handle.serving_state()``) take the reference, an immutable snapshot. That keeps
    one owner: nobody else can change the state, and a reader never sees half an update,
    because the whole snapshot is swapped in one assignment on the event loop's thread.
    """

    state: ServingState = attrs.Factory(ServingState)

    def publish(self, **changes: Any) -> ServingState:
        """Swap in a new snapshot with ``changes`` (the only place the state changes)."""
        self.state = attrs.evolve(self.state, version=self.state.version + 1, **changes)
        return self.state


@attrs.frozen
class ModelManagerHandle:
    """What request handlers hold: the manager's inbox and a read view of its state."""

    _mailbox: Mailbox[ManagerMessage]
    _holder: StateHolder

    def serving_state(self) -> ServingState:
        """The current snapshot; never blocks (see :class:`StateHolder`)."""
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

        The current state, unchanged, when ``name`` is empty, names the loaded model (its
        id, its folder or file name, with or without ``.gguf``), names a dummy model, or
        when no model is loaded and ``name`` cannot be loaded inline (the caller answers
        503). With inline loading on, a model in ``model_dir`` is loaded with the
        configured settings only and the call returns after the load; a non-admin caller
        gets :class:`AuthenticationError` (401) for it. Any other name is
        :class:`ModelNotFound` (404).
        """
        return await self._mailbox.ask(partial(EnsureModel, name, permission))

    async def wait_for_load(self) -> ServingState:
        """The state once no load is in progress (at once when none is)."""
        return await self._mailbox.ask(AwaitLoad)

    async def scheduler_statistics(self) -> SchedulerStats | None:
        """The loaded model's scheduler figures (None: no model is loaded)."""
        scheduler = self._holder.state.scheduler
        if not isinstance(scheduler, SchedulerHandle):
            return None
        return await scheduler.statistics()

    async def fetch_serving_state(self) -> ServingState:
        """The state after every command queued before this one was handled."""
        return await self._mailbox.ask(GetServingState)

    async def statistics(self) -> ModelManagerStats:
        return await self._mailbox.ask(GetManagerStats)
