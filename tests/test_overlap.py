"""The engine's overlap of decode steps (EngineConfig.overlap_decode): the next greedy decode
step is launched before the host reads the last one's tokens, its input ids taken on the
device. Tokens, texts and finish reasons must be those of the synchronous engine, whatever
ends a request (length, a stop string found one step late, the context limit, cancellation),
and every page must come back."""

from __future__ import annotations

import pytest
from engine_utils import greedy, run_batch, run_staggered, text_of, tokens_of
from test_scheduler import add_requests, make_scheduler, run
from tiny_model import build_adapter, build_tiny_model

from slora_backend.config import EngineConfig
from slora_backend.cuda_graphs import DecodeGraphs
from slora_backend.engine import Engine
from slora_backend.page_pool import PageUse
from slora_backend.request import SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    path = build_tiny_model(root / "model")
    build_adapter(path, root / "adapters" / "a1", rank=4, targets=["q_proj", "v_proj"], alpha=8, seed=3)
    build_adapter(path, root / "adapters" / "a2", rank=8, targets=["o_proj", "down_proj"], alpha=16, seed=4)
    return path, root / "adapters"


def make_engine(model, overlap: bool, static: bool) -> Engine:
    path, adapters = model
    # admit_gather_steps=0: late arrivals meet decoding requests (mixed steps), whatever the timing.
    engine = Engine(EngineConfig(model_dir=str(path), adapter_dir=str(adapters), kernel_backend="torch",
                                 pool_pages=3000, max_batch_size=8, overlap_decode=overlap, admit_gather_steps=0))
    if static:  # the CUDA-graph path's static buffers, run eagerly on CPU (as in test_engine_parity)
        scratch = engine.pool.alloc(2, PageUse.KV)
        engine.graphs = DecodeGraphs(engine.runner, 8, 64, tuple(scratch), engine.pool.num_pages)
    return engine


def jobs(stop: str | None) -> list[dict]:
    out = [dict(prompt="The quick brown", adapter="a1", params=greedy(21)),
           dict(prompt="Serving many adapters", adapter="a2", params=greedy(9)),
           dict(prompt="Hello there", params=greedy(14)),
           dict(prompt_ids=[5] * 250, adapter="a1", params=greedy(40)),  # the 256-token context ends it
           dict(prompt="One more", adapter="a2", params=greedy(1))]
    if stop is not None:
        out.append(dict(prompt="Hello there", adapter="a1",
                        params=SamplingParams(max_tokens=30, stop=[stop], ignore_eos=True)))
    return out


@pytest.mark.parametrize("static", [False, True], ids=["eager-decode", "static-decode-buffers"])
def test_overlapped_steps_match_the_synchronous_engine(model, static):
    results, stats = {}, {}
    stop = None
    for overlap in (False, True):
        engine = make_engine(model, overlap, static)
        try:
            if stop is None:  # a stop string from the middle of a request's text: it ends one step late
                text = text_of(run_batch(engine, [dict(prompt="Hello there", adapter="a1", params=greedy(30))])[0])
                stop = text[10:13]
                assert stop.strip()
            outs = run_batch(engine, jobs(stop))
            results[overlap] = [(tokens_of(o), text_of(o), o[-1].finish_reason, o[-1].error) for o in outs]
            stats[overlap] = engine.stats()
        finally:
            engine.shutdown()
    assert results[True] == results[False]
    assert [r[2].value for r in results[True]] == ["length"] * 5 + ["stop"]
    assert len(results[True][3][0]) == 6  # 250 prompt tokens + 6 = the context
    assert stats[False]["overlapped_steps"] == 0
    assert stats[True]["overlapped_steps"] > 10
    for s in stats.values():  # (the static path holds its two scratch pages)
        assert s["pool"]["pages_kv"] == (2 if static else 0) and s["requests"]["running"] == 0


