"""Three adapter tiers (disk <- host budget <- GPU pool) with 10,000 adapters on disk.

Four real PEFT adapters are written by PEFT itself; the other directories copy one of their
configs and carry fresh random weights (valid PEFT adapters, each one distinct), so writing
10,000 of them takes seconds. A random mix of requests, skewed so that some adapters come back
from every tier, runs with a host budget that holds a few hundred adapters and a pool that
holds a few dozen. Outputs are checked against HF+PEFT and against the same request served
alone; host memory is checked against the budget. Load latencies are printed, not asserted.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time

import numpy as np
import pytest
import torch
from engine_utils import greedy, run_batch, tokens_of
from safetensors.torch import load_file
from tiny_model import ALL_MODULES, build_adapter, build_tiny_model, hf_peft_greedy

from slora_backend.adapter_cache import AdapterCache
from slora_backend.checkpoint import read_spec
from slora_backend.config import EngineConfig
from slora_backend.dummy import random_adapter
from slora_backend.engine import Engine
from slora_backend.page_pool import PagePool

N_ADAPTERS = 10_000
BUDGET_MB = 8.0  # ~300 of these adapters (7-64 KiB each)
TEMPLATES = {  # name -> PEFT settings; adapter i copies template i % 4
    "t-qv4": dict(rank=4, targets=["q_proj", "v_proj"], alpha=8),
    "t-all8": dict(rank=8, targets=ALL_MODULES, alpha=16, use_rslora=True),
    "t-mlp2": dict(rank=2, targets=["gate_proj", "up_proj", "down_proj"], alpha=4),
    "t-ko16": dict(rank=16, targets=["k_proj", "o_proj"], alpha=32),
}
MAX_TOKENS = 4


def adapter_name(i: int) -> str:
    return f"ad{i:05d}"


def write_many(model, root, n: int) -> None:
    """n PEFT adapter directories under root, adapter i a variant of template i % 4."""
    templates = []
    for k, (name, kw) in enumerate(TEMPLATES.items()):
        path = build_adapter(model, root / ".templates" / name, seed=10 + k, **kw)
        raw = (path / "adapter_model.safetensors").read_bytes()
        head_len = 8 + int.from_bytes(raw[:8], "little")  # safetensors: u64 header size, JSON header, data
        header = json.loads(raw[8:head_len])
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}
        weights = np.frombuffer(raw[head_len:], dtype=np.float32)
        templates.append(((path / "adapter_config.json").read_bytes(), raw[:head_len], weights))
    for i in range(n):
        config, head, weights = templates[i % len(templates)]
        # Same tensors, shapes and magnitudes, every weight's sign drawn anew: a distinct adapter
        # for the price of one numpy call (safetensors.save costs ~1 ms a file, 10 s for all).
        signs = np.random.default_rng(i).integers(0, 2, weights.size, dtype=np.int8) * 2 - 1
        out = root / adapter_name(i)
        out.mkdir()
        (out / "adapter_config.json").write_bytes(config)
        (out / "adapter_model.safetensors").write_bytes(head + (weights * signs).astype(np.float32).tobytes())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiers")
    model = build_tiny_model(root / "model")
    t0 = time.monotonic()
    write_many(model, root / "adapters", N_ADAPTERS)
    print(f"\nwrote {N_ADAPTERS} adapters in {time.monotonic() - t0:.1f}s")
    engine = Engine(EngineConfig(model_dir=str(model), adapter_dir=str(root / "adapters"), kernel_backend="torch",
                                 pool_pages=1500, max_batch_size=16, host_adapter_budget_mb=BUDGET_MB))
    yield model, root / "adapters", engine
    engine.shutdown()


def run_windowed(engine, jobs: list[dict], window: int = 48, timeout: float = 300.0) -> list[list[int]]:
    """Submit jobs keeping at most `window` in flight (a client pool); each one's token ids."""
    done: queue.SimpleQueue = queue.SimpleQueue()
    results: list[list[int]] = [[] for _ in jobs]
    errors: list[str] = []

    def callback(i):
        def on_output(out):
            results[i].extend(out.token_ids)
            if out.error:
                errors.append(f"job {i}: {out.error}")
            if out.finished:
                done.put(i)
        return on_output

    in_flight = finished = 0
    for i, job in enumerate(jobs):
        while in_flight >= window:
            done.get(timeout=timeout)
            in_flight -= 1
            finished += 1
        engine.submit(on_output=callback(i), **job)
        in_flight += 1
    while finished < len(jobs):
        done.get(timeout=timeout)
        finished += 1
    assert not errors, errors[:5]
    return results


