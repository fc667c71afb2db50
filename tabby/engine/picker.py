"""Choosing each job's next token: the generator's side of ``tabby.engine.sampling``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tabby.engine.jobstate import JobState, Pick
from tabby.engine.sampling import sample
from tabby.jobs import TokenLogprob

__all__ = ["pick_tokens"]


def pick_tokens(logits: Tensor, rows: Sequence[int], states: Sequence[JobState]) -> list[Pick]:
    """One token per state from ``logits[rows]`` [R, V] (fp32)."""
    in_order = list(rows) == list(range(logits.shape[0]))
    sub = logits if in_order else logits[list(rows)]  # [R, V]
    want = max((max(1, s.job.top_logprobs) for s in states if s.job.logprobs), default=0)
    out = sample(
        sub,
        [s.sampler for s in states],
        _histories(states),
        [s.generated for s in states],
        want,
        extra_bans=[s.banned_now() for s in states],
    )
    picks: list[Pick] = []
    for r, (s, t) in enumerate(zip(states, out.tokens, strict=True)):
        lp = None
        if s.job.logprobs and out.logprobs is not None and out.top_logprobs is not None:
            piece = s.tokenizer.piece
            top = tuple((i, piece(i), v) for i, v in out.top_logprobs[r][: s.job.top_logprobs])
            lp = TokenLogprob(t, piece(t), out.logprobs[r], top)
        picks.append(Pick(t, lp))
    return picks


def _histories(states: Sequence[JobState]) -> list[Tensor]:
    """Each job's ids so far; empty for jobs whose sampler never reads them (and that
    keep no copy, see ``JobState.history``)."""
    unread = torch.empty(0, dtype=torch.int64)
    return [unread if s.history is None else s.history[: len(s.ids)] for s in states]
