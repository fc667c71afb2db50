"""Logit processors that look at the job's history: repetition penalties and DRY.

They work on one row (one job) at a time, because each job has its own history; the
sampler calls them only for rows whose settings make them non-neutral.

Penalty window (``penalty_range`` R, ``repetition_decay`` D): the R most recent tokens of
the history (prompt and generated) carry the full penalty; the D tokens before them carry
a penalty that fades linearly to zero; older tokens carry none. R <= 0 means the whole
context (as upstream, 0 and -1 both mean "everything"). A token's weight is that of its
most recent occurrence, w in (0, 1]:

* repetition penalty ``r`` (multiplicative, HF-style): with ``r_eff = 1 + (r - 1) * w``,
  a positive logit is divided by ``r_eff`` and a negative one multiplied by it;
* presence penalty ``p``: ``logit -= p * w``;
* frequency penalty ``f``: ``logit -= f * (sum of the weights of every occurrence)``.

DRY ("don't repeat yourself"): if the history ends with a sequence of ``L`` tokens that
appeared earlier followed by token ``t``, emitting ``t`` would repeat it; when
``L >= allowed_length`` the logit of ``t`` drops by ``multiplier * base ** (L -
allowed_length)``. A match never extends across a sequence-breaker token, a history ending
in a breaker is never penalised, and a breaker is never the penalised token.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

__all__ = [
    "DRY_MAX_MATCH",
    "apply_penalties",
    "dry_penalties",
    "penalty_weights",
]

# Longest repeated sequence DRY measures: past this the penalty (base ** 60 and more) has
# long since removed the token, and capping bounds the cost on degenerate loops.
DRY_MAX_MATCH = 64


def penalty_weights(n: int, penalty_range: int, decay: int) -> Tensor | None:
    """Weights of the last ``n`` history tokens (oldest first), or None when all are 1.

    The window is already cut to the tokens with a non-zero weight by the caller.
    """
    if penalty_range <= 0 or decay <= 0 or n <= penalty_range:
        return None
    # distance from the end: n for the oldest token, 1 for the newest
    distance = torch.arange(n, 0, -1, dtype=torch.float32)
    faded = 1.0 - (distance - penalty_range) / (decay + 1)
    return torch.where(distance <= penalty_range, torch.ones_like(faded), faded)


def apply_penalties(
    row: Tensor,
    history: Tensor,
    *,
    repetition: float,
    frequency: float,
    presence: float,
    penalty_range: int,
    decay: int,
) -> None:
    """Apply repetition/frequency/presence penalties to one row of logits in place.

    ``row``: [V] float32 (any device); ``history``: [T] int64 on the CPU (prompt +
    generated ids).
    """
    span = (
        history.numel()
        if penalty_range <= 0
        else min(history.numel(), penalty_range + max(decay, 0))
    )
    if span == 0:
        return
    window = history[history.numel() - span :]
    window = window[(window >= 0) & (window < row.numel())]
    if window.numel() == 0:
        return
    weights = penalty_weights(window.numel(), penalty_range, decay)
    # the bookkeeping runs on the CPU history; only the touched logits move
    ids, inverse = torch.unique(window, return_inverse=True)
    on_device = ids.to(row.device)
    values = row[on_device]
    if weights is None:
        latest = torch.ones(ids.numel(), dtype=torch.float32)
        counts = torch.bincount(inverse, minlength=ids.numel()).to(torch.float32)
    else:
        latest = torch.zeros(ids.numel(), dtype=torch.float32)
        latest.scatter_reduce_(0, inverse, weights, reduce="amax")
        counts = torch.zeros(ids.numel(), dtype=torch.float32).index_add_(0, inverse, weights)
    latest, counts = latest.to(row.device), counts.to(row.device)
    if repetition != 1.0:
        factor = 1.0 + (repetition - 1.0) * latest
        values = torch.where(values > 0, values / factor, values * factor)
    if frequency != 0.0:
        values = values - frequency * counts
    if presence != 0.0:
        values = values - presence * latest
    row[on_device] = values


def dry_penalties(
    history: npt.NDArray[np.int64],
    *,
    multiplier: float,
    base: float,
    allowed_length: int,
    dry_range: int,
    breakers: frozenset[int],
) -> dict[int, float]:
    """DRY penalties for the next token: {token id: amount to subtract from its logit}."""
    if dry_range > 0:
        history = history[-dry_range:]
    n = history.shape[0]
    if n < 2:
        return {}
    last = int(history[-1])
    if last in breakers:
        return {}
    # Earlier positions holding the last token; the token after each is the candidate.
    starts = np.flatnonzero(history[:-1] == last)
    if breakers and starts.size:
        breaker_arr = np.fromiter(breakers, dtype=np.int64, count=len(breakers))
        starts = starts[~np.isin(history[starts + 1], breaker_arr)]
    if starts.size == 0:
        return {}
    lengths = np.ones(starts.shape[0], dtype=np.int64)
    live = np.arange(starts.shape[0])
    # Extend all matches backwards together: step m compares history[start - m] with
    # the token m places before the end.
    for m in range(1, min(n - 1, DRY_MAX_MATCH)):
        previous = int(history[n - 1 - m])
        if previous in breakers:
            break
        probe = starts[live] - m
        ok = probe >= 0
        ok[ok] = history[probe[ok]] == previous
        live = live[ok]
        if live.size == 0:
            break
        lengths[live] += 1
    longest: dict[int, int] = {}
    for token, length in zip(history[starts + 1].tolist(), lengths.tolist(), strict=True):
        if length > longest.get(token, 0):
            longest[token] = length
    return {
        token: multiplier * base ** (length - allowed_length)
        for token, length in longest.items()
        if length >= allowed_length
    }
