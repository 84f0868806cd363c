"""Admission batching (Scheduler.admit_min_batch): with the batch full, admission waits until
enough slots are free, decoding the running requests meanwhile, for a bounded number of steps;
whenever free slots are not what limits admission, requests are admitted as before."""

from __future__ import annotations

import pytest
import torch

from slora_backend.adapter_cache import AdapterCache
from slora_backend.dummy import dummy_spec, random_adapter
from slora_backend.page_pool import PagePool
from slora_backend.request import Request, SamplingParams
from slora_backend.scheduler import Scheduler


def make_scheduler(max_batch_size: int, admit_min_batch: int, admit_max_wait_steps: int = 16,
                   mix_decode: bool = True, pages: int = 4000, admit_gather_steps: int = 0) -> Scheduler:
    spec = dummy_spec("dummy:tiny", 256)
    pool_tensor = torch.zeros(spec.layers, pages, spec.page_width)
    pool = PagePool(pages)
    adapters = AdapterCache(spec, torch.float32, pool, pool_tensor, None, 64)
    return Scheduler(pool, adapters, max_batch_size, max_prefill_tokens=4096, mix_decode=mix_decode,
                     admit_min_batch=admit_min_batch, admit_max_wait_steps=admit_max_wait_steps,
                     admit_gather_steps=admit_gather_steps)


def add_requests(sched: Scheduler, n: int, prompt_len: int = 4) -> list[Request]:
    reqs = [Request(prompt_ids=[1] * prompt_len, params=SamplingParams(max_tokens=8), adapter=None,
                    on_output=lambda out: None) for _ in range(n)]
    for r in reqs:
        sched.add(r)
    return reqs


def run(sched: Scheduler):
    """Schedule one step and do what the engine does after it: every request has one more token."""
    step = sched.schedule()
    assert step is not None
    for req in step.requests:
        req.num_computed = req.seq_len
        req.output_ids.append(7)
    return step


def saturated(max_batch_size: int, waiting: int, **kw) -> Scheduler:
    """A full batch, `waiting` more requests, then one running request finishes: one free slot."""
    sched = make_scheduler(max_batch_size, **kw)
    add_requests(sched, max_batch_size)
    assert len(run(sched).prefills) == max_batch_size
    add_requests(sched, waiting)
    sched.finish(sched.running[0])
    return sched


@pytest.mark.parametrize("mix", [True, False], ids=["mixed", "separate"])
def test_one_free_slot_in_a_full_batch_decodes_instead_of_admitting(mix):
    sched = saturated(4, waiting=10, admit_min_batch=3, mix_decode=mix)
    step = run(sched)
    assert not step.prefill and step.requests == sched.running
    assert len(step.requests) == 3 and len(sched.waiting) == 10
    assert sched.deferred_steps == 1


@pytest.mark.parametrize("mix", [True, False], ids=["mixed", "separate"])
def test_admits_what_fits_after_max_wait_steps_then_defers_again(mix):
    sched = saturated(4, waiting=10, admit_min_batch=3, admit_max_wait_steps=5, mix_decode=mix)
    for _ in range(5):
        assert not run(sched).prefill
    step = run(sched)
    assert [r.request_id for r in step.prefills] == [sched.running[-1].request_id]  # the one slot
    assert step.decodes == (3 if mix else 0)
    assert len(sched.running) == 4 and len(sched.waiting) == 9 and sched.deferred_steps == 5
    sched.finish(sched.running[0])  # the counter started over with that admission
    assert not run(sched).prefill and sched.deferred_steps == 6


def test_admits_at_once_when_enough_slots_are_free():
    sched = saturated(6, waiting=10, admit_min_batch=3)
    assert not run(sched).prefill  # one slot free: deferred
    sched.finish(sched.running[0])
    assert not run(sched).prefill  # two
    sched.finish(sched.running[0])
    step = run(sched)  # three = admit_min_batch
    assert len(step.prefills) == 3 and step.decodes == 3
    assert len(sched.running) == 6 and sched.deferred_steps == 2


def test_low_load_admits_a_lone_request_at_once():
    sched = make_scheduler(8, admit_min_batch=8)
    add_requests(sched, 2)
    assert len(run(sched).prefills) == 2  # nothing running: never deferred
    add_requests(sched, 1)
    step = run(sched)
    assert len(step.prefills) == 1 and step.decodes == 2
    assert sched.deferred_steps == 0


def test_fewer_waiting_than_admit_min_batch_are_admitted_when_they_all_fit():
    sched = make_scheduler(6, admit_min_batch=8)
    add_requests(sched, 6)
    run(sched)
    sched.finish(sched.running[0])
    sched.finish(sched.running[0])
    add_requests(sched, 2)  # two free slots, two waiting
    step = run(sched)
    assert len(step.prefills) == 2 and not sched.waiting and sched.deferred_steps == 0


