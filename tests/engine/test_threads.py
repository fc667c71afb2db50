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


def test_moves_to_every_core_when_that_is_faster() -> None:
    dt = DecodeThreads(4, first_trial=8)
    used = _run(dt, 200, lambda n: 0.01 if n == 4 else 0.018)
    assert dt.current == 4
    assert used[-100:] == [4] * 100


def test_stays_on_one_thread_while_every_core_collapses_and_moves_when_it_stops() -> None:
    dt = DecodeThreads(2, first_trial=8)
    busy = [True]

    def cost(n: int) -> float:
        # Another process holds a core: two threads wait at every barrier.
        return (0.15 if n == 2 else 0.02) if busy[0] else (0.01 if n == 2 else 0.02)

    used = _run(dt, 300, cost)
    assert dt.current == 1
    assert used.count(2) <= 6  # each losing trial costs one slow step, ever rarer
    busy[0] = False
    _run(dt, 1200, cost)
    assert dt.current == 2
    busy[0] = True
    used = _run(dt, 2, cost)
    assert used == [2, 1]  # back to one thread after the first slow step


def test_one_fast_sample_does_not_switch() -> None:
    dt = DecodeThreads(2, first_trial=4)
    two_threads = iter([0.001] + [0.02] * 100)  # the first trial step is a lucky one
    used = _run(dt, 50, lambda n: 0.01 if n == 1 else next(two_threads))
    assert used.count(2) >= 2
    assert dt.current == 1


def test_reset_forgets_the_time() -> None:
    dt = DecodeThreads(2, first_trial=2)
    _run(dt, 6, lambda n: 0.01 if n == 2 else 0.1)
    assert dt.current == 2
    dt.reset()
    # Back on one thread, and no trial until its time is measured again.
    assert dt.next_threads() == 1
