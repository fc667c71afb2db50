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
``max(len(stop)) - 1`` characters are held. Matching runs on one Aho–Corasick automaton
(:class:`Matcher`), so memory and time stay linear in the strings' length.

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

from collections import deque
from collections.abc import Iterable

import attrs

__all__ = ["BanVerdict", "BannedStringChecker", "Matcher", "StopChecker", "StopHit"]


class Matcher:
    """An Aho–Corasick automaton over a set of strings: memory and time linear in them.

    A state stands for the longest suffix of the text scanned so far that is a prefix of
    one of the strings; its :meth:`depth` is that suffix's length, which is how much text
    must be held back because it could still become a match. :meth:`step` advances by one
    character and reports the longest string that ends there, so scanning left to right
    finds the match that ends first (ties: the longest), whatever the chunking.
    """

    ROOT = 0

    def __init__(self, strings: Iterable[str]) -> None:
        # Per state: transitions, suffix link, depth, and the longest string ending here.
        self._goto: list[dict[str, int]] = [{}]
        self._fail: list[int] = [0]
        self._depth: list[int] = [0]
        self._ends: list[str | None] = [None]
        for string in strings:
            self._add(string)
        self._link()

    def _add(self, string: str) -> None:
        state = self.ROOT
        for char in string:
            nxt = self._goto[state].get(char)
            if nxt is None:
                nxt = len(self._goto)
                self._goto[state][char] = nxt
                self._goto.append({})
                self._fail.append(self.ROOT)
                self._depth.append(self._depth[state] + 1)
                self._ends.append(None)
            state = nxt
        self._ends[state] = string

    def _link(self) -> None:
        # Breadth first, so a state's suffix link is final before its children need it.
        queue = deque(self._goto[self.ROOT].values())
        while queue:
            state = queue.popleft()
            for char, child in self._goto[state].items():
                queue.append(child)
                fail = self._fail[state]
                while fail and char not in self._goto[fail]:
                    fail = self._fail[fail]
                link = self._goto[fail].get(char, self.ROOT)
                self._fail[child] = link if link != child else self.ROOT
                if self._ends[child] is None:
                    # No string ends exactly here: the longest one ending at a suffix does.
                    self._ends[child] = self._ends[self._fail[child]]

    def step(self, state: int, char: str) -> int:
        goto, fail = self._goto, self._fail
        while True:
            nxt = goto[state].get(char)
            if nxt is not None:
                return nxt
            if state == self.ROOT:
                return self.ROOT
            state = fail[state]

    def depth(self, state: int) -> int:
        return self._depth[state]

    def ends(self, state: int) -> str | None:
        """The longest string that ends at this state, if any."""
        return self._ends[state]

    def scan(self, state: int, text: str) -> tuple[int, int, str | None]:
        """Feed ``text``: (state, characters consumed, the string that matched or None).

        Stops right after the first match; otherwise consumes all of ``text``.
        """
        ends = self._ends
        for i, char in enumerate(text):
            state = self.step(state, char)
            found = ends[state]
            if found is not None:
                return state, i + 1, found
        return state, len(text), None


@attrs.frozen
class StopHit:
    """What :meth:`StopChecker.feed` decided."""

    text: str  # safe to emit now
    stop: str | None = None  # the stop string that matched: the job must end


class StopChecker:
    """Finds stop strings in streamed text, holding back possible beginnings."""

    def __init__(self, stop_strings: Iterable[str]) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stop_strings if s))
        self._matcher = Matcher(self._stops)
        self._state = Matcher.ROOT
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
        self._state, used, stop = self._matcher.scan(self._state, text)
        if stop is not None:
            # The match lies within the held text and what was just consumed.
            end = len(self._held) + used
            self._held = ""
            self._stopped = True
            return StopHit(buffer[: end - len(stop)], stop)
        keep = self._matcher.depth(self._state)
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
    state: int  # the matcher's state after this token's text
    clean: bool  # released up to here, no suffix could begin a banned string


class BannedStringChecker:
    """Keeps banned strings out of a job's output by asking for rewinds."""

    def __init__(self, banned_strings: Iterable[str]) -> None:
        self._banned = tuple(dict.fromkeys(_fold(s) for s in banned_strings if s))
        self._matcher = Matcher(self._banned)
        self._pending: list[_Pending] = []
        self._chars = 0  # folded characters of the pending tokens
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
        folded = _fold(text)
        # Released text always ends where no banned string can begin: the start state.
        before = self._pending[-1].state if self._pending else Matcher.ROOT
        state, used, found = self._matcher.scan(before, folded)
        # A trailing empty-text token may hold the first bytes of the next character, so
        # it stays with that character.
        clean = bool(folded) and found is None and self._matcher.depth(state) == 0
        self._pending.append(_Pending(token_id, text, folded, state, clean))
        self._position += 1
        start = self._chars
        self._chars += len(folded)
        if found is not None:
            return self._rewind_to(self._token_at(start + used - len(found)))
        return self._release(self._releasable())

    def flush(self) -> BanVerdict:
        """The job ended: release every held token."""
        return self._release(len(self._pending))

    def _releasable(self) -> int:
        """How many pending tokens may be released.

        Released text must stay clean whatever follows it, including a resample after a
        rewind: no suffix of it may begin a banned string. Every feed releases up to the
        last clean token, so only the newest one can be clean.
        """
        return len(self._pending) if self._pending and self._pending[-1].clean else 0

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
        self._chars -= sum(len(p.folded) for p in self._pending[index:])
        del self._pending[index:]
        self._position -= rewind
        for position in [p for p in self._bans if p > self._position]:
            del self._bans[position]
        self._bans.setdefault(self._position, set()).add(banned)
        return BanVerdict(rewind=rewind, ban=banned)

    def _release(self, count: int) -> BanVerdict:
        out, self._pending = self._pending[:count], self._pending[count:]
        self._chars -= sum(len(p.folded) for p in out)
        return BanVerdict("".join(p.text for p in out), tuple(p.token_id for p in out))
