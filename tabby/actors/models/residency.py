"""The resident models: each loaded model with its backend, its own scheduler and state.

The ModelManager owns one :class:`Residency`. Loading a model starts a fresh
GenerationScheduler for it, as a task in the manager's nursery, and attaches the backend;
unloading detaches it (drain, or cancel with ``skip_queue``), stops the scheduler and
closes the backend. A scheduler's handle lives as long as its model: jobs still sent to
it afterwards are refused with :class:`~tabby.errors.NoModelLoaded`.

Each device has one :class:`trio.CapacityLimiter` of one token, shared by the loads,
closes and steps of every model on it, so work on one device never overlaps while
models on different devices run side by side. Devices are named as a load spec names
them (``"cpu"``, ``"cuda:0"``, ``"auto"``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import attrs
import trio

from tabby.actors.health import HealthHandle
from tabby.actors.scheduler import GenerationScheduler, SchedulerHandle
from tabby.backends.base import Backend
from tabby.errors import ServiceUnavailable
from tabby.serving.state import ServingState

__all__ = ["DeviceLimiters", "DeviceStats", "Residency", "ResidentModel"]

log = logging.getLogger(__name__)


@attrs.frozen
class DeviceStats:
    device: str
    busy: bool  # a load, close or step holds the device now
    waiting: int  # tasks waiting for it


class DeviceLimiters:
    """One limiter per device, made at its first use."""

    def __init__(self) -> None:
        self._limiters: dict[str, trio.CapacityLimiter] = {}

    def __getitem__(self, device: str) -> trio.CapacityLimiter:
        limiter = self._limiters.get(device)
        if limiter is None:
            # One token: two threads never touch one device's models at once.
            limiter = self._limiters[device] = trio.CapacityLimiter(1)
        return limiter

    def statistics(self) -> tuple[DeviceStats, ...]:
        return tuple(
            DeviceStats(name, stats.borrowed_tokens > 0, stats.tasks_waiting)
            for name, stats in sorted((n, lim.statistics()) for n, lim in self._limiters.items())
        )


@attrs.define
class ResidentModel:
    """A loaded model; ``state`` is its latest published serving state."""

    name: str
    device: str
    backend: Backend
    scheduler: SchedulerHandle
    state: ServingState


class Residency:
    """The resident models by name, each served by its own scheduler."""

    def __init__(self, *, max_queued: int | None, health: HealthHandle | None) -> None:
        self._max_queued = max_queued
        self._health = health
        self._models: dict[str, ResidentModel] = {}
        self.limiters = DeviceLimiters()
        self._nursery: trio.Nursery | None = None

    def serve_in(self, nursery: trio.Nursery) -> None:
        """Where the schedulers run: the manager's nursery."""
        self._nursery = nursery

    def __iter__(self) -> Iterator[ResidentModel]:
        return iter(list(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)

    def names(self) -> tuple[str, ...]:
        return tuple(self._models)

    def get(self, name: str | None) -> ResidentModel | None:
        return self._models.get(name) if name is not None else None

    async def start_scheduler(self, backend: Backend, *, device: str, epoch: int) -> SchedulerHandle:
        """A fresh scheduler for ``backend``, serving it from now on."""
        assert self._nursery is not None, "serve_in() first"
        scheduler = GenerationScheduler(
            max_queued=self._max_queued, health=self._health, limiter=self.limiters[device]
        )
        handle: SchedulerHandle = await self._nursery.start(scheduler.run)
        try:
            await handle.attach(backend, epoch=epoch)
        except BaseException:
            with trio.CancelScope(shield=True):
                await handle.stop()
            raise
        return handle

    def add(self, resident: ResidentModel) -> None:
        assert resident.name not in self._models, f"{resident.name} is resident already"
        self._models[resident.name] = resident

    async def remove(self, name: str, *, skip_queue: bool) -> None:
        """Detach ``name`` (drain or cancel its jobs), stop its scheduler, close its backend."""
        resident = self._models[name]
        try:
            await resident.scheduler.detach("cancel" if skip_queue else "drain")
            await resident.scheduler.stop()
        except ServiceUnavailable:
            log.warning("the scheduler of %s had stopped already", name)
        # Cancelled before this point (shutdown), the model stays for close_all, which
        # closes it after its scheduler has ended.
        del self._models[name]
        await self.close_backend(resident.name, resident.backend, resident.device)

    async def close_all(self) -> None:
        """Close every backend (shutdown: after the schedulers ended with the nursery)."""
        while self._models:
            _, resident = self._models.popitem()
            await self.close_backend(resident.name, resident.backend, resident.device)

    async def close_backend(self, name: str, backend: Backend, device: str) -> None:
        """Close ``backend`` on its device; never cut short, a failure is only logged."""
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(backend.close, limiter=self.limiters[device])
            except Exception:
                log.exception("closing the backend of %s failed", name)
