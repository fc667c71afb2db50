"""Stop strings and banned strings over streamed text.

Both checkers sit between the generator's incremental detokenizer and the job's output,
and both hold back text that could still turn into one of their strings.

**Stop strings** (:class:`StopChecker`)::

    checker = StopChecker(job.stop_strings)
    hit = checker.feed(new_text)      # every time the job's decoded text grows
    emit(hit.text)                    # safe: never part of a stop string
    if hit.stop is not None: finish(stop_reason="stop_string", stop_str=hit.stop)
    ...
    emit(checker.flush())             # the job ended another way: release what was held

The stop string and everything after it never reach the output. When several stop
strings complete, the one that completes first in the text wins (ties: the longest), so
the result does not depend on how the text was split into chunks. At most
``max(len(stop)) - 1`` characters are held.

**Banned strings** (:class:`BannedStringChecker`) work per token, because a completed
banned string must be taken back by rewinding tokens. Matching is case-insensitive. Per
sampled token::

    verdict = checker.feed(token_id, token_text)
    if verdict.rewind:
        # the banned string started in the text of the token ``verdict.rewind`` tokens
        # back (counting this one as 1): drop those tokens from the sequence and the
        # cache and sample that position again with ``checker.banned_now()`` as the
        # step's extra bans (it includes ``verdict.ban``)
    else:
        emit(verdict.text, verdict.tokens)   # released tokens and their text, in order
    ...
    next step: sample(..., extra_bans=[checker.banned_now(), ...])
    job ends: emit(*checker.flush())

Tokens are released whole, and only when no suffix of the released text could begin a
banned string (whatever comes next, including a resample after a rewind), so a rewind
never has to take back emitted text. Bans are remembered per
position: if the resampled token also leads into a banned string, both tokens are banned
at that position; rewinding to an earlier position forgets the bans made after it. A
token of a rewound span never reached the output, so the stop checker (fed with released
text only) needs no rewind.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import attrs

__all__ = ["BanVerdict", "BannedStringChecker", "StopChecker", "StopHit"]


def _proper_prefixes(strings: Iterable[str]) -> frozenset[str]:
    return frozenset(s[:k] for s in strings for k in range(1, len(s)))


def _held_suffix(text: str, prefixes: frozenset[str], longest: int) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a string."""
    for k in range(min(len(text), longest - 1), 0, -1):
        if text[-k:] in prefixes:
            return k
    return 0


def _first_match(text: str, strings: tuple[str, ...]) -> tuple[int, str] | None:
    """(start, string) of the match that ends first in ``text`` (ties: the longest)."""
    best: tuple[int, int, str] | None = None
    for s in strings:
        start = text.find(s)
        if start < 0:
            continue
        key = (start + len(s), start, s)
        if best is None or key[:2] < best[:2]:
            best = key
    return None if best is None else (best[1], best[2])


@attrs.frozen
class StopHit:
    """What :meth:`StopChecker.feed` decided."""

    text: str  # safe to emit now
    stop: str | None = None  # the stop string that matched: the job must end


