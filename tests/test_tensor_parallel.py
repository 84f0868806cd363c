"""Tensor parallelism (slora_backend/tensor_parallel.py, tp_worker.py) on CPU.

* The sharding math: a sharded LoRA delta (shards of real adapter page images, shrink per
  rank, the all-gather / all-reduce's result, expand per rank) equals the unsharded one, for
  column- and row-split projections, odd ranks, 2 and 3 ranks, torch and Triton (interpreted).
* The engine with 2 gloo processes gives the same greedy tokens as with one process (and as
  HF+PEFT): tiny GQA model, adapters of ranks 1..64 on all seven modules, base requests in the
  same batches; also through the static decode buffers of the CUDA-graph path.
* A killed worker fails the running request with an error and the engine stops; it never hangs.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import time
from dataclasses import replace

import pytest
import torch
from engine_utils import greedy, run_batch, run_staggered, tokens_of
from tiny_model import PARITY_ADAPTERS, build_adapter, build_tiny_model, hf_peft_greedy

from kernels import LoraBatch, get_ops
from kernels.lora_tp import get_tp_lora_ops
from slora_backend.adapters import build_host_adapter, page_layout
from slora_backend.checkpoint import MODULES, ModelSpec
from slora_backend.config import EngineConfig
from slora_backend.engine import Engine
from slora_backend.request import SamplingParams
from slora_backend.tensor_parallel import (
    TPGroup,
    check_tp,
    join_rank_rows,
    pack_step,
    rank_slices,
    shard_adapter,
    shard_layout,
    unpack_step,
)

# GQA, q width = hidden, MLP and hidden split into pages that do not divide them evenly.
SPEC = ModelSpec(hidden=96, layers=2, heads=12, kv_heads=6, head_dim=8, intermediate=120, vocab=64,
                 rope_theta=1e4, rms_eps=1e-5, tie_embeddings=False, max_position=64, rope_scaling=None,
                 eos_token_ids=())
# (rank, targets): odd ranks, a rank below N, modules on both sides of the split.
ADAPTERS = [(5, MODULES), (1, ("q_proj", "v_proj", "down_proj")), (3, ("k_proj", "o_proj", "gate_proj", "up_proj"))]


def _full_adapter(name: str, rank: int, targets, seed: int):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(SPEC.layers):
        for mod in targets:
            d_in, d_out = SPEC.module_shape(mod)
            tensors[(layer, mod, "A")] = torch.randn(rank, d_in, generator=g) / d_in**0.5
            tensors[(layer, mod, "B")] = torch.randn(d_out, rank, generator=g)
    config = {"r": rank, "lora_alpha": 2 * rank + 1}
    return build_host_adapter(name, config, list(targets), tensors, SPEC, torch.float32, 64, False)


def _pool_and_batch(adapters, seg_starts, seg_adapter, page_ids_of) -> tuple[torch.Tensor, LoraBatch]:
    """A NaN-poisoned pool holding `adapters` at the given page ids, and the step's tables."""
    width = adapters[0].pages.shape[-1]
    n_pages = 1 + max(max(ids) for ids in page_ids_of)
    pool = torch.full((SPEC.layers, n_pages, width), float("nan"))
    ranks, a_starts, b_starts, scales, ids = [], [], [], [], []
    base = 0
    for ad, pages in zip(adapters, page_ids_of, strict=True):
        pool[:, pages] = ad.pages
        ranks.append(ad.ranks)
        scales.append(ad.scales)
        a_starts.append([base + o for o in ad.a_offsets])
        b_starts.append([base + o for o in ad.b_offsets])
        ids += pages
        base += len(pages)

    def table(rows, dtype=torch.int32):
        return torch.tensor(rows, dtype=dtype).t().contiguous()  # (7, A)

    batch = LoraBatch(seg_starts=torch.tensor(seg_starts, dtype=torch.int32),
                      seg_adapter=torch.tensor(seg_adapter, dtype=torch.int32), ranks=table(ranks),
                      scales=table(scales, torch.float32), a_starts=table(a_starts), b_starts=table(b_starts),
                      page_ids=torch.tensor(ids, dtype=torch.int32),
                      max_rank=max(ad.rank for ad in adapters),
                      max_seg_len=max(b - a for a, b in zip(seg_starts[:-1], seg_starts[1:], strict=True)))
    return pool, batch


