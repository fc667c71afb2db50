"""Stream items that several actors and the HTTP layer share.

A generation job's events are :mod:`tabby.jobs.events`. A model load's progress channel carries :data:`LoadEvent` items:
a :class:`JobsDraining` while the model on its way out finishes its running jobs,
``LoadProgress`` events of the backend, then exactly one :class:`ModelLoaded` or
:class:`LoadFailed`, then the channel closes.

Consumers never need to look at anything but these classes; every error they see is a
:class:`tabby.errors.TabbyError`, so the HTTP layer can map it without inspecting text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs

from tabby.backends.base import LoadProgress
from tabby.errors import TabbyError

if TYPE_CHECKING:
    from tabby.serving.state import ServingState

__all__ = [
    "JobsDraining",
    "LoadEvent",
    "LoadFailed",
    "LoadProgress",
    "ModelLoaded",
]


@attrs.frozen
class JobsDraining:
    """The load waits for ``running`` jobs of the current model to finish first."""

    running: int


@attrs.frozen
class ModelLoaded:
    """A load finished; ``state`` is the ServingState published with the new model."""

    state: ServingState


@attrs.frozen
class LoadFailed:
    """A load failed after it was accepted; the last event of the progress stream."""

    error: TabbyError


LoadEvent = JobsDraining | LoadProgress | ModelLoaded | LoadFailed