def test_pages_not_slots_limiting_admission_do_not_defer():
    """Enough free slots, pages for only one more prompt: it is admitted now, as before."""
    sched = make_scheduler(8, admit_min_batch=4, pages=60)
    add_requests(sched, 2, prompt_len=10)  # 40 pages
    run(sched)
    add_requests(sched, 3, prompt_len=6)  # 4 decode pages, then 12 per prompt: room for one
    step = run(sched)
    assert len(step.prefills) == 1 and sched.deferred_steps == 0


def test_admit_min_batch_1_admits_as_soon_as_a_slot_frees():
    sched = saturated(4, waiting=10, admit_min_batch=1)
    step = run(sched)
    assert len(step.prefills) == 1 and step.decodes == 3
    assert sched.deferred_steps == 0


def test_deferred_steps_start_the_adapter_loads_of_the_requests_next_in_line():
    """While admission waits, the adapters of the next admit_min_batch waiting requests are
    loaded (their copies overlap the decode steps), and none beyond them."""
    sched = saturated(4, waiting=0, admit_min_batch=3)
    cache = sched.adapters
    names = [f"ad{i}" for i in range(5)]
    for i, name in enumerate(names):
        cache.register(random_adapter(name, cache.spec, 4, ("q_proj", "v_proj"), torch.float32, seed=i))
    for name in names:
        sched.add(Request(prompt_ids=[1] * 4, params=SamplingParams(max_tokens=8), adapter=name,
                          on_output=lambda out: None))
    assert not any(cache.is_ready(n) for n in names)
    step = run(sched)
    assert not step.prefill and sched.deferred_steps == 1
    assert [cache.is_ready(n) for n in names] == [True] * 3 + [False] * 2
    assert all(cache.resident[n].refs == 0 for n in names[:3])  # loaded, not held: still evictable


def test_the_wait_bound_starts_over_when_the_queue_empties():
    """Deferred steps count toward admit_max_wait_steps only while requests wait: once the
    waiting ones are gone (cancelled here), newcomers get the whole bound again."""
    sched = saturated(4, waiting=5, admit_min_batch=3, admit_max_wait_steps=3)
    assert not run(sched).prefill and not run(sched).prefill  # 2 of the 3 deferrals used
    for req in list(sched.waiting):
        sched.finish(req)
    run(sched)  # a decode step with nobody waiting
    add_requests(sched, 5)
    assert [run(sched).prefill for _ in range(4)] == [False, False, False, True]


@pytest.mark.parametrize("mix", [True, False], ids=["mixed", "separate"])
def test_arrivals_gather_for_admit_gather_steps_then_are_admitted_together(mix):
    """Below a full batch (admit_gather_steps): newcomers wait while the running requests
    decode, then one prefill step admits all of them; the count starts over after it."""
    sched = make_scheduler(8, admit_min_batch=1, admit_gather_steps=3, mix_decode=mix)
    add_requests(sched, 2)
    assert len(run(sched).prefills) == 2  # nothing running: at once
    add_requests(sched, 1)
    assert not run(sched).prefill
    add_requests(sched, 2)
    assert not run(sched).prefill and not run(sched).prefill  # three decode-only steps in all
    step = run(sched)
    assert len(step.prefills) == 3 and step.decodes == (2 if mix else 0)
    assert sched.deferred_steps == 3 and not sched.waiting
    add_requests(sched, 1)
    assert not run(sched).prefill and sched.deferred_steps == 4


def test_gathering_stops_once_the_prompts_fill_a_prefill_step():
    sched = make_scheduler(8, admit_min_batch=1, admit_gather_steps=5, pages=20000)
    add_requests(sched, 1)
    run(sched)
    add_requests(sched, 1, prompt_len=1000)
    assert not run(sched).prefill
    add_requests(sched, 3, prompt_len=1100)  # 4300 waiting tokens >= max_prefill_tokens (4096)
    step = run(sched)
    assert step.prefill and len(step.prefills) == 3  # what fits the step's token budget
    assert sched.deferred_steps == 1


def test_no_gathering_by_default_or_with_an_empty_batch():
    sched = make_scheduler(8, admit_min_batch=1)
    add_requests(sched, 1)
    run(sched)
    add_requests(sched, 1)
    assert len(run(sched).prefills) == 1 and sched.deferred_steps == 0
    gathering = make_scheduler(8, admit_min_batch=1, admit_gather_steps=4)
    add_requests(gathering, 3)
    assert len(run(gathering).prefills) == 3  # nobody runs: nothing to wait beside
