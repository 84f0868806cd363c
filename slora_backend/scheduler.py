"""Iteration-level continuous batching over the unified page pool.

Each step is either a prefill of newly admitted requests or a decode of every running one.
With `mix_decode` (the default) the running requests also decode their next token inside a
prefill step: a prefill runs eagerly (no CUDA graph fits its shapes), so on its own it leaves
every decoding request waiting for a step that is mostly kernel-launch time; riding along,
they lose nothing and the launches overlap their GPU work.

Admission is batched when free batch slots are what limits it: with the batch full, about one
request finishes per step, and admitting each newcomer at once would make nearly every step an
eager mixed step (60-93 ms on H200 at a batch of 256) instead of a decode step replayed from a
CUDA graph (~20 ms). So while fewer slots are free than min(waiting, `admit_min_batch`), the
running requests decode alone, for at most `admit_max_wait_steps` steps in a row.

For the same reason arrivals are gathered below a full batch too (`admit_gather_steps`): an
eager mixed step costs the engine thread 30-45 ms of launches on an H200 host whether it
prefills one prompt or five (BENCHMARKS.md item 20), and at serving rates about one request
arrives every other step. So while requests run, newcomers wait up to that many steps (decode
steps, replayed from graphs, during which their adapters are loaded) and are admitted
together; sooner when their prompts would fill a prefill step.

Admission needs the request's adapter resident (its load is started here and the request
waits, without blocking others, until the copy is done) and 2 pages per token for its KV.
When decode runs out of pages, idle adapters are evicted first, then the most recently
arrived running requests are preempted: their pages are freed and they are recomputed later.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

from .adapter_cache import AdapterCache
from .adapters import AdapterError
from .page_pool import PagePool, PageUse
from .request import PageList, Request, Status

log = logging.getLogger(__name__)


@dataclass
class ScheduledStep:
    prefill: bool
    # Prefills first (every token not yet computed), then `decodes` requests decoding one
    # token each; within each part, requests sharing an adapter are adjacent.
    requests: list[Request]
    decodes: int = 0  # with prefill: how many trailing requests only decode

    @property
    def prefills(self) -> list[Request]:
        return self.requests[: len(self.requests) - self.decodes] if self.prefill else []


def adapter_order(req: Request) -> tuple[int, str]:
    return (0, "") if req.adapter is None else (1, req.adapter)


class Scheduler:
    def __init__(self, pool: PagePool, adapters: AdapterCache, max_batch_size: int,
                 max_prefill_tokens: int, mix_decode: bool = True, admit_min_batch: int = 1,
                 admit_max_wait_steps: int = 0, admit_gather_steps: int = 0):
        self.pool = pool
        self.mix_decode = mix_decode
        self.admit_min_batch = admit_min_batch  # 1 = admit as soon as one slot frees
        self.admit_max_wait_steps = admit_max_wait_steps
        self.admit_gather_steps = admit_gather_steps  # 0 = admit arrivals at the next step
        self.deferred_steps = 0  # steps that decoded only, though a slot was free and requests waited
        self._deferred_in_a_row = 0  # since the last step that admitted
        self.adapters = adapters
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self.used_at_first_preemption: float | None = None  # share of pages in use (KV + adapters)
        # Fails a waiting request whose adapter can no longer be read (the engine sets it).
        self.on_adapter_error: Callable[[Request, str], None] | None = None

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, ahead: Callable[[Request], bool] | None = None) -> ScheduledStep | None:
        """The next step, or None when nothing can run now.

        `ahead` is the engine's overlap: the last step is still on the GPU, and its tokens are
        not read yet. Then only the running requests for which `ahead` holds decode (not the
        finished ones, nor those whose last token is in flight), and nobody is preempted:
        when pages are short the answer is None, with nothing changed."""
        if not self.waiting:
            self._deferred_in_a_row = 0  # nobody waits (all admitted or cancelled): the next start over
        if self._defer_admission():
            decoding = self._reserve_decode_pages(ahead)
            if decoding is None:
                return None
            if decoding:  # else all were preempted (or, ahead, none continues): admit below
                self.deferred_steps += 1
                self._deferred_in_a_row += 1
                self._prefetch_adapters()
                return ScheduledStep(prefill=False, requests=sorted(decoding, key=adapter_order))
        step = self._schedule(ahead)
        if step is not None and step.prefill:  # prefill steps are the ones that admitted
            self._deferred_in_a_row = 0
        return step

    def _schedule(self, ahead) -> ScheduledStep | None:
        if self.mix_decode and self.waiting and self.running:
            # Next-token pages for the running requests first (they never wait on newcomers).
            decoding = self._reserve_decode_pages(ahead)
            if decoding is None:
                return None
            decoding = sorted(decoding, key=adapter_order)
            admitted = self._admit()
            if admitted or decoding:
                return ScheduledStep(prefill=bool(admitted),
                                     requests=sorted(admitted, key=adapter_order) + decoding,
                                     decodes=len(decoding) if admitted else 0)
        admitted = self._admit()
        if admitted:
            return ScheduledStep(prefill=True, requests=sorted(admitted, key=adapter_order))
        if self.running:
            decoding = self._reserve_decode_pages(ahead)
            if decoding:
                return ScheduledStep(prefill=False, requests=sorted(decoding, key=adapter_order))
        return None

    # -- admission -----------------------------------------------------------------------
    def _defer_admission(self) -> bool:
        """Whether this step decodes only, so that admissions gather: free batch slots (not
        pages or the token budget) keep its admission below min(waiting, admit_min_batch), for
        at most admit_max_wait_steps steps; or, below that, for at most admit_gather_steps
        steps while the waiting prompts would not fill a prefill step."""
        if not (self.waiting and self.running):
            return False
        free_slots = self.max_batch_size - len(self.running)
        if 0 < free_slots < min(len(self.waiting), self.admit_min_batch):
            return self._deferred_in_a_row < self.admit_max_wait_steps
        if free_slots <= 0 or self._deferred_in_a_row >= self.admit_gather_steps:
            return False
        tokens = 0
        for req in islice(self.waiting, free_slots):
            tokens += req.seq_len
            if tokens >= self.max_prefill_tokens:
                return False
        return True

    def _prefetch_adapters(self) -> None:
        """While admission waits, start the adapter loads of the requests next in line, so that
        their copies overlap the decode steps instead of holding them back at the admission.
        Pages are taken only where free or held by idle adapters, as admission would."""
        for req in list(islice(self.waiting, self.admit_min_batch)):
            if req.adapter is not None and self._start_load(req) is False:
                return  # pages are short: admission decides, in FIFO order

    def _start_load(self, req: Request) -> bool | None:
        """Start loading a waiting request's adapter: whether pages sufficed, or None when the
        adapter was refused (re-read from disk, host copy evicted): the request is failed and
        leaves the queue, the others go on."""
        try:
            return self.adapters.start_load(req.adapter)
        except AdapterError as e:
            if self.on_adapter_error is None:
                raise
            self.waiting.remove(req)
            self.on_adapter_error(req, str(e))
            return None

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        tokens = 0
        skipped: list[Request] = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch_size:
            req = self.waiting[0]
            n = req.seq_len
            if admitted and tokens + n > self.max_prefill_tokens:
                break
            if req.adapter is not None and not self.adapters.is_ready(req.adapter):
                started = self._start_load(req)
                if started is None:
                    continue
                if not started:
                    break  # not enough pages for the adapter yet: keep FIFO order
                if not self.adapters.is_ready(req.adapter):
                    skipped.append(self.waiting.popleft())  # copy in flight: let others pass
                    continue
            if req.adapter is not None:
                self.adapters.acquire(req.adapter)  # so the KV reclaim below cannot evict it
            if not self.adapters.reclaim(2 * n):
                if req.adapter is not None:
                    self.adapters.release(req.adapter)
                break
            self.waiting.popleft()
            req.kv_pages = PageList(self.pool.alloc(2 * n, PageUse.KV))
            req.num_computed = 0
            req.status = Status.RUNNING
            admitted.append(req)
            tokens += n
        self.waiting.extendleft(reversed(skipped))
        self.running.extend(admitted)
        return admitted

    # -- decode --------------------------------------------------------------------------
    def _reserve_decode_pages(self, ahead=None) -> list[Request] | None:
        """Give every decoding request 2 pages (K, V) for its next token, preempting if short;
        returns the decoding requests. With `ahead` (see schedule): those for which it holds,
        never preempting: None when pages are short."""
        if ahead is None:
            while self.running and not self.adapters.reclaim(2 * len(self.running)):
                victim = max(self.running, key=lambda r: r.arrival_time)
                self.preempt(victim)
            decoding = self.running
        else:
            decoding = [r for r in self.running if ahead(r)]
            if not self.adapters.reclaim(2 * len(decoding)):  # (reclaim evicts idle adapters only)
                return None
        pages = self.pool.alloc(2 * len(decoding), PageUse.KV)  # one call: this runs every step
        for i, req in enumerate(decoding):
            req.kv_pages.extend(pages[2 * i : 2 * i + 2])
        return list(decoding)

    def preempt(self, req: Request) -> None:
        log.info("preempting request %d (%d tokens) to free pages", req.request_id, req.seq_len)
        if self.used_at_first_preemption is None:
            # Unified paging's promise: the pool is (nearly) full before anyone is preempted.
            self.used_at_first_preemption = 1 - self.pool.free / self.pool.num_pages
        self._release(req)
        self.running.remove(req)
        req.status = Status.WAITING
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    # -- finishing -----------------------------------------------------------------------
    def finish(self, req: Request) -> None:
        """Free everything the request holds, wherever it is (running or waiting)."""
        if req.status == Status.RUNNING:
            self._release(req)
            self.running.remove(req)
        elif req.status == Status.WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        req.status = Status.FINISHED

    def _release(self, req: Request) -> None:
        if req.kv_pages:
            self.pool.release(req.kv_pages.tolist(), PageUse.KV)
            req.kv_pages = PageList()
        req.num_computed = 0
        if req.adapter is not None and req.status == Status.RUNNING:
            self.adapters.release(req.adapter)