def test_prefills_launched_behind_a_running_step_match_the_synchronous_engine(model):
    """Requests arriving while others decode: their (mixed) prefill steps are launched before
    the running requests' last tokens are read; those rows take their ids on the device."""
    first = [dict(prompt="The quick brown", adapter="a1", params=greedy(60)),
             dict(prompt="Serving many adapters", adapter="a2", params=greedy(9)),
             dict(prompt="Hello there", params=greedy(50))]
    later = [dict(prompt="Late arrival", adapter="a2", params=greedy(12)),
             dict(prompt="Another late one", params=greedy(7)),
             dict(prompt="And with a1", adapter="a1", params=greedy(10))]
    results, stats = {}, {}
    for overlap in (False, True):
        engine = make_engine(model, overlap, static=False)
        try:
            outs = run_staggered(engine, first, later, after_tokens=3)
            results[overlap] = [(tokens_of(o), o[-1].finish_reason) for o in outs]
            stats[overlap] = engine.stats()
        finally:
            engine.shutdown()
    assert results[True] == results[False]
    assert stats[True]["overlapped_prefill_steps"] > 0 and stats[False]["overlapped_steps"] == 0
    assert stats[True]["pool"]["pages_kv"] == 0


def test_cancel_while_a_step_is_in_flight_frees_everything(model):
    engine = make_engine(model, overlap=True, static=False)
    try:
        import queue

        q: queue.SimpleQueue = queue.SimpleQueue()
        other: queue.SimpleQueue = queue.SimpleQueue()
        rid = engine.submit(prompt="Triton", adapter="a1", params=greedy(200), on_output=q.put)
        engine.submit(prompt="Other", adapter="a2", params=greedy(60), on_output=other.put)
        for _ in range(3):
            assert not q.get(timeout=60).finished
        engine.cancel(rid)
        while not (out := q.get(timeout=60)).finished:
            pass
        assert out.finish_reason.value == "cancelled" and out.generated_tokens < 200
        while not (last := other.get(timeout=60)).finished:
            pass
        assert last.generated_tokens == 60
        s = engine.stats()
        assert s["overlapped_steps"] > 0
        assert s["pool"]["pages_kv"] == 0 and s["requests"]["running"] == 0
    finally:
        engine.shutdown()


def test_sampled_requests_take_the_synchronous_path(model):
    engine = make_engine(model, overlap=True, static=False)
    try:
        outs = run_batch(engine, [dict(prompt="Serving", params=SamplingParams(max_tokens=12, temperature=1.0,
                                                                               seed=7, ignore_eos=True))])
        assert len(tokens_of(outs[0])) == 12
        assert engine.stats()["overlapped_steps"] == 0
    finally:
        engine.shutdown()


def test_scheduling_ahead_decodes_the_continuing_and_admits_but_never_preempts():
    sched = make_scheduler(max_batch_size=4, admit_min_batch=1)
    reqs = add_requests(sched, 3)
    run(sched)  # prefill: all three running
    free = sched.pool.free
    step = sched.schedule(ahead=lambda r: r is not reqs[1])
    assert step is not None and not step.prefill
    assert set(step.requests) == {reqs[0], reqs[2]}
    assert sched.pool.free == free - 4  # K and V pages for the two
    # A waiting request that fits: admitted beside the continuing ones (a mixed step).
    late = add_requests(sched, 1)[0]
    step = sched.schedule(ahead=lambda r: r is not reqs[1] and r is not late)
    assert step.prefill and step.prefills == [late] and set(step.requests[1:]) == {reqs[0], reqs[2]}
    # Nobody continuing, nobody waiting: nothing to run.
    assert sched.schedule(ahead=lambda r: False) is None


def test_scheduling_ahead_answers_none_where_it_would_preempt():
    sched = make_scheduler(max_batch_size=4, admit_min_batch=1, pages=40)
    reqs = add_requests(sched, 3, prompt_len=6)  # 36 pages of KV
    run(sched)
    free, running = sched.pool.free, list(sched.running)
    assert free < 2 * len(reqs)
    assert sched.schedule(ahead=lambda r: True) is None
    assert sched.pool.free == free and sched.running == running and sched.preemptions == 0
    step = sched.schedule()  # without a step in flight it preempts, as before
    assert step is not None and sched.preemptions > 0