def test_ten_thousand_adapters_in_three_tiers(setup):
    model, adapters_dir, engine = setup
    rng = random.Random(0)
    hot = [rng.randrange(N_ADAPTERS) for _ in range(60)]
    hot_prompt = {a: [rng.randrange(1, 300) for _ in range(rng.randrange(3, 10))] for a in hot}
    jobs, keys = [], []
    for _ in range(1200):
        if rng.random() < 0.5:  # hot adapters: served again and again, from every tier
            a = rng.choice(hot)
            prompt = hot_prompt[a]
        else:  # cold: most are read from disk once
            a = rng.randrange(N_ADAPTERS)
            prompt = [rng.randrange(1, 300) for _ in range(rng.randrange(3, 10))]
        jobs.append(dict(prompt_ids=prompt, adapter=adapter_name(a), params=greedy(MAX_TOKENS)))
        keys.append((adapter_name(a), tuple(prompt)))

    t0 = time.monotonic()
    outs = run_windowed(engine, jobs)
    elapsed = time.monotonic() - t0
    stats = engine.stats()["adapters"]
    budget = int(BUDGET_MB * 2**20)

    # Host memory: never above the budget, and the accounting matches what is really held.
    assert stats["host_budget_bytes"] == budget
    assert 0 < stats["peak_host_bytes"] <= budget
    cache = engine.adapters
    assert cache.host_bytes == sum(a.pages.numel() * a.pages.element_size() for a in cache.host.values())
    assert 100 < len(cache.host) < 1000, "the budget should hold a few hundred of these adapters"
    # Every tier was exercised: host evictions, re-reads from disk, pool evictions.
    distinct = len({k[0] for k in keys})
    assert stats["host_evictions"] > 0 and stats["evictions"] > 0
    assert stats["disk_reads"] > distinct, "some adapters should have come back from disk"
    assert stats["loads"] > distinct, "some adapters should have come back from host memory"

    # The same (adapter, prompt) served at different times, from different tiers, agrees.
    seen: dict[tuple, list[int]] = {}
    for key, toks in zip(keys, outs, strict=True):
        assert len(toks) == MAX_TOKENS
        assert seen.setdefault(key, toks) == toks, key

    # Against HF+PEFT (the oracle) for a few, against the same request served alone for more.
    sample = rng.sample(range(len(jobs)), 40)
    for i in sample[:4]:
        name, prompt = keys[i]
        assert outs[i] == hf_peft_greedy(model, adapters_dir / name, list(prompt), MAX_TOKENS), name
    for i in sample:
        alone = run_batch(engine, [jobs[i]])[0]
        assert alone[-1].error is None
        assert tokens_of(alone) == outs[i], keys[i]
    # Distinct adapters really differ (a mix-up of adapters would otherwise go unnoticed).
    assert len({tuple(outs[i]) for i in sample}) > len(sample) // 2

    s = engine.stats()["adapters"]
    print(f"\n{len(jobs)} requests over {distinct} distinct adapters in {elapsed:.1f}s; "
          f"host peak {s['peak_host_bytes'] / 2**20:.2f} MiB of {BUDGET_MB} MiB, {len(cache.host)} cached, "
          f"{s['host_evictions']} host evictions, {s['disk_reads']} disk reads, {s['loads']} pool loads, "
          f"{s['evictions']} pool evictions")
    for stage in ("disk_to_host", "host_to_gpu"):
        t = s[stage]
        print(f"load latency {stage}: n={t['count']} mean={t['mean_s'] * 1e3:.2f} ms "
              f"p50={t['p50_s'] * 1e3:.2f} ms p99={t['p99_s'] * 1e3:.2f} ms max={t['max_s'] * 1e3:.2f} ms")


def test_list_reports_true_tiers_of_all_adapters(setup):
    _, adapters_dir, engine = setup
    run_batch(engine, [dict(prompt_ids=[5, 6, 7], adapter=adapter_name(1), params=greedy(2))])
    listed = {e["name"]: e for e in engine.list_adapters()}
    assert len(listed) == N_ADAPTERS
    cache = engine.adapters
    tiers = {t: {n for n, e in listed.items() if e["tier"] == t} for t in ("gpu", "host", "disk")}
    assert tiers["gpu"] == set(cache.resident) and adapter_name(1) in tiers["gpu"]
    assert tiers["host"] == set(cache.host) - set(cache.resident)
    assert len(tiers["disk"]) > N_ADAPTERS // 2
    for name in (adapter_name(1), *list(tiers["disk"])[:3], *list(tiers["host"])[:3]):
        e = listed[name]
        template = TEMPLATES[list(TEMPLATES)[int(name[2:]) % 4]]
        assert e["rank"] == template["rank"] and e["target_modules"] == template["targets"]
        assert e["bytes"] > 0 and "requests_served" in e and "error" not in e
    # A disk-tier entry's bytes (from its config) are what the adapter takes once read.
    name = sorted(tiers["disk"])[0]
    predicted = listed[name]["bytes"]
    engine.load_adapter(name)
    assert {e["name"]: e for e in engine.list_adapters()}[name]["bytes"] == predicted


