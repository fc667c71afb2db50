"""Turning the work of one step into a :class:`~tabby.engine.model.ForwardBatch`.

Each running sequence contributes one :class:`SeqChunk`: the tokens it feeds this
step (one for decoding, up to a chunk for prefill), where they start, and its page
table. Single-token chunks go first and attend as one group; every longer chunk is
its own group.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

from tabby.engine.model import AttentionGroup, ForwardBatch

__all__ = ["SeqChunk", "build_batch"]


@attrs.frozen
class SeqChunk:
    pages: Sequence[int]  # the sequence's page table
    start: int  # position of tokens[0]
    tokens: Sequence[int]
    want_logits: bool  # logits for the last token of the chunk


def _slots(pages: Tensor, page_size: int, length: int) -> Tensor:
    """Cache slots of positions [0, length) of each row of a page table [n, P] -> [n, length]."""
    offs = torch.arange(page_size, device=pages.device)
    return (pages.unsqueeze(-1) * page_size + offs).flatten(1)[:, :length]  # [n, length]


def _additive(hidden: Tensor) -> Tensor:
    """A bool "may not attend" mask as the fp32 bias added to attention scores."""
    bias = torch.zeros(hidden.shape, device=hidden.device)
    return bias.masked_fill_(hidden, float("-inf"))


def _page_table(chunks: Sequence[SeqChunk], n_pages: int, device: torch.device) -> Tensor:
    rows = [list(c.pages[:n_pages]) + [0] * (n_pages - len(c.pages[:n_pages])) for c in chunks]
    return torch.tensor(rows, dtype=torch.long, device=device)  # [n, P]


def build_batch(
    chunks: Sequence[SeqChunk], page_size: int, device: torch.device
) -> tuple[ForwardBatch, list[int]]:
    """The flat batch for ``chunks`` and, for each chunk, its logit index or -1.

    The order of the flat batch is: all single-token chunks, then the others, each
    in the order given.
    """
    order = [i for i, c in enumerate(chunks) if len(c.tokens) == 1]
    order += [i for i, c in enumerate(chunks) if len(c.tokens) != 1]
    tokens: list[int] = []
    positions: list[int] = []
    write: list[int] = []
    groups: list[AttentionGroup] = []
    logit_rows: list[int] = []
    logit_index = [-1] * len(chunks)

    decode = [chunks[i] for i in order if len(chunks[i].tokens) == 1]
    if decode:
        longest = max(c.start + 1 for c in decode)
        n_pages = -(-longest // page_size)
        gather = _slots(_page_table(decode, n_pages, device), page_size, longest)  # [B, L]
        mask = None  # one sequence sees every key gathered: nothing to hide
        if len(decode) > 1:
            lengths = torch.tensor([c.start + 1 for c in decode], device=device)  # [B]
            hidden = torch.arange(longest, device=device) >= lengths.unsqueeze(1)  # [B, L]
            mask = _additive(hidden).view(len(decode), 1, longest)  # [B, 1, L] fp32
        groups.append(AttentionGroup(0, len(decode), 1, gather, mask))

    for i in order:
        c = chunks[i]
        n = len(c.tokens)
        row0 = len(tokens)
        tokens.extend(c.tokens)
        positions.extend(range(c.start, c.start + n))
        for p in range(c.start, c.start + n):
            write.append(c.pages[p // page_size] * page_size + p % page_size)
        if c.want_logits:
            logit_index[i] = len(logit_rows)
            logit_rows.append(row0 + n - 1)
        if n == 1:
            continue
        if c.start == 0:
            groups.append(AttentionGroup(row0, 1, n, None, None))
            continue
        total = c.start + n
        n_pages = -(-total // page_size)
        gather = _slots(_page_table([c], n_pages, device), page_size, total)  # [1, L]
        q_pos = torch.arange(c.start, total, device=device)  # [n]
        visible = torch.arange(total, device=device).unsqueeze(0) <= q_pos.unsqueeze(1)  # [n, L]
        groups.append(AttentionGroup(row0, 1, n, gather, visible.view(1, 1, n, total)))

    def lt(xs: list[int]) -> Tensor:
        return torch.tensor(xs, dtype=torch.long, device=device)

    batch = ForwardBatch(
        tokens=lt(tokens),
        positions=lt(positions),
        write_slots=lt(write),
        groups=tuple(groups),
        logit_rows=lt(logit_rows),
    )
    return batch, logit_index
