"""What a generation job's reply channel carries.

Any number of :class:`TextChunk`, then exactly one :class:`Finished` or :class:`Failed`,
then the channel closes. Consumers never need to look at anything but these classes;
every error they see is a :class:`tabby.errors.TabbyError`, so each protocol can render
it without inspecting text.
"""

from __future__ import annotations

import attrs

from tabby.errors import TabbyError
from tabby.jobs.vocabulary import FinishReason, JobStats, StopReason, TokenLogprob

__all__ = ["Failed", "Finished", "JobEvent", "TextChunk"]


@attrs.frozen
class TextChunk:
    """New output of one job since its previous chunk.

    When the consumer falls behind, the scheduler merges several backend results into
    one chunk: ``text`` is then the concatenation, ``token_ids`` and ``logprobs`` hold
    every token in order. Nothing is ever dropped.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


@attrs.frozen
class Finished:
    """The job ended normally; the last event of its stream.

    ``stop_reason`` is ``"cancelled"`` when the job was stopped by an explicit
    ``Cancel`` (e.g. the Kobold abort): the text sent so far is the answer.
    ``stats`` is None only for such cancelled jobs when the backend gave none.
    """

    finish_reason: FinishReason
    stop_reason: StopReason | None = None
    stop_str: str | None = None
    stats: JobStats | None = None


@attrs.frozen
class Failed:
    """The job ended with an error; the last event of its stream."""

    error: TabbyError


JobEvent = TextChunk | Finished | Failed
