"""HealthMonitor: the one owner of the server's health record.

Other actors report problems and their recovery by message; ``GET /health`` asks for a
snapshot. A problem is identified by ``(source, key)`` so that the component that opened
it can close it again: unlike upstream, health recovers once every open problem is cleared.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime

import attrs
import trio

from tabby.actors.mailbox import Mailbox, Reply, answer

__all__ = [
    "ClearProblem",
    "GetHealth",
    "GetHealthStats",
    "HealthHandle",
    "HealthMonitor",
    "HealthReport",
    "HealthStats",
    "Problem",
    "ReportProblem",
]

log = logging.getLogger(__name__)

# Reports come from other actors through ``send_nowait`` and must never be refused, so
# the inbox is unbounded; the monitor drains each message at once and they are tiny.
INBOX_BUFFER = math.inf
# The oldest problems are dropped beyond this, so a flapping source cannot grow the record.
MAX_PROBLEMS = 100


# -- messages ---------------------------------------------------------------------------


@attrs.frozen
class ReportProblem:
    """Open (or update) the problem ``key`` of ``source``."""

    source: str
    key: str
    description: str


@attrs.frozen
class ClearProblem:
    """The problem ``key`` of ``source`` is fixed."""

    source: str
    key: str


@attrs.frozen
class GetHealth:
    reply: Reply[HealthReport]


@attrs.frozen
class GetHealthStats:
    reply: Reply[HealthStats]


# -- replies ----------------------------------------------------------------------------


@attrs.frozen
class Problem:
    time: datetime  # UTC, when the problem was first reported
    source: str
    key: str
    description: str

    def to_json(self) -> dict[str, str]:
        return {
            "time": self.time.isoformat(),
            "source": self.source,
            "description": self.description,
        }


@attrs.frozen
class HealthReport:
    problems: tuple[Problem, ...]

    @property
    def healthy(self) -> bool:
        return not self.problems


@attrs.frozen
class HealthStats:
    open_problems: int
    reports_received: int
    clears_received: int
    problems_dropped: int  # the oldest ones, beyond MAX_PROBLEMS


HealthMessage = ReportProblem | ClearProblem | GetHealth | GetHealthStats


# -- handle -----------------------------------------------------------------------------


@attrs.frozen
class HealthHandle:
    """What other components hold: a send channel into the monitor's inbox."""

    _mailbox: Mailbox[HealthMessage]

    def report(self, source: str, key: str, description: str) -> None:
        """Open a problem; never blocks, safe to call from any actor."""
        self._post(ReportProblem(source, key, description))

    def clear(self, source: str, key: str) -> None:
        """Close a problem (no-op if it is not open); never blocks."""
        self._post(ClearProblem(source, key))

    def _post(self, message: HealthMessage) -> None:
        # The inbox is unbounded: it refuses only once the monitor is gone, which happens
        # only while the server shuts down, and the record dies with it.
        if not self._mailbox.try_post(message):
            log.debug("health monitor stopped; dropped %r", message)

    async def get(self) -> HealthReport:
        return await self._mailbox.ask(GetHealth)

    async def statistics(self) -> HealthStats:
        return await self._mailbox.ask(GetHealthStats)


# -- actor ------------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


class HealthMonitor:
    def __init__(self, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self._clock = clock
        self._problems: dict[tuple[str, str], Problem] = {}
        self._reports = 0
        self._clears = 0
        self._dropped = 0
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[HealthMessage](
            INBOX_BUFFER
        )

    @property
    def handle(self) -> HealthHandle:
        return HealthHandle(Mailbox(self._inbox_send, "health monitor"))

    def statistics(self) -> HealthStats:
        return HealthStats(
            open_problems=len(self._problems),
            reports_received=self._reports,
            clears_received=self._clears,
            problems_dropped=self._dropped,
        )

    async def run(
        self, *, task_status: trio.TaskStatus[HealthHandle] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with self._inbox_receive:
            task_status.started(self.handle)
            async for message in self._inbox_receive:
                self._handle(message)

    def _handle(self, message: HealthMessage) -> None:
        if isinstance(message, ReportProblem):
            self._reports += 1
            self._open(message)
        elif isinstance(message, ClearProblem):
            self._clears += 1
            if self._problems.pop((message.source, message.key), None) is not None:
                log.info("health: %s recovered (%s)", message.source, message.key)
        elif isinstance(message, GetHealth):
            answer(message.reply, HealthReport(tuple(self._problems.values())))
        else:
            answer(message.reply, self.statistics())

    def _open(self, message: ReportProblem) -> None:
        ident = (message.source, message.key)
        previous = self._problems.get(ident)
        first_seen = previous.time if previous is not None else self._clock()
        self._problems[ident] = Problem(
            first_seen, message.source, message.key, message.description
        )
        if previous is None or previous.description != message.description:
            log.warning("health: %s: %s", message.source, message.description)
        while len(self._problems) > MAX_PROBLEMS:
            del self._problems[next(iter(self._problems))]
            self._dropped += 1
