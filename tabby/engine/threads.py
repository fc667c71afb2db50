"""How many threads a decode step runs on, chosen by how long steps take.

A decode step is hundreds of small kernels, each a parallel region that ends in a
barrier. When every core is the engine's, more threads are faster; when another
process holds one of the cores, each barrier waits for a thread the kernel has
descheduled, and a step on all cores can run ten times slower than on one. Which case
holds changes from second to second on a shared machine, so it is measured.

One thread is the safe choice and where decoding starts. Now and then a couple of
steps try every core; when each of them beats one thread's time, decoding moves to
every core, and goes back to one thread at the first step slower than one thread was.
A trial that loses doubles the wait before the next one, so a machine where all cores
collapse costs one slow step per trial, ever more rarely.
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
        max_wait: int = 1024,
        trial_steps: int = 2,
        margin: float = 0.85,
        smoothing: float = 0.25,
    ) -> None:
        self.max_threads = max_threads
        self._on_all = False  # decoding on every core (else one thread)
        self._first_trial = first_trial
        self._max_wait = max_wait
        self._trial_steps = trial_steps
        self._margin = margin  # every core must take under this fraction of one's time
        self._smoothing = smoothing
        self._wait = first_trial
        self._until_trial = first_trial
        self._single: float | None = None  # smoothed step time on one thread
        self._trial: list[float] = []
        self._trying = False

    @property
    def current(self) -> int:
        return self.max_threads if self._on_all else 1

    def next_threads(self) -> int:
        """The count for the coming decode step."""
        ready = self.max_threads > 1 and self._single is not None
        self._trying = ready and not self._on_all and self._until_trial <= 0
        return self.max_threads if self._trying else self.current

    def record(self, seconds: float) -> None:
        """The time of the decode step run on the count ``next_threads`` gave."""
        if self._trying:
            self._trying = False
            assert self._single is not None
            if seconds >= self._margin * self._single:
                self._lost()
                return
            self._trial.append(seconds)
            if len(self._trial) == self._trial_steps:
                self._trial.clear()
                self._on_all = True
                self._wait = self._first_trial
            return
        if self._on_all:
            if self._single is not None and seconds > self._single:
                # The cores are shared again; every core won its last trial, so the
                # next one comes as soon as it did.
                self._on_all = False
                self._until_trial = self._wait
            return
        self._until_trial -= 1
        if self._single is None:
            self._single = seconds
        else:
            self._single += self._smoothing * (seconds - self._single)

    def _lost(self) -> None:
        self._trial.clear()
        self._wait = min(2 * self._wait, self._max_wait)
        self._until_trial = self._wait

    def reset(self) -> None:
        """Forget the measured time (the batch changed: steps are no longer comparable)."""
        self._single = None
        self._on_all = False
        self._trial.clear()
        self._trying = False
