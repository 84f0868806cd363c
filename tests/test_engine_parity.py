"""Greedy parity with HF Transformers + PEFT (fp32, CPU), adapters batched with base requests.

The Triton-lang kernels run here through the interpreter (kernel_backend="triton"); the torch
backend, which serves on CPU, is checked the same way.
"""

from __future__ import annotations

import random

import pytest
from engine_utils import greedy, run_batch, run_staggered, tokens_of
from tiny_model import PARITY_ADAPTERS, build_adapter, build_tiny_model, hf_peft_greedy

from kernels.lora_batch import ATTENTION_MODULES
from slora_backend.config import EngineConfig
from slora_backend.cuda_graphs import DecodeGraphs
from slora_backend.engine import Engine
from slora_backend.page_pool import PageUse

ADAPTERS = PARITY_ADAPTERS
NEW_TOKENS = 10


@pytest.fixture(scope="module", params=[dict(), dict(tie_embeddings=True, head_dim=24)],
                ids=["gqa", "tied-headdim24"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    model = build_tiny_model(root / "model", **request.param)
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        build_adapter(model, root / "adapters" / name, seed=100 + i, **kw)
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 380) for _ in range(n)] for n in (1, 5, 9, 17, 3, 12, 7)]
    names = [None, *ADAPTERS, None]
    refs = {}
    for i, name in enumerate(names):
        ad = None if name is None else root / "adapters" / name
        refs[i] = hf_peft_greedy(model, ad, prompts[i], NEW_TOKENS)
    return model, root / "adapters", prompts, names, refs


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_batched_greedy_matches_hf_peft(setup, backend):
    model, adapters, prompts, names, refs = setup
    engine = Engine(EngineConfig(model_dir=str(model), adapter_dir=str(adapters),
                                 kernel_backend=backend, pool_pages=3000))
    try:
        jobs = [dict(prompt_ids=prompts[i], adapter=name, params=greedy(NEW_TOKENS))
                for i, name in enumerate(names)]
        results = run_batch(engine, jobs)
        for i, outs in enumerate(results):
            assert outs[-1].error is None, outs[-1].error
            assert outs[-1].finish_reason.value == "length"
            assert tokens_of(outs) == refs[i], f"request {i} adapter {names[i]}"
        # Several requests shared a step: the batch really mixed adapters.
        assert engine.steps < len(jobs) * NEW_TOKENS
    finally:
        engine.shutdown()


@pytest.mark.parametrize("mix,gmv,min_segments,split", [(True, True, 1, True), (True, False, 1, False),
                                                        (True, True, 8, False), (False, True, 1, False)],
                         ids=["mixed", "mixed-decode-rows-mbgmm", "mixed-few-segments", "separate"])
def test_requests_arriving_while_others_decode_match_hf_peft(setup, mix, gmv, min_segments, split):
    """Later requests' prefills meet running ones: with mixing (the default) the running
    requests decode inside those prefill steps (rows of both kinds, both attention paths,
    Triton kernels), their LoRA on the MBGMV kernels (LoraBatch.decode) or, with
    lora_decode_rows_gmv off or fewer adapter segments among the decode rows than
    lora_decode_gmv_min_segments (8: more than the 7 requests, whatever steps their
    admissions fall in), in MBGMM segments with the prompts; tokens stay HF+PEFT's."""
    model, adapters, prompts, names, refs = setup
    # admit_gather_steps=0: the late requests are admitted while the first ones still decode,
    # whatever the timing (gathering could hold them until those had finished).
    engine = Engine(EngineConfig(model_dir=str(model), adapter_dir=str(adapters), kernel_backend="triton",
                                 pool_pages=3000, mix_decode_in_prefill=mix, lora_decode_rows_gmv=gmv,
                                 lora_decode_gmv_min_segments=min_segments, admit_gather_steps=0))
    split_steps = []
    prepare = engine.runner.prepare

    def spy(step, cache):
        inp = prepare(step, cache)
        split_steps.append(inp.lora is not None and inp.lora.decode is not None)
        return inp

    engine.runner.prepare = spy
    try:
        jobs = [dict(prompt_ids=prompts[i], adapter=name, params=greedy(NEW_TOKENS))
                for i, name in enumerate(names)]
        results = run_staggered(engine, jobs[:3], jobs[3:])
        for i, outs in enumerate(results):
            assert outs[-1].error is None, outs[-1].error
            assert tokens_of(outs) == refs[i], f"request {i} adapter {names[i]}"
        mixed = engine.stats()["mixed_steps"]
        assert mixed > 0 if mix else mixed == 0
        assert any(split_steps) == split
    finally:
        engine.shutdown()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_static_decode_buffers_match_hf_peft(setup, backend):
    """The CUDA-graph decode path (static padded buffers, one segment per row, fixed-width
    adapter tables, rank buckets) run eagerly on CPU: same tokens as HF+PEFT."""
    model, adapters, prompts, names, refs = setup
    engine = Engine(EngineConfig(model_dir=str(model), adapter_dir=str(adapters), kernel_backend=backend,
                                 pool_pages=3000, max_batch_size=12, max_rank=64))
    try:
        scratch = engine.pool.alloc(2, PageUse.KV)  # never handed out again: the padding pages
        engine.graphs = DecodeGraphs(engine.runner, 12, 64, tuple(scratch), engine.pool.num_pages)
        jobs = [dict(prompt_ids=prompts[i], adapter=name, params=greedy(NEW_TOKENS))
                for i, name in enumerate(names)]
        for i, outs in enumerate(run_batch(engine, jobs)):
            assert tokens_of(outs) == refs[i], f"request {i} adapter {names[i]}"
        assert engine.graphs.bucket(7) == 8 and engine.graphs.bucket(9) == 12 and engine.graphs.bucket(13) is None
        assert engine.graphs._inputs(1, 8, 1).lora.rows_are_adapters  # stage() writes per-row tables
    finally:
        engine.shutdown()