def _page_ids(sizes: list[int], seed: int) -> list[list[int]]:
    perm = random.Random(seed).sample(range(sum(sizes) + 7), sum(sizes))
    out, at = [], 0
    for n in sizes:
        out.append(perm[at : at + n])
        at += n
    return out


def _with_decode_part(batch: LoraBatch, decode_adapter: list[int], rank: int) -> LoraBatch:
    """`batch` followed by one decode row per entry of decode_adapter, on the MBGMV kernels (as
    adapter_cache.device_lora_batch builds a mixed step's tables)."""
    n_dec = len(decode_adapter)
    batch.decode = replace(batch, seg_starts=torch.arange(n_dec + 1, dtype=torch.int32),
                           seg_adapter=torch.tensor(decode_adapter, dtype=torch.int32), max_seg_len=1,
                           max_rank=rank, eager_decode=True)
    batch.decode_start = int(batch.seg_starts[-1])
    return batch


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("segments", ["decode", "prefill", "rank1", "mixed", "mixed-base-prompts"])
def test_sharded_lora_delta_equals_unsharded(backend, n, segments):
    full = [_full_adapter(f"a{i}", r, t, seed=i) for i, (r, t) in enumerate(ADAPTERS)]
    decode_rows = None  # mixed steps: decode rows after the segments' rows, a part of their own
    if segments == "decode":  # MBGMV path: short segments, one of them base-only
        seg_starts, seg_adapter = [0, 2, 4, 5, 8], [-1, 0, 1, 2]
    elif segments == "prefill":  # MBGMM path
        seg_starts, seg_adapter = [0, 20, 23, 40], [2, -1, 0]
    elif segments == "mixed":  # 11 prompt rows (an odd count: the decode rows' intermediate is padded)
        seg_starts, seg_adapter, decode_rows = [0, 6, 11], [2, -1], [0, 1, -1, 2, 0]
    elif segments == "mixed-base-prompts":  # no prompt row has an adapter: the prompt part is skipped
        seg_starts, seg_adapter, decode_rows = [0, 7], [-1], [1, 1, 2]
    else:  # the step's largest rank below N: one intermediate column per rank
        full = full[1:2]
        seg_starts, seg_adapter = [0, 1, 3], [0, -1]
    rows = seg_starts[-1] + len(decode_rows or ())

    def step_batch(adapters, page_ids) -> tuple[torch.Tensor, LoraBatch]:
        pool, batch = _pool_and_batch(adapters, seg_starts, seg_adapter, page_ids)
        if decode_rows is not None:
            prompt_ranks = [full[a].rank for a in seg_adapter if a >= 0]
            batch.max_rank = max(prompt_ranks, default=0)  # the parts' own ranks, as on rank 0
            _with_decode_part(batch, decode_rows, rank=8)  # the rank bucket of ranks <= 8
        return pool, batch

    ref_pool, ref_batch = step_batch(full, _page_ids([a.n_pages for a in full], seed=1))
    shards = [[shard_adapter(a, SPEC, n, i) for a in full] for i in range(n)]
    shard_ids = _page_ids([a.n_pages for a in shards[0]], seed=2)  # the same page ids on every rank
    ranks = [step_batch(shards[i], shard_ids) for i in range(n)]
    groups = [TPGroup(n, i, SPEC, get_tp_lora_ops(backend)) for i in range(n)]
    steps = [g.lora_step(batch) for g, (_, batch) in zip(groups, ranks, strict=True)]
    if decode_rows is not None:
        assert len(steps[0].parts) == (2 if segments == "mixed" else 1)
    ref_ops = get_ops("torch")
    torch.manual_seed(0)
    layer = SPEC.layers - 1  # not layer 0: shards must keep every layer's own weights
    q, kv, mlp = SPEC.q_width, SPEC.kv_width, SPEC.intermediate

    # Column-split groups: shrink per rank, all-gather (concatenation), expand per rank.
    for mods, offsets, widths in (((0, 1, 2), (0, q, q + kv), (q, kv, kv)), ((4, 5), (0, mlp), (mlp, mlp))):
        x = torch.randn(rows, SPEC.hidden)
        want = torch.zeros(rows, sum(widths))
        ref_ops.lora_apply(x, want, ref_pool[layer], ref_batch, mods, offsets)
        parts = [g.shrink_parts(x, pool[layer], st, mods, column=True)
                 for g, (pool, _), st in zip(groups, ranks, steps, strict=True)]
        joined = join_rank_rows(torch.cat(parts), n)
        for i, ((pool, _), st) in enumerate(zip(ranks, steps, strict=True)):
            local = [w // n for w in widths]
            got = torch.zeros(rows, sum(local))
            groups[i].expand_parts(got, joined, pool[layer], st, mods, [sum(local[:j]) for j in range(len(mods))],
                                   local, column=True)
            for j, (off, w) in enumerate(zip(offsets, local, strict=True)):
                expect = want[:, off + i * w : off + (i + 1) * w]
                torch.testing.assert_close(got[:, sum(local[:j]) : sum(local[:j]) + w], expect,
                                           rtol=1e-4, atol=1e-4)

    # Row-split modules: shrink on the rank's input columns, all-reduce (sum), each rank's B slice.
    for mod, width in ((3, q), (6, mlp)):
        x = torch.randn(rows, width)
        want = torch.zeros(rows, SPEC.hidden)
        ref_ops.lora_apply(x, want, ref_pool[layer], ref_batch, (mod,), (0,))
        cut = [rank_slices(SPEC, n, i).q if mod == 3 else rank_slices(SPEC, n, i).mlp for i in range(n)]
        parts = [groups[i].shrink_parts(x[:, cut[i]].contiguous(), ranks[i][0][layer], steps[i], (mod,), column=False)
                 for i in range(n)]
        reduced = torch.stack(parts).nan_to_num().sum(0)  # rows no part writes hold garbage, never read
        got = torch.zeros(rows, SPEC.hidden)  # the base partial sums' all-reduce adds the disjoint slices
        for i in range(n):
            groups[i].expand_parts(got, reduced, ranks[i][0][layer], steps[i], (mod,), (groups[i].hidden_offset,),
                                   (groups[i].hidden_width,), column=False)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_joined_rows_are_dense_in_global_order():
    n, rows, k, local = 2, 3, 2, 1
    gathered = torch.arange(n * rows * k * local, dtype=torch.float32).view(n * rows, k, local)
    joined = join_rank_rows(gathered, n)
    assert joined.is_contiguous() and joined.shape == (rows, k, local * n)
    for i in range(n):  # rank i's local row j is global row j*n + i
        assert torch.equal(joined[:, :, i::n], gathered.view(n, rows, k, local)[i])


def test_shard_layout_is_the_single_gpu_layout_for_one_rank():
    for rank, targets in ADAPTERS:
        ranks = [rank if m in targets else 0 for m in MODULES]
        lay = shard_layout(SPEC, 1, ranks)
        assert (list(lay.a_offsets), list(lay.b_offsets), lay.n_pages) == tuple(page_layout(SPEC, ranks))


def test_every_rank_holds_the_same_number_of_pages():
    for rank, targets in ADAPTERS:
        full = _full_adapter("x", rank, targets, seed=rank)
        for n in (2, 3):
            sizes = {shard_adapter(full, SPEC, n, i).n_pages for i in range(n)}
            assert len(sizes) == 1  # one set of page ids serves every rank


def test_sizes_that_do_not_divide_the_model_are_refused():
    with pytest.raises(ValueError, match="key/value heads"):
        check_tp(SPEC, 4)  # 12 heads split, 6 KV heads do not
    with pytest.raises(ValueError, match="MLP size"):
        check_tp(ModelSpec(**{**SPEC.__dict__, "intermediate": 121}), 2)
    check_tp(SPEC, 6)


def test_step_inputs_survive_packing():
    lora = LoraBatch(seg_starts=torch.tensor([0, 1, 3], dtype=torch.int32),
                     seg_adapter=torch.tensor([-1, 0], dtype=torch.int32),
                     ranks=torch.tensor([[3], [0], [0], [5], [0], [0], [1]], dtype=torch.int32),
                     scales=torch.tensor([[0.5], [0], [0], [1.25], [0], [0], [3.0]]),
                     a_starts=torch.arange(7, dtype=torch.int32).view(7, 1),
                     b_starts=torch.arange(7, 14, dtype=torch.int32).view(7, 1),
                     page_ids=torch.tensor([9, 4, 7], dtype=torch.int32), max_rank=5, max_seg_len=2)
    from slora_backend.model_runner import StepInputs

    inp = StepInputs(prefill=False, input_ids=torch.tensor([5, 6, 7]), positions=torch.tensor([3, 1, 0]),
                     k_pages=torch.tensor([10, 12, 14], dtype=torch.int32),
                     v_pages=torch.tensor([11, 13, 15], dtype=torch.int32), last_rows=torch.tensor([0, 1, 2]),
                     seq_bounds=[0, 1, 2, 3], kv_table=torch.arange(24, dtype=torch.int32).view(3, 4, 2),
                     seq_lens=torch.tensor([4, 2, 1], dtype=torch.int32), lora=lora)
    header, payload = pack_step(inp)
    out = unpack_step(header, payload.clone())
    for field in ("input_ids", "positions", "k_pages", "v_pages", "last_rows", "kv_table", "seq_lens"):
        assert torch.equal(getattr(out, field), getattr(inp, field)), field
    for field in ("seg_starts", "seg_adapter", "ranks", "scales", "a_starts", "b_starts", "page_ids"):
        assert torch.equal(getattr(out.lora, field), getattr(lora, field)), field
    assert (out.lora.max_rank, out.lora.max_seg_len, out.prefill) == (5, 2, False)
    assert_parts_aligned(out)


def assert_parts_aligned(inp) -> None:
    """Every tensor the worker's kernels read starts on a 16-byte boundary, whatever the parts'
    sizes: Triton compiles aligned and unaligned pointers as different kernel variants, so
    misaligned views would compile new variants on the worker while serving."""
    tensors = {f: getattr(inp, f) for f in ("input_ids", "positions", "k_pages", "v_pages", "last_rows",
                                             "kv_table", "seq_lens")}
    if inp.lora is not None:
        tensors |= {f"lora.{f}": getattr(inp.lora, f) for f in ("seg_starts", "seg_adapter", "ranks", "scales",
                                                               "a_starts", "b_starts", "page_ids")}
        if inp.lora.decode is not None:
            tensors |= {f"lora.decode.{f}": getattr(inp.lora.decode, f) for f in ("seg_starts", "seg_adapter")}
    misaligned = [name for name, t in tensors.items() if t is not None and t.data_ptr() % 16]
    assert not misaligned, misaligned


def test_mixed_step_inputs_survive_packing():
    """A prefill step carrying decode rows: 3 prompt rows of one request, then 2 decode rows."""
    from slora_backend.model_runner import StepInputs

    inp = StepInputs(prefill=True, input_ids=torch.tensor([5, 6, 7, 8, 9]), positions=torch.tensor([0, 1, 2, 6, 3]),
                     k_pages=torch.tensor([10, 12, 14, 16, 18], dtype=torch.int32),
                     v_pages=torch.tensor([11, 13, 15, 17, 19], dtype=torch.int32), last_rows=torch.tensor([2, 3, 4]),
                     seq_bounds=[0, 3], kv_table=torch.arange(28, dtype=torch.int32).view(2, 7, 2),
                     seq_lens=torch.tensor([7, 4], dtype=torch.int32), lora=None)
    out = unpack_step(*pack_step(inp))
    for field in ("input_ids", "positions", "k_pages", "v_pages", "last_rows", "kv_table", "seq_lens"):
        assert torch.equal(getattr(out, field), getattr(inp, field)), field
    assert out.prefill and out.seq_bounds == [0, 3] and out.lora is None
    assert_parts_aligned(out)


def test_mixed_step_lora_decode_part_survives_packing():
    """A mixed step whose decode rows run their LoRA on MBGMV (LoraBatch.decode): the workers
    rebuild the same decode part, sharing the step's adapter tables."""
    from slora_backend.model_runner import StepInputs

    lora = LoraBatch(seg_starts=torch.tensor([0, 3], dtype=torch.int32),
                     seg_adapter=torch.tensor([0], dtype=torch.int32),
                     ranks=torch.tensor([[3, 8]] * 7, dtype=torch.int32), scales=torch.full((7, 2), 0.5),
                     a_starts=torch.zeros(7, 2, dtype=torch.int32), b_starts=torch.ones(7, 2, dtype=torch.int32),
                     page_ids=torch.tensor([9, 4, 7], dtype=torch.int32), max_rank=3, max_seg_len=5)
    _with_decode_part(lora, [1, -1, 0], rank=8)
    inp = StepInputs(prefill=True, input_ids=torch.arange(6), positions=torch.tensor([0, 1, 2, 6, 3, 9]),
                     k_pages=torch.arange(6, dtype=torch.int32), v_pages=torch.arange(6, 12, dtype=torch.int32),
                     last_rows=torch.tensor([2, 3, 4, 5]), seq_bounds=[0, 3],
                     kv_table=torch.arange(60, dtype=torch.int32).view(3, 10, 2),
                     seq_lens=torch.tensor([7, 4, 10], dtype=torch.int32), lora=lora)
    out = unpack_step(*pack_step(inp)).lora
    assert out.decode is not None and out.decode_start == 3 and out.decode.decode is None
    for field in ("seg_starts", "seg_adapter"):
        assert torch.equal(getattr(out.decode, field), getattr(lora.decode, field)), field
    assert (out.decode.max_rank, out.decode.max_seg_len, out.decode.eager_decode) == (8, 1, True)
    assert out.decode.ranks is out.ranks and out.decode.page_ids is out.page_ids  # shared tables
    assert (out.max_rank, out.max_seg_len, out.eager_decode) == (3, 5, False)
    assert_parts_aligned(unpack_step(*pack_step(inp)))


# -- the engine with 2 processes ------------------------------------------------------------------
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    model = build_tiny_model(root / "model")  # 4 heads, 2 KV heads: splits over 2 ranks
    for i, (name, kw) in enumerate(PARITY_ADAPTERS.items()):
        build_adapter(model, root / "adapters" / name, seed=100 + i, **kw)
    rng = random.Random(11)
    prompts = [[rng.randrange(1, 380) for _ in range(n)] for n in (1, 5, 9, 17, 3, 12, 7)]
    names = [None, *PARITY_ADAPTERS, None]
    jobs = [dict(prompt_ids=prompts[i], adapter=name, params=greedy(NEW_TOKENS)) for i, name in enumerate(names)]
    single = Engine(EngineConfig(model_dir=str(model), adapter_dir=str(root / "adapters"), pool_pages=3000))
    try:
        want = [tokens_of(outs) for outs in run_batch(single, jobs)]
    finally:
        single.shutdown()
    return model, root / "adapters", jobs, want


def _tp_engine(model, adapters, **kw) -> Engine:
    return Engine(EngineConfig(model_dir=str(model), adapter_dir=str(adapters), pool_pages=3000,
                               tensor_parallel_size=2, **kw))


@pytest.mark.parametrize("static_decode", [False, True], ids=["eager", "graph-buffers"])
def test_two_processes_give_the_tokens_of_one(setup, static_decode, monkeypatch):
    model, adapters, jobs, want = setup
    if static_decode:  # the CUDA-graph decode path's static buffers, run eagerly on every rank
        monkeypatch.setenv("SLORA_TP_STATIC_DECODE", "1")
    engine = _tp_engine(model, adapters)
    try:
        results = run_batch(engine, jobs, timeout=120)
        for i, outs in enumerate(results):
            assert outs[-1].error is None, outs[-1].error
            assert tokens_of(outs) == want[i], f"request {i} adapter {jobs[i]['adapter']}"
        assert engine.steps < len(jobs) * NEW_TOKENS  # adapters and base requests shared steps
        assert (engine.runner.tp_graphs is not None) == static_decode
        if static_decode:  # its buffers hold per-adapter tables: the kernels must not read them per row
            assert not engine.runner.tp_graphs._inputs(1, 8, 1).lora.rows_are_adapters
        assert engine.pool_tensor.shape[-1] * 2 == engine.spec.page_width  # rank 0 holds half of each page
    finally:
        engine.shutdown()
    assert all(not p.is_alive() for p in engine.tp.procs)


@pytest.mark.parametrize("decode_part", [False, True], ids=["one-table", "decode-rows-gmv"])
def test_two_processes_mix_decode_rows_into_prefill_steps(setup, decode_part):
    """Requests arriving while others decode: the workers get prefill steps carrying decode
    rows (mixed packing, both attention paths, sharded LoRA over all rows); same tokens. With
    decode_part the decode rows' LoRA is a part of its own (LoraBatch.decode) sharing the
    prompt rows' intermediate and collective (tensor_parallel.TPLoraStep)."""
    model, adapters, jobs, want = setup
    engine = _tp_engine(model, adapters, lora_decode_gmv_min_segments=1, tp_lora_decode_rows_gmv=decode_part,
                        admit_gather_steps=0)  # the late requests meet decoding ones, whatever the timing
    try:
        results = run_staggered(engine, jobs[:3], jobs[3:], timeout=120)
        for i, outs in enumerate(results):
            assert outs[-1].error is None, outs[-1].error
            assert tokens_of(outs) == want[i], f"request {i} adapter {jobs[i]['adapter']}"
        assert engine.stats()["mixed_steps"] > 0
        assert (engine.runner.decode_part_steps > 0) == decode_part
    finally:
        engine.shutdown()


def test_two_processes_match_hf_peft(setup):
    """Independent of the one-process engine: the oracle of the parity tests."""
    model, adapters, jobs, _ = setup
    engine = _tp_engine(model, adapters)
    try:
        job = jobs[2]  # rank 12, rsLoRA, all seven modules
        outs = run_batch(engine, [job], timeout=120)[0]
        assert tokens_of(outs) == hf_peft_greedy(model, adapters / job["adapter"], job["prompt_ids"], NEW_TOKENS)
    finally:
        engine.shutdown()


def test_a_replaced_adapter_is_replaced_on_every_rank(setup, tmp_path):
    """Unload, new weights under the same name, load: workers must not keep the old shard."""
    import shutil

    model, adapters, jobs, _ = setup
    local = tmp_path / "adapters"
    shutil.copytree(adapters, local)
    engine = _tp_engine(model, local)
    try:
        job = dict(jobs[4])  # r5-ko
        before = tokens_of(run_batch(engine, [job], timeout=120)[0])
        engine.unload_adapter("r5-ko")
        shutil.rmtree(local / "r5-ko")
        build_adapter(model, local / "r5-ko", rank=5, targets=["k_proj", "o_proj", "down_proj"], alpha=10, seed=999)
        engine.load_adapter("r5-ko")
        after = tokens_of(run_batch(engine, [job], timeout=120)[0])
        assert after == hf_peft_greedy(model, local / "r5-ko", job["prompt_ids"], NEW_TOKENS)
        assert after != before
    finally:
        engine.shutdown()


def test_an_uploaded_adapter_is_served_by_every_rank(setup, tmp_path):
    """Uploads are persisted under the adapter directory first: workers read their shard there."""
    import shutil

    model, adapters, jobs, _ = setup
    local = tmp_path / "adapters"
    shutil.copytree(adapters, local)
    made = build_adapter(model, tmp_path / "made", rank=3, targets=["q_proj", "up_proj", "down_proj"], alpha=6,
                         seed=77)
    engine = _tp_engine(model, local)
    try:
        engine.upload_adapter("sent", (made / "adapter_config.json").read_bytes(),
                              (made / "adapter_model.safetensors").read_bytes())
        job = dict(jobs[3], adapter="sent")
        got = tokens_of(run_batch(engine, [job], timeout=120)[0])
        assert got == hf_peft_greedy(model, made, job["prompt_ids"], NEW_TOKENS)
    finally:
        engine.shutdown()


def test_a_dead_worker_fails_requests_and_stops_the_engine(setup):
    model, adapters, jobs, _ = setup
    engine = _tp_engine(model, adapters)
    try:
        out: queue.SimpleQueue = queue.SimpleQueue()
        engine.submit(prompt_ids=jobs[1]["prompt_ids"], adapter="r1-qv",
                      params=SamplingParams(max_tokens=200, ignore_eos=True), on_output=out.put)
        first = out.get(timeout=60)
        assert first.error is None
        os.kill(engine.tp.procs[0].pid, signal.SIGKILL)
        t0 = time.monotonic()
        last = first
        while not last.finished:
            last = out.get(timeout=60)  # never hangs: the request ends
        assert last.error is not None and "worker 1" in last.error, last.error
        assert time.monotonic() - t0 < 30
        deadline = time.monotonic() + 10
        while engine.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.is_alive()
        with pytest.raises(Exception, match="not running"):
            engine.submit(prompt_ids=[1, 2], params=greedy(2), on_output=out.put)
    finally:
        engine.shutdown()


# -- under tritonserver ---------------------------------------------------------------------------
def test_triton_serves_with_two_processes(setup, tmp_path):
    """The Triton model with tensor_parallel_size 2 (one KIND_MODEL instance whose engine spawns
    the worker): same tokens as one process; after the worker is killed requests get errors."""
    pytest.importorskip("tritonclient")
    import json

    import requests
    from server_utils import SOURCE_MODEL, TritonServer, set_parameters, write_model_repository

    model, adapters, jobs, want = setup
    text = (SOURCE_MODEL / "config.pbtxt").read_text()
    assert "kind: KIND_MODEL" in text  # the checked-in configuration, unchanged but for parameters
    text = set_parameters(text, {"model_dir": str(model), "adapter_dir": str(adapters), "dtype": "float32",
                                 "pool_pages": "3000", "tensor_parallel_size": "2"})
    repo = write_model_repository(tmp_path / "repo", config_text=text)

    def generate(job) -> dict:
        body = {"input_ids": job["prompt_ids"], "max_tokens": NEW_TOKENS, "ignore_eos": True, "stream": False}
        if job["adapter"]:
            body["adapter_id"] = job["adapter"]
        with requests.Session() as s:
            s.trust_env = False
            r = s.post(f"http://{srv.http_url}/v2/models/slora/generate", json=body, timeout=60)
        return json.loads(r.text)

    with TritonServer(repo, tmp_path / "tritonserver.log") as srv:
        for i in (0, 2, 4):  # base, all seven modules (rsLoRA), rank 5 on k/o
            got = generate(jobs[i])
            ids = got.get("token_ids")
            assert (ids if isinstance(ids, list) else [ids]) == want[i], (i, got, srv.log_tail())
        workers = [line for line in srv.log_tail(200_000).splitlines() if "tensor parallel: 2 ranks" in line]
        assert workers, srv.log_tail()
        pid = int(workers[-1].rsplit("[", 1)[1].strip("]").split(",")[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # the engine notices within moments; a request then fails fast, never hangs
            got = generate(jobs[2])
            if "error" in got or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "error" in got and ("not running" in got["error"] or "worker 1" in got["error"]), got


def test_four_processes_give_the_tokens_of_one(tmp_path):
    """Any N dividing the head counts: 4 ranks over 8 heads / 4 KV heads (one KV head each),
    the parity adapters' ranks 1..64 split 4 ways (ceil(r/4) shrink rows, padded), base and
    adapter requests in one batch, arriving while others decode."""
    model = build_tiny_model(tmp_path / "model", heads=8, kv_heads=4, seed=3)
    for i, (name, kw) in enumerate(PARITY_ADAPTERS.items()):
        build_adapter(model, tmp_path / "adapters" / name, seed=200 + i, **kw)
    rng = random.Random(12)
    names = [None, *PARITY_ADAPTERS]
    jobs = [dict(prompt_ids=[rng.randrange(1, 380) for _ in range(n)], adapter=name, params=greedy(NEW_TOKENS))
            for n, name in zip((4, 11, 2, 7, 15, 6), names, strict=True)]
    config = dict(model_dir=str(model), adapter_dir=str(tmp_path / "adapters"), pool_pages=3000)
    single = Engine(EngineConfig(**config))
    try:
        want = [tokens_of(outs) for outs in run_batch(single, jobs)]
    finally:
        single.shutdown()
    engine = Engine(EngineConfig(**config, tensor_parallel_size=4))
    try:
        assert engine.pool_tensor.shape[-1] * 4 == engine.spec.page_width
        results = run_staggered(engine, jobs[:2], jobs[2:], timeout=180)
        for i, outs in enumerate(results):
            assert outs[-1].error is None, outs[-1].error
            assert tokens_of(outs) == want[i], f"request {i} adapter {jobs[i]['adapter']}"
    finally:
        engine.shutdown()
    assert len(engine.tp.procs) == 3 and all(not p.is_alive() for p in engine.tp.procs)
