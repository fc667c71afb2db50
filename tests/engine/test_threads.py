"""The decode thread count follows the measured step times."""

from __future__ import annotations

from collections.abc import Callable

from tabby.engine.threads import DecodeThreads


def _run(dt: DecodeThreads, steps: int, cost: Callable[[int], float]) -> list[int]:
    used = []
    for _ in range(steps):
        n = dt.next_threads()
        used.append(n)
        dt.record(cost(n))
    return used


def test_one_core_never_varies() -> None:
    dt = DecodeThreads(1)
    assert set(_run(dt, 100, lambda n: 0.01)) == {1}


def test_keeps_every_core_while_that_is_faster() -> None:
    dt = DecodeThreads(4, first_trial=8)
    used = _run(dt, 200, lambda n: 0.01 if n == 4 else 0.018)
    assert dt.current == 4
    # Trials back off: a handful of single-step trials in 200 steps.
    assert 2 <= used.count(1) <= 6


def test_moves_to_one_thread_when_all_cores_collapse_and_back() -> None:
    dt = DecodeThreads(2, first_trial=8)
    busy = [True]

    def cost(n: int) -> float:
        # Another process holds a core: two threads wait at every barrier.
        return (0.15 if n == 2 else 0.02) if busy[0] else (0.01 if n == 2 else 0.02)

    _run(dt, 40, cost)
    assert dt.current == 1
    used = _run(dt, 200, cost)
    assert used.count(2) <= 6  # each losing trial costs one slow step, ever rarer
    busy[0] = False
    _run(dt, 600, cost)
    assert dt.current == 2


def test_one_fast_sample_does_not_switch() -> None:
    dt = DecodeThreads(2, first_trial=4)
    one_thread = iter([0.001] + [0.02] * 100)  # the first trial step is a lucky one
    used = _run(dt, 50, lambda n: 0.01 if n == 2 else next(one_thread))
    assert used.count(1) >= 2
    assert dt.current == 2


def test_reset_forgets_the_time() -> None:
    dt = DecodeThreads(2, first_trial=2)
    _run(dt, 3, lambda n: 1.0)
    dt.reset()
    # No time measured since: no trial until one is.
    assert dt.next_threads() == 2
