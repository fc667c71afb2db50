"""Splitting generated text into ``reasoning_content`` and ``content`` by tags.

Streaming, one splitter per choice::

    splitter = ReasoningSplitter("<think>", "</think>", prefilled=template_opens_tag)
    for delta in deltas:
        part = splitter.feed(delta)     # part.reasoning / part.content: new text of each
    part = splitter.finish()            # what was held back
    splitter.seen                       # whether there was any reasoning at all

Not streaming: ``reasoning, content = split_reasoning(text, prefilled=...)`` (reasoning
is None when the reply has none).

Rules: reasoning is recognised only at the start of the reply (after whitespace), or
from the first token when the template pre-fills the opening tag (``prefilled``; a
model that writes the opening tag anyway has it dropped). A tag split across deltas is
held back until it is complete or ruled out. Whitespace around the reasoning and
between the end tag and the answer is dropped. Text after the answer starts is never
re-examined. A reply that ends inside reasoning has everything in ``reasoning``.

With a constraint, the answer alone is constrained: make the masker with
``ConstraintCompiler.masker(spec, reasoning_end=end)`` when reasoning is on.
"""

from __future__ import annotations

from typing import Literal

import attrs

__all__ = ["DEFAULT_END", "DEFAULT_START", "ReasoningPart", "ReasoningSplitter", "split_reasoning"]

DEFAULT_START = "<think>"
DEFAULT_END = "</think>"

_State = Literal["start", "reasoning", "gap", "content"]


@attrs.frozen
class ReasoningPart:
    reasoning: str = ""
    content: str = ""


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Streaming reasoning/content splitter (one per choice; not thread-safe)."""

    def __init__(
        self, start: str = DEFAULT_START, end: str = DEFAULT_END, *, prefilled: bool = False
    ) -> None:
        if not start or not end:
            raise ValueError("reasoning tags must not be empty")
        self._start, self._end = start, end
        self._state: _State = "reasoning" if prefilled else "start"
        self._fresh = True  # nothing but whitespace of the reasoning seen yet
        self._held = ""
        self.seen = prefilled

    def feed(self, text: str) -> ReasoningPart:
        reasoning: list[str] = []
        content: list[str] = []
        buf = self._held + text
        self._held = ""
        while buf:
            if self._state == "start":
                buf = self._at_start(buf, content)
            elif self._state == "reasoning":
                buf = self._in_reasoning(buf, reasoning)
            elif self._state == "gap":
                buf = buf.lstrip()
                if buf:
                    self._state = "content"
            else:
                content.append(buf)
                buf = ""
        return ReasoningPart("".join(reasoning), "".join(content))

    def _at_start(self, buf: str, content: list[str]) -> str:
        body = buf.lstrip()
        if body.startswith(self._start):
            self._state, self.seen = "reasoning", True
            return body[len(self._start) :]
        if self._start.startswith(body):  # whitespace, or the tag so far
            self._held = buf
            return ""
        self._state = "content"
        content.append(buf)
        return ""

    def _in_reasoning(self, buf: str, reasoning: list[str]) -> str:
        if self._fresh:
            buf = buf.lstrip()
            if not buf:
                return ""
            if buf.startswith(self._start):  # a pre-filled tag that the model repeats
                buf = buf[len(self._start) :]
                self._fresh = False
                return buf
            if self._start.startswith(buf):
                self._held = buf
                return ""
            self._fresh = False
        at = buf.find(self._end)
        if at >= 0:
            reasoning.append(buf[:at].rstrip())
            self._state = "gap"
            return buf[at + len(self._end) :]
        # Hold back what may be the end tag's start, and trailing whitespace (it is
        # dropped if the end tag follows).
        keep = _partial_suffix(buf, self._end)
        body = buf[: len(buf) - keep]
        stripped = body.rstrip()
        reasoning.append(stripped)
        self._held = body[len(stripped) :] + buf[len(buf) - keep :]
        return ""

    def finish(self) -> ReasoningPart:
        """End of generation: release what was held back."""
        held, self._held = self._held, ""
        if self._state == "start":
            return ReasoningPart(content=held)
        if self._state == "reasoning":
            return ReasoningPart(reasoning=held.rstrip())
        return ReasoningPart()


def split_reasoning(
    text: str,
    start: str = DEFAULT_START,
    end: str = DEFAULT_END,
    *,
    prefilled: bool = False,
) -> tuple[str | None, str]:
    """(reasoning or None, content) of a whole reply."""
    splitter = ReasoningSplitter(start, end, prefilled=prefilled)
    first, last = splitter.feed(text), splitter.finish()
    reasoning = first.reasoning + last.reasoning
    return (reasoning if splitter.seen else None), first.content + last.content
