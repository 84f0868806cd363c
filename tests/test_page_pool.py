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
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 20), st.sampled_from([PageUse.KV, PageUse.ADAPTER])),
                    max_size=60))
def test_random_alloc_release_keeps_invariants(num_pages, ops):
    pool = PagePool(num_pages)
    held: list[tuple[list[int], PageUse]] = []
    for do_alloc, n, use in ops:
        if do_alloc:
            if n > pool.free:
                with pytest.raises(OutOfPages):
                    pool.alloc(n, use)
                continue
            pages = pool.alloc(n, use)
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
