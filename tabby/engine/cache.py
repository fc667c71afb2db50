"""A paged KV cache with content-addressed prefix reuse.

The cache holds ``num_pages`` pages of ``page_size`` token slots per layer, allocated
once. A sequence owns a list of pages (its page table); slot ``p`` of the sequence
lives at ``pages[p // page_size] * page_size + p % page_size``.

A page that is full is *registered* under the hash chain of all tokens up to its
end, so another sequence whose tokens start the same way can share it instead of
recomputing it. Pages are refcounted; a registered page nobody uses stays in cache
(least recently used first out) until its slot is needed for something new.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import attrs
import torch
from torch import Tensor

__all__ = ["CacheStats", "PageKey", "PagedKVCache", "page_keys"]

# A page's identity: the key of the page before it and its own tokens.
PageKey = tuple[object, tuple[int, ...]]


def page_keys(tokens: Sequence[int], page_size: int, prev: object = None) -> list[PageKey]:
    """Hash-chain keys of every full page of ``tokens``."""
    keys: list[PageKey] = []
    for start in range(0, len(tokens) - page_size + 1, page_size):
        key: PageKey = (prev, tuple(tokens[start : start + page_size]))
        # Chaining on the hash keeps keys small while still naming the whole prefix.
        prev = hash(key)
        keys.append(key)
    return keys


@attrs.frozen
class CacheStats:
    pages_total: int
    pages_used: int  # held by at least one sequence
    pages_cached: int  # registered, unused, kept for reuse
    pages_free: int  # neither
    page_size: int


class PagedKVCache:
    """KV storage plus the page allocator. Used from one thread only."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.page_size = page_size
        self.num_pages = num_pages
        shape = (num_layers, num_pages * page_size, num_kv_heads, head_dim)
        self.k: Tensor = torch.zeros(shape, dtype=dtype, device=device)  # [layers, slots, KV, D]
        self.v: Tensor = torch.zeros(shape, dtype=dtype, device=device)  # [layers, slots, KV, D]
        self._refs = [0] * num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._lru: OrderedDict[int, None] = OrderedDict()  # registered pages with refs == 0
        self._by_key: dict[PageKey, int] = {}
        self._key_of: dict[int, PageKey] = {}

    # -- accounting ---------------------------------------------------------

    def available(self) -> int:
        """Pages that an allocation could get right now (free or evictable)."""
        return len(self._free) + len(self._lru)

    def stats(self) -> CacheStats:
        used = sum(1 for r in self._refs if r > 0)
        return CacheStats(
            pages_total=self.num_pages,
            pages_used=used,
            pages_cached=len(self._lru),
            pages_free=len(self._free),
            page_size=self.page_size,
        )

    # -- allocation ---------------------------------------------------------

    def allocate(self) -> int:
        """A fresh private page; evicts the least recently used cached page if needed."""
        if self._free:
            page = self._free.pop()
        elif self._lru:
            page, _ = self._lru.popitem(last=False)
            del self._by_key[self._key_of.pop(page)]
        else:
            raise RuntimeError("KV cache out of pages")  # callers reserve ahead; a bug if hit
        self._refs[page] = 1
        return page

    def release(self, pages: Sequence[int]) -> None:
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._lru[page] = None
                else:
                    self._free.append(page)

    def lookup(self, keys: Sequence[PageKey]) -> list[int]:
        """Take a reference to the longest run of cached pages matching ``keys``."""
        pages: list[int] = []
        for key in keys:
            page = self._by_key.get(key)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._lru[page]
            self._refs[page] += 1
            pages.append(page)
        return pages

    def count_cached(self, keys: Sequence[PageKey]) -> int:
        """How many leading pages of ``keys`` are in cache (no references taken)."""
        n = 0
        for key in keys:
            if key not in self._by_key:
                break
            n += 1
        return n

    def count_idle(self, keys: Sequence[PageKey]) -> int:
        """Among the leading cached pages of ``keys``, how many are unused (evictable)."""
        n = 0
        for key in keys:
            page = self._by_key.get(key)
            if page is None:
                break
            n += self._refs[page] == 0
        return n

    def register(self, page: int, key: PageKey) -> None:
        """Publish a full page under its key (a page with that content may exist already)."""
        if key in self._by_key or page in self._key_of:
            return
        self._by_key[key] = page
        self._key_of[page] = key

    def is_shared(self, page: int) -> bool:
        """True when writing into ``page`` could change what someone else sees."""
        return self._refs[page] > 1 or page in self._key_of

    def copy_page(self, src: int, dst: int, n_slots: int) -> None:
        """Copy the first ``n_slots`` token slots of every layer from ``src`` to ``dst``."""
        s, d = src * self.page_size, dst * self.page_size
        self.k[:, d : d + n_slots] = self.k[:, s : s + n_slots]
        self.v[:, d : d + n_slots] = self.v[:, s : s + n_slots]