class StopChecker:
    """Finds stop strings in streamed text, holding back possible beginnings."""

    def __init__(self, stop_strings: Iterable[str]) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stop_strings if s))
        self._prefixes = _proper_prefixes(self._stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self._stopped = False

    @property
    def held(self) -> str:
        """Text received but not yet released."""
        return self._held

    def feed(self, text: str) -> StopHit:
        """Take the job's newly decoded text; return what may be emitted now."""
        if self._stopped:
            return StopHit("")
        if not self._stops:
            return StopHit(text)
        buffer = self._held + text
        match = _first_match(buffer, self._stops)
        if match is not None:
            start, stop = match
            self._held = ""
            self._stopped = True
            return StopHit(buffer[:start], stop)
        keep = _held_suffix(buffer, self._prefixes, self._longest)
        self._held = buffer[len(buffer) - keep :]
        return StopHit(buffer[: len(buffer) - keep])

    def flush(self) -> str:
        """The job ended without a stop string: release the held text."""
        held, self._held = self._held, ""
        return "" if self._stopped else held


def _fold(text: str) -> str:
    """Lower-case ``text`` without changing its length (so offsets stay valid)."""
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


@attrs.frozen
class BanVerdict:
    """What :meth:`BannedStringChecker.feed` decided about one token."""

    text: str = ""  # released text, safe to emit now
    tokens: tuple[int, ...] = ()  # the released tokens (their text is ``text``)
    rewind: int = 0  # > 0: drop this many most recent tokens and resample
    ban: int | None = None  # the token banned at the rewound position


@attrs.frozen
class _Pending:
    token_id: int
    text: str
    folded: str


class BannedStringChecker:
    """Keeps banned strings out of a job's output by asking for rewinds."""

    def __init__(self, banned_strings: Iterable[str]) -> None:
        self._banned = tuple(dict.fromkeys(_fold(s) for s in banned_strings if s))
        self._prefixes = _proper_prefixes(self._banned)
        self._longest = max((len(s) for s in self._banned), default=0)
        self._pending: list[_Pending] = []
        self._position = 0  # tokens accepted so far (released or pending)
        self._bans: dict[int, set[int]] = {}

    @property
    def position(self) -> int:
        """Number of generated tokens currently accepted (the next token's index)."""
        return self._position

    @property
    def pending(self) -> int:
        """Number of tokens held back."""
        return len(self._pending)

    def banned_now(self) -> frozenset[int]:
        """Token ids banned at the next position (the step's ``extra_bans``)."""
        return frozenset(self._bans.get(self._position, ()))

    def feed(self, token_id: int, text: str) -> BanVerdict:
        """Take one sampled token and its text (may be empty)."""
        if not self._banned:
            self._position += 1
            return BanVerdict(text, (token_id,))
        self._pending.append(_Pending(token_id, text, _fold(text)))
        self._position += 1
        folded = "".join(p.folded for p in self._pending)
        match = _first_match(folded, self._banned)
        if match is not None:
            return self._rewind_to(self._token_at(match[0]))
        return self._release(self._releasable(folded))

    def flush(self) -> BanVerdict:
        """The job ended: release every held token."""
        return self._release(len(self._pending))

    def _releasable(self, folded: str) -> int:
        """How many pending tokens may be released.

        Released text must stay clean whatever follows it, including a resample after a
        rewind: no suffix of it may begin a banned string. A trailing empty-text token may
        hold the first bytes of the next character, so it stays with that character.
        """
        ends = list(itertools.accumulate(len(p.folded) for p in self._pending))
        for count in range(len(self._pending), 0, -1):
            if not self._pending[count - 1].folded:
                continue
            end = ends[count - 1]
            if _held_suffix(folded[:end], self._prefixes, self._longest) == 0:
                return count
        return 0

    def _token_at(self, offset: int) -> int:
        """Index in the pending list of the token whose text holds character ``offset``.

        Empty-text tokens just before it (the first bytes of a multi-byte character) count
        as its start.
        """
        end = 0
        index = len(self._pending) - 1
        for i, p in enumerate(self._pending):
            end += len(p.folded)
            if offset < end:
                index = i
                break
        while index > 0 and not self._pending[index - 1].folded:
            index -= 1
        return index

    def _rewind_to(self, index: int) -> BanVerdict:
        rewind = len(self._pending) - index
        banned = self._pending[index].token_id
        del self._pending[index:]
        self._position -= rewind
        for position in [p for p in self._bans if p > self._position]:
            del self._bans[position]
        self._bans.setdefault(self._position, set()).add(banned)
        return BanVerdict(rewind=rewind, ban=banned)

    def _release(self, count: int) -> BanVerdict:
        out, self._pending = self._pending[:count], self._pending[count:]
        return BanVerdict("".join(p.text for p in out), tuple(p.token_id for p in out))
