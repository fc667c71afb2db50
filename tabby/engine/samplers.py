"""Vectorized distribution transforms: temperature and the truncation samplers.

Every function takes logits ``x`` of shape [b, V] (float32; removed tokens are -inf) and
per-row parameters of shape [b] or [b, 1], and returns new logits of the same shape. A
truncation sampler removes tokens by setting them to -inf; the survivors are implicitly
renormalized, so each step sees the distribution the previous steps left (as in
sequential logits warpers). Every truncation keeps at least the most likely token.

The sampler (``tabby.engine.sampling``) calls each one only on the rows whose setting is
active, so parameters here are never neutral.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "dynamic_temperature",
    "min_p",
    "mirostat_truncate",
    "smoothing",
    "tail_free",
    "top_a",
    "top_k",
    "top_p",
    "typical",
    "xtc",
]

NEG_INF = float("-inf")
# First guess for the nucleus width; widened 8x at a time until every row's mass fits.
_TOP_P_FIRST_WIDTH = 64


def _cutoff(sorted_values: Tensor, keep_sorted: Tensor) -> Tensor:
    """The last kept value of each row ([b, 1]) given a keep mask over sorted values.

    Truncating at a value instead of at a position keeps every token tied with the last
    one, so the result never depends on how a sort orders ties (which can change with the
    sort width, i.e. with what else shares the batch).
    """
    last = keep_sorted.sum(dim=-1, keepdim=True).clamp(min=1) - 1
    return sorted_values.gather(1, last)


def _entropy(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log-probs [b, V], probs [b, V], entropy in nats [b, 1]) of the current distribution."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    # 0 * -inf is nan for removed tokens; they contribute nothing
    ent = -(p * logp).nan_to_num(0.0).sum(dim=-1, keepdim=True)
    return logp, p, ent


def dynamic_temperature(x: Tensor, low: Tensor, high: Tensor, exponent: Tensor) -> Tensor:
    """Entropy-scaled temperature per row ([b, 1]).

    ``t = low + (high - low) * (H / H_max) ** exponent`` where H is the entropy of the
    current distribution and H_max = ln(number of tokens still allowed): a confident
    (low-entropy) distribution is sampled cold, a flat one hot.
    """
    _, _, ent = _entropy(x)
    valid = torch.isfinite(x).sum(dim=-1, keepdim=True).clamp(min=2).to(torch.float32)
    normalized = (ent / valid.log()).clamp(0.0, 1.0)
    return low + (high - low) * normalized.pow(exponent)


def smoothing(x: Tensor, factor: Tensor) -> Tensor:
    """Quadratic sampling: ``x' = max - factor * (x - max) ** 2`` (order preserved)."""
    top = x.amax(dim=-1, keepdim=True)
    return top - factor * (x - top).square()


def top_k(x: Tensor, k: Tensor) -> Tensor:
    """Keep the ``k[i]`` most likely tokens of row i (and any tied with the k-th)."""
    widest = min(int(k.max()), x.shape[-1])
    head, _ = x.topk(widest, dim=-1)
    floor = head.gather(1, (k.clamp(max=widest) - 1).unsqueeze(1))
    return x.masked_fill(x < floor, NEG_INF)


