"""Page allocator invariants under random allocate/release sequences (property-based)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slora_backend.page_pool import OutOfPages, PagePool, PageUse
from slora_backend.request import PageList


@settings(max_examples=200, deadline=None)
@given(num_pages=st.integers(1, 64),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 20), st.sampled_from([PageUse.KV, PageUse.ADAPTER]),
                           st.booleans()), max_size=60))
def test_random_alloc_release_keeps_invariants(num_pages, ops):
    pool = PagePool(num_pages)
    held: list[tuple[list[int], PageUse]] = []
    for do_alloc, n, use, oldest in ops:
        if do_alloc:
            if n > pool.free:
                with pytest.raises(OutOfPages):
                    pool.alloc(n, use, oldest=oldest)
                continue
            pages = pool.alloc(n, use, oldest=oldest)
            assert len(pages) == n and all(pool.use_of(p) == use for p in pages)
            held.append((pages, use))
        elif held:
            pages, use = held.pop(n % len(held))
            pool.release(pages, use)
        pool.check()
        owned = [p for pages, _ in held for p in pages]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        s = pool.stats()
        assert s.pages_free + s.pages_kv + s.pages_adapter == num_pages
    for pages, use in held:
        pool.release(pages, use)
    pool.check()
    assert pool.stats().pages_free == num_pages


def test_release_with_the_wrong_use_is_refused():
    pool = PagePool(4)
    pages = pool.alloc(2, PageUse.KV)
    with pytest.raises(RuntimeError):
        pool.release(pages, PageUse.ADAPTER)
    pool.release(pages, PageUse.KV)
    with pytest.raises(RuntimeError):  # double free
        pool.release(pages, PageUse.KV)


@settings(max_examples=100, deadline=None)
@given(chunks=st.lists(st.lists(st.integers(0, 2**31 - 1), max_size=150), max_size=12))
def test_page_list_grows_like_a_list(chunks):
    # A request's KV page ids: appended every step, copied as one array into the KV table.
    pages, expected = PageList(), []
    for chunk in chunks:
        pages.extend(chunk)
        expected.extend(chunk)
        assert len(pages) == len(expected)
        assert pages.tolist() == expected
        assert pages.array.dtype == np.int32 and pages.array.tolist() == expected
    if expected:
        assert pages[-1] == expected[-1] and pages[0::2].tolist() == expected[0::2]


def test_pages_remember_when_they_were_freed_and_the_oldest_go_first():
    # Adapter copies take the pages free the longest and wait for the step that freed the
    # newest of them (adapter_cache.StepFences): the clock of each release must be kept.
    pool = PagePool(8)
    never_used = pool.alloc(0, PageUse.KV)
    a = pool.alloc(3, PageUse.KV)  # the most recently freed (here: lowest ids) come first
    b = pool.alloc(3, PageUse.KV)
    assert a == [2, 1, 0] and b == [5, 4, 3] and never_used == []
    pool.clock = 4
    pool.release(a, PageUse.KV)
    pool.clock = 9
    pool.release(b, PageUse.KV)
    assert pool.freed_at(a) == 4 and pool.freed_at(b) == 9 and pool.freed_at(a + b[:1]) == 9
    assert pool.freed_at([6, 7]) == 0 and pool.freed_at([]) == 0  # never used: nothing to wait for
    oldest = pool.alloc(4, PageUse.ADAPTER, oldest=True)
    assert oldest == [7, 6, 2, 1] and pool.freed_at(oldest) == 4
    assert pool.alloc(2, PageUse.KV) == [4, 3]  # newest first, as before
    pool.check()
