"""Unified page allocator: one set of page ids shared by the KV cache and adapter weights.

Pure Python, no tensors (the pool tensor itself lives in the model runner), so every
invariant is testable on its own: a page is free or owned by exactly one use.

The pool also remembers when each page was freed, counted in launched steps (`clock`, which
the engine advances): a step launched before a page was freed may still read it on the GPU,
later ones never do. An adapter copy into freed pages (on a side stream) then waits only for
those steps, not for everything queued (adapter_cache.StepFences).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class PageUse(enum.IntEnum):
    FREE = 0
    KV = 1
    ADAPTER = 2


class OutOfPages(RuntimeError):
    pass


@dataclass
class PoolStats:
    pages_total: int
    pages_free: int
    pages_kv: int
    pages_adapter: int


class PagePool:
    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError("the pool needs at least one page")
        self.num_pages = num_pages
        # Low ids are handed out first (free list used as a stack, reversed), which keeps
        # the working set of a lightly loaded server compact.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._use = bytearray(num_pages)  # PageUse per page
        self._counts = {PageUse.KV: 0, PageUse.ADAPTER: 0}
        self.clock = 0  # steps launched so far (the engine advances it)
        self._freed_at = np.zeros(num_pages, dtype=np.int64)  # clock at each page's last release

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self, n: int, use: PageUse, oldest: bool = False) -> list[int]:
        """n free pages: the most recently freed first (a stack), or with `oldest` those free
        the longest, for copies that must not start before every step that could still read
        the pages has finished (see freed_at)."""
        if use == PageUse.FREE:
            raise ValueError("allocate for KV or ADAPTER")
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} free")
        if n == 0:
            return []
        if oldest:
            pages = self._free[:n]
            del self._free[:n]
        else:
            pages = self._free[-n:]
            del self._free[-n:]
        for p in pages:
            self._use[p] = use
        self._counts[use] += n
        return pages

    def release(self, pages: list[int], use: PageUse) -> None:
        for p in pages:
            if self._use[p] != use:
                raise RuntimeError(f"page {p} released as {use.name} but is {PageUse(self._use[p]).name}")
            self._use[p] = PageUse.FREE
        self._free.extend(pages)
        self._counts[use] -= len(pages)
        self._freed_at[pages] = self.clock

    def freed_at(self, pages: list[int]) -> int:
        """The clock when the last of `pages` was freed: steps up to that one may still read them."""
        return int(self._freed_at[pages].max()) if pages else 0

    def use_of(self, page: int) -> PageUse:
        return PageUse(self._use[page])

    def stats(self) -> PoolStats:
        return PoolStats(self.num_pages, len(self._free), self._counts[PageUse.KV],
                         self._counts[PageUse.ADAPTER])

    def check(self) -> None:
        """Assert the invariants (tests call this): counts agree, no page both free and owned."""
        free_set = set(self._free)
        assert len(free_set) == len(self._free), "a page is on the free list twice"
        for p in range(self.num_pages):
            assert (self._use[p] == PageUse.FREE) == (p in free_set), f"page {p} state disagrees"
        assert self._counts[PageUse.KV] == self._use.count(PageUse.KV)
        assert self._counts[PageUse.ADAPTER] == self._use.count(PageUse.ADAPTER)
