"""What the ModelManager accepts: its commands, with their reply channels, and its stats."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs
import trio

from tabby.actors.mailbox import Reply
from tabby.actors.messages import LoadEvent
from tabby.actors.models.residency import DeviceStats
from tabby.serving.model_settings import LoraLoadResult, LoraRequest, ModelLoadRequest
from tabby.serving.permission import Permission
from tabby.serving.state import ServingState

__all__ = [
    "AwaitLoad",
    "EnsureModel",
    "GetManagerStats",
    "GetServingState",
    "ListKind",
    "ListModels",
    "LoadLoras",
    "LoadModel",
    "ManagerMessage",
    "ModelManagerStats",
    "SwitchPreset",
    "SwitchTemplate",
    "UnloadLoras",
    "UnloadModel",
    "UnloadPreset",
    "UnloadTemplate",
]

ListKind = Literal["models", "drafts", "loras", "templates", "presets"]


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
class AwaitLoad:
    """Answer with the state once no load is in progress (at once when none is)."""

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
    | AwaitLoad
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
    load_waiters: int  # requests waiting for that load to end
    queued_operations: int
    loads: int
    load_failures: int
    unloads: int
    resident: tuple[str, ...]  # the loaded models, each with its own scheduler
    devices: tuple[DeviceStats, ...]  # every device a model was loaded on