def test_host_copies_are_at_most_5_percent_over_the_weights(setup):
    _, adapters_dir, engine = setup
    for i in range(4):
        info = engine.adapters.info(adapter_name(i))
        weights = sum(t.numel() * 4 for t in load_file(str(adapters_dir / adapter_name(i) /
                                                            "adapter_model.safetensors")).values())
        assert weights <= info.nbytes <= 1.05 * weights


def _cache(adapter_dir, model, budget: int) -> AdapterCache:
    spec = read_spec(model)
    pool = torch.zeros(spec.layers, 4000, spec.page_width)
    return AdapterCache(spec, torch.float32, PagePool(4000), pool, str(adapter_dir), 64, budget)


def test_memory_only_and_in_flight_adapters_are_never_evicted(setup):
    model, adapters_dir, _ = setup
    cache = _cache(adapters_dir, model, budget=200_000)
    bench = random_adapter("bench", cache.spec, 8, ("q_proj", "v_proj"), torch.float32, seed=1)
    cache.register(bench)  # no disk copy: must survive any pressure
    cache.get_host(adapter_name(3))
    cache.copying.add(adapter_name(3))  # as while its pool copy is in flight on CUDA
    for i in range(4, 60):
        cache.get_host(adapter_name(i))
        assert cache.host_bytes <= 200_000
    assert "bench" in cache.host and adapter_name(3) in cache.host
    assert cache.host_evictions > 0 and cache.memory_bytes == bench.nbytes
    cache.copying.discard(adapter_name(3))
    for i in range(60, 80):
        cache.get_host(adapter_name(i))
    assert adapter_name(3) not in cache.host and "bench" in cache.host


def test_gpu_resident_adapter_without_host_copy_still_serves(setup):
    """The host copy of a resident adapter may go; requests keep reading the pool pages, and
    after a pool eviction it is read from disk again."""
    model, adapters_dir, _ = setup
    cache = _cache(adapters_dir, model, budget=100_000)
    name = adapter_name(7)
    assert cache.start_load(name) and cache.is_ready(name)
    pages = cache.pool_tensor[:, cache.resident[name].page_ids.long()].clone()
    for i in range(100, 140):  # push its host copy out
        cache.get_host(adapter_name(i))
    assert name not in cache.host and name in cache.resident
    cache.evict(name)
    reads = cache.disk_reads
    assert cache.start_load(name) and cache.disk_reads == reads + 1
    assert torch.equal(cache.pool_tensor[:, cache.resident[name].page_ids.long()], pages)


def test_adapter_broken_on_disk_after_submit_fails_that_request_only(setup):
    """Submit validates the adapter and caches its host copy. If that copy is pushed out before
    the request is admitted and the files no longer validate when the engine reads them again,
    that request gets an error; the others are served and no page leaks."""
    model, adapters_dir, _ = setup
    engine = Engine(EngineConfig(model_dir=str(model), adapter_dir=str(adapters_dir), kernel_backend="torch",
                                 pool_pages=1500, max_batch_size=4, host_adapter_budget_mb=0.05))
    victim = adapter_name(9)
    cfg_path = adapters_dir / victim / "adapter_config.json"
    good = cfg_path.read_bytes()
    try:
        # Hold the engine thread (its inbox runs in order) so both requests wait unadmitted.
        gate = threading.Event()
        engine._inbox.put(("call", (gate.wait, queue.SimpleQueue())))
        engine._wake.set()
        queues = [queue.SimpleQueue(), queue.SimpleQueue()]
        engine.submit(prompt_ids=[3, 4], adapter=victim, params=greedy(2), on_output=queues[0].put)
        engine.submit(prompt_ids=[3, 4], adapter=adapter_name(8), params=greedy(2), on_output=queues[1].put)
        for i in range(200, 230):
            engine.adapters.get_host(adapter_name(i))
        assert victim not in engine.adapters.host
        cfg_path.write_text(json.dumps({**json.loads(good), "use_dora": True}))
        gate.set()
        outs = [[], []]
        for q, got in zip(queues, outs, strict=True):
            while not got or not got[-1].finished:
                got.append(q.get(timeout=60))
        assert "DoRA" in (outs[0][-1].error or "")
        assert outs[1][-1].error is None and len(tokens_of(outs[1])) == 2
        assert engine.stats()["pool"]["pages_kv"] == 0 and engine.is_alive()
    finally:
        cfg_path.write_bytes(good)
        engine.shutdown()
