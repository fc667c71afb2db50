"""The ModelManager's load task: loads and unloads, one at a time, in arrival order.

A load (DESIGN.md, "Model load"): make room (every resident model is unloaded: one
model is loaded at a time), load the new backend in a worker thread on its device's
limiter while streaming ``LoadProgress``, start its scheduler, publish the new state.
A failed load leaves no model (the previous one is already gone), a health problem that
the next successful load clears, and a :class:`LoadFailed` event for the caller.

While a load runs the published state names it (``ServingState.loading``), and
generation requests wait for its end (``when_loaded``) instead of being refused by the
model on its way out. A load that has to let running jobs finish says so first
(:class:`JobsDraining`).
"""

from __future__ import annotations

import logging
import math

import trio

from tabby.actors.mailbox import Reply, answer
from tabby.actors.messages import JobsDraining, LoadEvent, LoadFailed, ModelLoaded
from tabby.actors.models.handle import StateHolder
from tabby.actors.models.operations import (
    LoadOp,
    Operation,
    Problems,
    UnloadOp,
    as_load_error,
    progress_sender,
    send_event,
    send_final,
)
from tabby.actors.models.planning import LoadPlan, Planner
from tabby.actors.models.residency import Residency, ResidentModel
from tabby.backends.base import LoadProgress
from tabby.errors import ServiceUnavailable, TabbyError
from tabby.serving.state import ServingState
from tabby.serving.structured import compiler_for

__all__ = ["LoadTask"]

log = logging.getLogger(__name__)

# What a state without a model has (the epoch stays: it only grows).
_NO_MODEL: dict[str, object] = {
    "model": None,
    "tokenizer": None,
    "constraints": None,
    "model_name": None,
    "model_path": None,
    "backend_name": None,
    "load_spec": None,
    "settings": {},
    "template": None,
    "loras": (),
    "draft": None,
    "scheduler": None,
}


class LoadTask:
    """Runs the queued operations; the only code that changes which models are resident."""

    def __init__(
        self,
        *,
        planner: Planner,
        holder: StateHolder,
        residency: Residency,
        problems: Problems,
    ) -> None:
        self._planner = planner
        self._holder = holder
        self._residency = residency
        self._problems = problems
        # Only the manager queues operations; unbounded so its main loop never waits.
        self._ops_send, self._ops = trio.open_memory_channel[Operation](math.inf)
        self.loading: str | None = None  # the model being loaded now
        # Who waits for the load in progress to end (answered with the state after it).
        self._load_waiters: list[Reply[ServingState]] = []
        self.loads = 0
        self.load_failures = 0
        self.unloads = 0

    def queue(self, operation: Operation) -> None:
        self._ops_send.send_nowait(operation)

    def when_loaded(self, reply: Reply[ServingState]) -> None:
        """Answer ``reply`` with the state once no load is in progress (now, if none is)."""
        if self.loading is None:
            answer(reply, self._holder.state)
        else:
            self._load_waiters.append(reply)

    @property
    def load_waiters(self) -> int:
        """Requests still waiting (one that gave up has closed its reply channel)."""
        return sum(1 for r in self._load_waiters if r.statistics().open_receive_channels)

    def _wake_load_waiters(self) -> None:
        waiters, self._load_waiters = self._load_waiters, []
        for reply in waiters:
            answer(reply, self._holder.state)

    @property
    def queued(self) -> int:
        return self._ops.statistics().current_buffer_used

    async def run(self) -> None:
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
        plan, state = op.plan, self._holder.state
        if not op.force and state.loaded and state.model_path == plan.entry.path and (
            state.backend_name == plan.backend.name
        ):
            if op.progress is not None:
                op.progress.send_nowait(LoadProgress("model", 1, 1, "finished"))  # room: fresh
            self._finish_load(op, state)
            return
        self.loading = plan.entry.name
        self._holder.publish(loading=plan.entry.name)
        try:
            await self._take_down(skip_queue=plan.skip_queue, progress=op.progress)
            new_state = await self._bring_up(plan, op.progress)
        except TabbyError as exc:
            self.load_failures += 1
            log.error("loading %r failed: %s", plan.entry.name, exc.message)
            self._problems.report("load", f"loading model {plan.entry.name!r} failed: {exc.message}")
            send_final(op.progress, LoadFailed(exc))
            if op.done is not None:
                answer(op.done, error=exc)
            return
        finally:
            self.loading = None
            if self._holder.state.loading is not None:
                self._holder.publish(loading=None)
            self._wake_load_waiters()
        self.loads += 1
        self._problems.clear("load")
        self._finish_load(op, new_state)

    @staticmethod
    def _finish_load(op: LoadOp, state: ServingState) -> None:
        send_final(op.progress, ModelLoaded(state))
        if op.done is not None:
            answer(op.done, state)

    async def _take_down(
        self, *, skip_queue: bool, progress: trio.MemorySendChannel[LoadEvent] | None = None
    ) -> None:
        """Unload every resident model and publish a state without a model."""
        if not len(self._residency) and not self._holder.state.loaded:
            return
        for resident in self._residency:
            if not skip_queue and progress is not None:
                running = await _running_jobs(resident)
                if running:
                    log.info("loading waits for %d running jobs of %s", running, resident.name)
                    send_event(progress, JobsDraining(running))
            await self._residency.remove(resident.name, skip_queue=skip_queue)
        self.unloads += 1
        self._holder.publish(epoch=self._holder.state.epoch, **_NO_MODEL)

    async def _bring_up(
        self, plan: LoadPlan, progress: trio.MemorySendChannel[LoadEvent] | None
    ) -> ServingState:
        device = plan.spec.device
        log.info("loading %s with the %s backend on %s", plan.entry.name, plan.backend.name, device)
        try:
            backend = await trio.to_thread.run_sync(
                plan.backend.load,
                plan.spec,
                progress_sender(progress),
                limiter=self._residency.limiters[device],
            )
        except Exception as exc:
            raise as_load_error(exc, plan.entry.name) from exc
        epoch = self._holder.state.epoch + 1
        try:
            template = await trio.to_thread.run_sync(
                self._planner.model_template, plan, backend.info.chat_template
            )
            scheduler = await self._residency.start_scheduler(backend, device=device, epoch=epoch)
        except BaseException:
            await self._residency.close_backend(plan.entry.name, backend, device)
            raise
        state = self._holder.publish(
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
            scheduler=scheduler,
            loading=None,
        )
        self._residency.add(ResidentModel(plan.entry.name, device, backend, scheduler, state))
        return state


async def _running_jobs(resident: ResidentModel) -> int:
    """The jobs a draining unload of ``resident`` waits for (0 if its scheduler is gone)."""
    try:
        stats = await resident.scheduler.statistics()
    except ServiceUnavailable:
        return 0
    return stats.queued + stats.live
