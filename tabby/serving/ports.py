"""The small interfaces the serving core needs from the actors, as protocols.

``serving/`` runs jobs without importing ``actors/``: a model's scheduler handle
satisfies :class:`JobSubmitter` and the model manager's handle satisfies
:class:`ModelSource`; ``tabby.server`` wires the real handles in, and tests may pass
anything with the same methods.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import trio

from tabby.jobs import GenerationJob
from tabby.jobs.events import JobEvent
from tabby.serving.permission import Permission

if TYPE_CHECKING:
    from tabby.serving.state import ServingState

__all__ = ["JobSubmitter", "ModelSource"]


class JobSubmitter(Protocol):
    """Runs generation jobs on one model (a model's scheduler)."""

    async def submit(
        self, job: GenerationJob, *, model_epoch: int | None = None
    ) -> trio.MemoryReceiveChannel[JobEvent]:
        """Admit ``job`` and return its event stream; closing the stream cancels it."""
        ...

    async def cancel(self, job_id: str) -> None:
        """Stop a job by id (unknown ids are ignored)."""
        ...


class ModelSource(Protocol):
    """Which model serves a request (the model manager)."""

    def serving_state(self) -> ServingState:
        """The current snapshot; never blocks."""
        ...

    async def ensure_model(self, name: str | None, permission: Permission) -> ServingState:
        """The state to generate with, after an inline load the request's model asks for;
        ModelNotFound when ``name`` names nothing that may be served."""
        ...

    async def wait_for_load(self) -> ServingState:
        """The state once no load is in progress (at once when none is)."""
        ...
