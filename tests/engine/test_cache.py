"""The page allocator: refcounts, prefix sharing, LRU eviction, copy-on-write."""

from __future__ import annotations

import pytest
import torch

from tabby.engine.cache import PagedKVCache, page_keys


def make(pages: int = 4, page_size: int = 2) -> PagedKVCache:
    return PagedKVCache(num_layers=2, num_kv_heads=1, head_dim=2, num_pages=pages,
                        page_size=page_size, dtype=torch.float32, device=torch.device("cpu"))


def test_page_keys_chain_on_the_whole_prefix() -> None:
    a = page_keys([1, 2, 3, 4, 5], 2)
    b = page_keys([9, 9, 3, 4], 2)
    assert len(a) == 2  # the trailing partial page has no key
    assert a[1][1] == b[1][1] == (3, 4)
    assert a[1] != b[1]  # same tokens, different history
    assert page_keys([1, 2, 3, 4], 2) == a


def test_allocate_release_and_stats() -> None:
    c = make()
    pages = [c.allocate() for _ in range(4)]
    assert sorted(pages) == [0, 1, 2, 3]
    assert c.stats().pages_used == 4
    assert c.available() == 0
    with pytest.raises(RuntimeError):
        c.allocate()
    c.release(pages)
    s = c.stats()
    assert (s.pages_used, s.pages_free, s.pages_cached) == (0, 4, 0)


def test_registered_pages_are_shared_then_kept_then_evicted_lru() -> None:
    c = make(pages=3)
    keys = page_keys([1, 2, 3, 4], 2)
    p0, p1 = c.allocate(), c.allocate()
    c.register(p0, keys[0])
    c.register(p1, keys[1])
    assert c.count_cached(keys) == 2
    assert c.count_idle(keys) == 0
    shared = c.lookup(keys)
    assert shared == [p0, p1]
    assert c.is_shared(p0)
    c.release([p0, p1])  # the first owner leaves
    c.release(shared)  # the second too: pages stay cached for reuse
    s = c.stats()
    assert (s.pages_used, s.pages_cached, s.pages_free) == (0, 2, 1)
    assert c.count_idle(keys) == 2
    again = c.lookup(keys[:1])  # touching p0 makes p1 the least recently used
    assert again == [p0]
    assert c.allocate() not in (p0, p1)  # the free page goes first
    evicted = c.allocate()
    assert evicted == p1
    assert c.count_cached(keys) == 1  # p0 is still known, p1 no longer


def test_lookup_stops_at_first_miss() -> None:
    c = make()
    keys = page_keys([1, 2, 3, 4, 5, 6], 2)
    p = c.allocate()
    c.register(p, keys[0])
    c.register(c.allocate(), keys[2])  # a later page without its predecessor
    assert c.lookup(keys) == [p]


def test_copy_page_copies_the_given_slots_of_every_layer() -> None:
    c = make(page_size=4)
    src, dst = c.allocate(), c.allocate()
    c.k[:, src * 4 : src * 4 + 4] = torch.arange(16.0).view(2, 4, 1, 2) + 1
    c.copy_page(src, dst, 3)
    assert torch.equal(c.k[:, dst * 4 : dst * 4 + 3], c.k[:, src * 4 : src * 4 + 3])
    assert torch.all(c.k[:, dst * 4 + 3] == 0)