def top_p(x: Tensor, p: Tensor) -> Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose mass reaches ``p[i]``."""
    probs = torch.softmax(x, dim=-1)
    vocab = x.shape[-1]
    width = min(_TOP_P_FIRST_WIDTH, vocab)
    # Only the head of the sorted distribution matters; widen until it holds the mass.
    while True:
        head, _ = probs.topk(width, dim=-1)
        cum = head.cumsum(dim=-1)
        if width == vocab or bool((cum[:, -1] >= p).all()):
            break
        width = min(width * 8, vocab)
    before = cum - head  # mass of the strictly more likely tokens
    floor = _cutoff(head, before < p.unsqueeze(1))
    return x.masked_fill(probs < floor, NEG_INF)


def typical(x: Tensor, mass: Tensor) -> Tensor:
    """Locally typical sampling.

    Rank tokens by how far their surprise (-ln p) is from the entropy, and keep the
    closest ones until their mass reaches ``mass[i]``.
    """
    logp, p, ent = _entropy(x)
    deviation = (-logp - ent).abs()  # inf for removed tokens: they sort last
    vocab = x.shape[-1]
    width = min(_TOP_P_FIRST_WIDTH, vocab)
    # as in top_p: only the head of the ranking matters, so widen until it holds the mass
    while True:
        closest, order = deviation.topk(width, dim=-1, largest=False)
        head = p.gather(1, order)
        cum = head.cumsum(dim=-1)
        if width == vocab or bool((cum[:, -1] >= mass).all()):
            break
        width = min(width * 8, vocab)
    ceiling = _cutoff(closest, (cum - head) < mass.unsqueeze(1))
    return x.masked_fill(deviation > ceiling, NEG_INF)


def tail_free(x: Tensor, z: Tensor) -> Tensor:
    """Tail-free sampling.

    Sort the probabilities, take the absolute second differences, normalize them to a
    distribution and cut where its cumulative sum passes ``z[i]`` (the first token is always
    kept and, as in the original formulation, the last one of the sorted list dropped).
    """
    unsorted = torch.softmax(x, dim=-1)
    probs, _ = unsorted.sort(dim=-1, descending=True)
    if probs.shape[-1] < 3:
        return x
    d2 = (probs[:, :-2] - 2.0 * probs[:, 1:-1] + probs[:, 2:]).abs()
    total = d2.sum(dim=-1, keepdim=True)
    cdf = (d2 / total.clamp(min=1e-30)).cumsum(dim=-1)
    # a perfectly flat distribution has no tail to cut
    cut = (cdf > z.unsqueeze(1)) & (total > 0)
    ones = torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)
    keep_sorted = torch.cat([ones, ~cut, ~(total > 0)], dim=-1)
    # the kept tokens are a prefix of the sorted list: the first cut ends it
    keep_sorted = keep_sorted.cumprod(dim=-1).to(torch.bool)
    return x.masked_fill(unsorted < _cutoff(probs, keep_sorted), NEG_INF)


def top_a(x: Tensor, a: Tensor) -> Tensor:
    """Keep tokens with ``p >= a * p_max ** 2``."""
    probs = torch.softmax(x, dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    # capped at p_max so that a > 1 / p_max still keeps the most likely token
    floor = torch.minimum(a.unsqueeze(1) * top.square(), top)
    return x.masked_fill(probs < floor, NEG_INF)


def min_p(x: Tensor, m: Tensor) -> Tensor:
    """Keep tokens with ``p >= m * p_max`` (computed on logits: ``x >= x_max + ln m``)."""
    top = x.amax(dim=-1, keepdim=True)
    floor = top + torch.log(m).unsqueeze(1)
    return x.masked_fill(x < floor, NEG_INF)


def xtc(x: Tensor, threshold: Tensor) -> Tensor:
    """Exclude top choices: drop every token with ``p >= threshold`` except the least likely
    of them, when at least two qualify. Called only on rows whose XTC draw triggered."""
    probs = torch.softmax(x, dim=-1)
    above = probs >= threshold.unsqueeze(1)
    spare = torch.where(above, probs, torch.full_like(probs, math.inf)).argmin(dim=-1)
    remove = above.clone()
    remove.scatter_(1, spare.unsqueeze(1), False)
    remove &= above.sum(dim=-1, keepdim=True) >= 2
    return x.masked_fill(remove, NEG_INF)


def mirostat_truncate(x: Tensor, mu: Tensor) -> Tensor:
    """Mirostat v2 truncation: drop tokens whose surprise ``-log2 p`` exceeds ``mu[i]``
    (always keeping the most likely)."""
    logp = torch.log_softmax(x, dim=-1)
    surprise = -logp / math.log(2.0)
    best = x.argmax(dim=-1, keepdim=True)
    remove = surprise > mu.unsqueeze(1)
    remove.scatter_(1, best, False)
    return x.masked_fill(remove, NEG_INF)
