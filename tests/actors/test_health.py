from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import trio

from tabby.actors.health import (
    MAX_PROBLEMS,
    HealthHandle,
    HealthMonitor,
    HealthStats,
    Problem,
)
from tabby.errors import ServiceUnavailable

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def ticking_clock() -> Iterator[datetime]:
    n = 0
    while True:
        yield T0 + timedelta(seconds=n)
        n += 1


@pytest.fixture
async def monitor(nursery: trio.Nursery) -> tuple[HealthMonitor, HealthHandle]:
    ticks = ticking_clock()
    actor = HealthMonitor(clock=lambda: next(ticks))
    handle = await nursery.start(actor.run)
    return actor, handle


async def test_starts_healthy(monitor: tuple[HealthMonitor, HealthHandle]) -> None:
    _, health = monitor
    report = await health.get()
    assert report.healthy
    assert report.problems == ()


async def test_report_then_clear_recovers(monitor: tuple[HealthMonitor, HealthHandle]) -> None:
    actor, health = monitor
    health.report("scheduler", "step", "RuntimeError: boom")
    health.report("auth", "api_tokens", "bad file")
    report = await health.get()
    assert not report.healthy
    assert report.problems == (
        Problem(T0, "scheduler", "step", "RuntimeError: boom"),
        Problem(T0 + timedelta(seconds=1), "auth", "api_tokens", "bad file"),
    )
    health.clear("scheduler", "step")
    health.clear("scheduler", "never-opened")  # a no-op, not an error
    report = await health.get()
    assert [p.source for p in report.problems] == ["auth"]
    health.clear("auth", "api_tokens")
    assert (await health.get()).healthy
    assert actor.statistics() == HealthStats(
        open_problems=0, reports_received=2, clears_received=3, problems_dropped=0
    )


async def test_repeated_report_keeps_first_time_and_updates_text(
    monitor: tuple[HealthMonitor, HealthHandle],
) -> None:
    _, health = monitor
    health.report("embedder", "load", "first")
    health.report("other", "x", "in between")
    health.report("embedder", "load", "second")
    problems = (await health.get()).problems
    assert problems[0] == Problem(T0, "embedder", "load", "second")
    assert len(problems) == 2


async def test_problem_json_is_utc_iso(monitor: tuple[HealthMonitor, HealthHandle]) -> None:
    _, health = monitor
    health.report("auth", "api_tokens", "bad")
    (problem,) = (await health.get()).problems
    assert problem.to_json() == {
        "time": "2026-01-02T03:04:05+00:00",
        "source": "auth",
        "description": "bad",
    }


async def test_record_is_bounded(monitor: tuple[HealthMonitor, HealthHandle]) -> None:
    _, health = monitor
    for i in range(MAX_PROBLEMS + 5):
        health.report("flappy", f"k{i}", "down")
    problems = (await health.get()).problems
    assert len(problems) == MAX_PROBLEMS
    assert problems[0].key == "k5"  # the oldest were dropped


async def test_statistics_through_the_handle(monitor: tuple[HealthMonitor, HealthHandle]) -> None:
    _, health = monitor
    for i in range(MAX_PROBLEMS + 2):
        health.report("flappy", f"k{i}", "down")
    health.clear("flappy", f"k{MAX_PROBLEMS + 1}")
    assert await health.statistics() == HealthStats(
        open_problems=MAX_PROBLEMS - 1,
        reports_received=MAX_PROBLEMS + 2,
        clears_received=1,
        problems_dropped=2,
    )


async def test_handle_after_monitor_stopped() -> None:
    actor = HealthMonitor()
    async with trio.open_nursery() as nursery:
        health = await nursery.start(actor.run)
        nursery.cancel_scope.cancel()
    health.report("late", "k", "shutting down")  # must not raise
    health.clear("late", "k")
    with pytest.raises(ServiceUnavailable, match="the health monitor is not running"):
        await health.get()
    with pytest.raises(ServiceUnavailable):
        await health.statistics()