def test_attention_only_steps_take_the_graph_without_mlp_lora(setup):
    """Adapters on attention modules only (S-LoRA's q,k,v,o): decode steps take the graph
    variant without the MLP LoRA points (half the launches), and the tokens stay HF+PEFT's."""
    model, adapters, prompts, names, refs = setup
    engine = Engine(EngineConfig(model_dir=str(model), adapter_dir=str(adapters), kernel_backend="torch",
                                 pool_pages=3000, max_batch_size=12, max_rank=64))
    try:
        scratch = engine.pool.alloc(2, PageUse.KV)
        graphs = engine.graphs = DecodeGraphs(engine.runner, 12, 64, tuple(scratch), engine.pool.num_pages)
        seen = []
        stage = graphs.stage

        def recording_stage(step, cache):
            staged = stage(step, cache)
            # (any adapter row in the step, LoRA modules class of the graph replayed)
            seen.append((any(r.adapter is not None for r in step.requests), staged[3]))
            return staged

        graphs.stage = recording_stage
        picked = [i for i, n in enumerate(names) if n is None or ADAPTERS[n]["targets"][-1] in ("v_proj", "o_proj")]
        assert len(picked) == 5  # base x2, r1-qv, r5-ko, r64-attn
        jobs = [dict(prompt_ids=prompts[i], adapter=names[i], params=greedy(NEW_TOKENS)) for i in picked]
        for i, outs in zip(picked, run_batch(engine, jobs), strict=True):
            assert tokens_of(outs) == refs[i], f"request {i} adapter {names[i]}"
        # Steps holding only base rows (possible while adapters load) take the no-LoRA graph.
        assert (True, ATTENTION_MODULES) in seen
        assert set(seen) <= {(True, ATTENTION_MODULES), (False, 0)}
    finally:
        engine.shutdown()


def test_every_adapter_changes_the_output(setup):
    """If LoRA were ignored, adapter outputs would equal the base output for the same prompt."""
    model, adapters, prompts, names, refs = setup
    for i, name in enumerate(names):
        if name is None:
            continue
        base = hf_peft_greedy(model, None, prompts[i], NEW_TOKENS)
        assert refs[i] != base, f"adapter {name} does not change the greedy output"


def test_tiny_pool_evicts_adapters_and_still_matches(setup):
    """A pool that cannot hold every adapter at once: adapters are evicted and reloaded."""
    model, adapters, prompts, names, refs = setup
    engine = Engine(EngineConfig(model_dir=str(model), adapter_dir=str(adapters),
                                 kernel_backend="torch", pool_pages=1000))
    try:
        jobs = [dict(prompt_ids=prompts[i], adapter=name, params=greedy(NEW_TOKENS))
                for i, name in enumerate(names)]
        for i, outs in enumerate(run_batch(engine, jobs)):
            assert tokens_of(outs) == refs[i], f"request {i} adapter {names[i]}"
        assert engine.stats()["adapters"]["evictions"] > 0
    finally:
        engine.shutdown()


