"""The ModelManager: the loaded models, each with its own GenerationScheduler.

Modules, one concept each:

* ``messages`` — what it accepts and its stats;
* ``handle`` — :class:`ModelManagerHandle` and the published state's holder;
* ``manager`` — :class:`ModelManager`, the main loop: commands, templates, presets;
* ``loading`` and ``operations`` — the load task and what it is given to do;
* ``residency`` — the resident models, their schedulers and the per-device limiters;
* ``planning`` and ``listing`` — turning a request into a checked plan; what can be loaded.
"""

from tabby.actors.models.handle import ModelManagerHandle, StateHolder
from tabby.actors.models.manager import ModelManager
from tabby.actors.models.messages import (
    EnsureModel,
    GetManagerStats,
    GetServingState,
    ListKind,
    ListModels,
    LoadLoras,
    LoadModel,
    ModelManagerStats,
    SwitchPreset,
    SwitchTemplate,
    UnloadLoras,
    UnloadModel,
    UnloadPreset,
    UnloadTemplate,
)
from tabby.actors.models.residency import DeviceStats, ResidentModel
from tabby.serving.model_settings import LoraLoadResult

__all__ = [
    "DeviceStats",
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
    "ResidentModel",
    "StateHolder",
    "SwitchPreset",
    "SwitchTemplate",
    "UnloadLoras",
    "UnloadModel",
    "UnloadPreset",
    "UnloadTemplate",
]
