"""How many threads a decode step runs on, chosen by how long steps take.

A decode step is hundreds of small kernels, each a parallel region that ends in a
barrier. When every core is the engine's, more threads are faster; when another
process holds one of the cores, each barrier waits for a thread the kernel has
descheduled, and a step on all cores can run several times slower than on one.
Which case holds changes from minute to minute on a shared machine, so the choice is
measured: decode steps run on the current count, and now and then a couple of steps
try the other. A trial step that loses ends the trial and doubles the wait before the
next one (a collapsed count costs one slow step per trial); when every trial step
wins, the other count takes over.
"""

from __future__ import annotations

__all__ = ["DecodeThreads"]


class DecodeThreads:
    """Thread count for decode-only steps; report each such step's time with ``record``."""

    def __init__(
        self,
        max_threads: int,
        *,
        first_trial: int = 16,
        max_wait: int = 512,
        trial_steps: int = 2,
        margin: float = 0.85,
        smoothing: float = 0.25,
    ) -> None:
        self.options = (max_threads, 1) if max_threads > 1 else (1,)
        self._current = 0  # index into options: start on every core
        self._first_trial = first_trial
        self._max_wait = max_wait
        self._margin = margin  # a trial must take under this fraction of the current time
        self._smoothing = smoothing
        self._wait = first_trial
        self._until_trial = first_trial
        self._mean: float | None = None  # smoothed step time on the current count
        self._trial_steps = trial_steps
        self._trial: list[float] = []  # times of this trial's steps so far
        self._trying = False

    @property
    def current(self) -> int:
        return self.options[self._current]

    def next_threads(self) -> int:
        """The count for the coming decode step."""
        if len(self.options) > 1 and self._mean is not None and self._until_trial <= 0:
            self._trying = True
            return self.options[1 - self._current]
        self._trying = False
        return self.current

    def record(self, seconds: float) -> None:
        """The time of the decode step run on the count ``next_threads`` gave."""
        if self._trying:
            self._trying = False
            assert self._mean is not None
            if seconds >= self._margin * self._mean:
                self._trial.clear()
                self._wait = min(2 * self._wait, self._max_wait)
                self._until_trial = self._wait
            else:
                self._trial.append(seconds)
                if len(self._trial) == self._trial_steps:
                    self._current = 1 - self._current
                    self._mean = sum(self._trial) / len(self._trial)
                    self._trial.clear()
                    self._wait = self._first_trial
                    self._until_trial = self._wait
            return
        self._until_trial -= 1
        if self._mean is None:
            self._mean = seconds
        else:
            self._mean += self._smoothing * (seconds - self._mean)

    def reset(self) -> None:
        """Forget the measured time (the batch changed: steps are no longer comparable)."""
        self._mean = None
        self._trial.clear()
        self._trying = False