def test_tiny_pool_preempts_and_still_matches(setup):
    """Prompts fit at admission but decode growth overflows the pool: requests are preempted,
    recomputed later, and every result is still exact; afterwards the pool is all free."""
    model, adapters, prompts, _, _ = setup
    names = [None, "r1-qv", "r5-ko", None, "r1-qv", None, "r5-ko"]
    refs = [hf_peft_greedy(model, None if n is None else adapters / n, prompts[i], NEW_TOKENS)
            for i, n in enumerate(names)]
    engine = Engine(EngineConfig(model_dir=str(model), adapter_dir=str(adapters),
                                 kernel_backend="torch", pool_pages=150))
    try:
        jobs = [dict(prompt_ids=prompts[i], adapter=n, params=greedy(NEW_TOKENS))
                for i, n in enumerate(names)]
        for i, outs in enumerate(run_batch(engine, jobs)):
            assert tokens_of(outs) == refs[i], f"request {i} adapter {names[i]}"
        assert engine.stats()["requests"]["preemptions"] > 0
        engine.shutdown()
        engine.pool.check()
        assert engine.pool.stats().pages_kv == 0
        engine.adapters.evict_all_idle()
        assert engine.pool.stats().pages_free == engine.pool.num_pages
    finally:
        engine.shutdown()


def test_llama3_rope_scaling_matches_hf(tmp_path):
    """Llama-3.1-style rope scaling (rope_type llama3) gives HF's greedy tokens, also past the
    original context where the scaled frequencies matter."""
    import json

    model = build_tiny_model(tmp_path / "model")
    prompt = [random.Random(2).randrange(1, 380) for _ in range(24)]
    unscaled = hf_peft_greedy(model, None, prompt, NEW_TOKENS)
    cfg_path = model / "config.json"
    cfg = json.loads(cfg_path.read_text())
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    cfg["rope_scaling"] = scaling
    if "rope_parameters" in cfg:  # transformers 5 reads rope settings from here
        cfg["rope_parameters"] = {**cfg["rope_parameters"], **scaling}
    cfg_path.write_text(json.dumps(cfg))
    ref = hf_peft_greedy(model, None, prompt, NEW_TOKENS)
    assert ref != unscaled, "the prompt must be one where the scaling changes HF's output"
    engine = Engine(EngineConfig(model_dir=str(model), kernel_backend="torch", pool_pages=500))
    try:
        assert engine.spec.rope_scaling is not None
        assert tokens_of(run_batch(engine, [dict(prompt_ids=prompt, params=greedy(NEW_TOKENS))])[0]) == ref
    finally:
        engine.shutdown()


def test_admission_batching_keeps_tokens_exact(setup):
    """More requests than batch slots, finishing one at a time (different lengths): with
    admit_min_batch > 1, or with arrivals gathered (admit_gather_steps), admissions wait while
    the others decode (Scheduler.deferred_steps), and every request still gets HF+PEFT's greedy
    tokens, as when nothing waits."""
    model, adapters, prompts, names, refs = setup
    lengths = [NEW_TOKENS - i % 4 for i in range(len(names))]
    jobs = [dict(prompt_ids=prompts[i], adapter=name, params=greedy(lengths[i])) for i, name in enumerate(names)]
    deferred = {}
    for admit_min, gather in ((1, 0), (3, 0), (1, 4)):
        engine = Engine(EngineConfig(model_dir=str(model), adapter_dir=str(adapters), kernel_backend="torch",
                                     pool_pages=3000, max_batch_size=3, admit_min_batch=admit_min,
                                     admit_max_wait_steps=4, admit_gather_steps=gather))
        try:
            for i, outs in enumerate(run_batch(engine, jobs)):
                assert outs[-1].error is None, outs[-1].error
                assert tokens_of(outs) == refs[i][: lengths[i]], f"request {i} adapter {names[i]}"
            deferred[admit_min, gather] = engine.stats()["requests"]["admission_deferred_steps"]
        finally:
            engine.shutdown()
    assert deferred[1, 0] == 0 and deferred[3, 0] > 0 and deferred[1, 4] > 0
