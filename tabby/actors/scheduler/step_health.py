"""How the scheduler reports failing backend steps to the HealthMonitor."""

from __future__ import annotations

from tabby.actors.health import HealthHandle

__all__ = ["HEALTHY_STEPS_TO_CLEAR", "HEALTH_SOURCE", "StepHealth"]

# Consecutive successful steps after a step failure before the health problem clears.
HEALTHY_STEPS_TO_CLEAR = 3
HEALTH_SOURCE = "scheduler"
HEALTH_KEY = "step"


class StepHealth:
    """Opens the ``scheduler/step`` problem on a failed step and clears it after
    HEALTHY_STEPS_TO_CLEAR good ones.

    A fresh scheduler starts as if after a failure: a failure of the previous model's
    scheduler stays on record until the device has served again, as it did when one
    scheduler outlived every model (clearing a problem that is not open is a no-op).
    """

    def __init__(self, health: HealthHandle | None) -> None:
        self._health = health
        self._failing = True
        self._good_steps = 0

    def failed(self, description: str) -> None:
        self._good_steps = 0
        self._failing = True
        if self._health is not None:
            self._health.report(HEALTH_SOURCE, HEALTH_KEY, description)

    def succeeded(self) -> None:
        if not self._failing:
            return
        self._good_steps += 1
        if self._good_steps >= HEALTHY_STEPS_TO_CLEAR:
            self._failing = False
            if self._health is not None:
                self._health.clear(HEALTH_SOURCE, HEALTH_KEY)
