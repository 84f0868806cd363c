"""No Triton compile in the middle of serving: every LoRA and decode-attention launch an eager
(prefill, or prefill with decode rows) step makes has a compile key that the start-up warm-up
already compiled.

Keys come from Triton's own argument binder for an H100/H200 target (kernels/launch.py), so
this runs on CPU. Steps are drawn at random like S-LoRA's workload (mixed ranks, base rows,
prompts of 1 to 600 tokens, many adapters per step, up to 300 decode rows beside them), at
Llama-7B shapes in bf16, with the tables built by the production code (eager_segments,
device_lora_batch) and the launches made as lora_apply makes them (lora_parts, launch_config
with an H200's SM count).
"""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from kernels.launch import KernelCall, cache_key
from kernels.lora import _group_table, launch_config, lora_calls, lora_parts
from kernels.paged_attention import attention_calls
from slora_backend.adapter_cache import LoraTables, device_lora_batch
from slora_backend.cuda_graphs import rank_buckets
from slora_backend.dummy import dummy_spec
from slora_backend.model_runner import eager_segments, eager_warmup_steps, lora_groups, warmup_inputs

SPEC = dummy_spec("dummy:llama-7b")
PAGE = SPEC.page_width
DTYPE = torch.bfloat16
MAX_RANK = 64
# The model's LoRA points: (modules, input width, column offsets, output width).
GROUPS = [
    ((0, 1, 2), SPEC.hidden, (0, SPEC.q_width, SPEC.q_width + SPEC.kv_width), SPEC.q_width + 2 * SPEC.kv_width),
    ((3,), SPEC.q_width, (0,), SPEC.hidden),
    ((4, 5), SPEC.hidden, (0, SPEC.intermediate), 2 * SPEC.intermediate),
    ((6,), SPEC.intermediate, (0,), SPEC.hidden),
]


SMS = 132  # an H100 SXM / H200: the attention split count and the LoRA K splits depend on it
MAX_DECODE = 300  # decode rows of a mixed step (running requests): max_batch_size


def step_calls(batch, rows: int, split_k: int | None = None) -> list[KernelCall]:
    """The launches of one eager step at every LoRA point, as lora_apply makes them on a GPU of
    SMS SMs (lora_parts, launch_config); split_k forces the K split of the MBGMM part."""
    calls = []
    for modules, in_width, offsets, out_width in GROUPS:
        x = torch.empty(rows, in_width, dtype=DTYPE)
        y = torch.empty(rows, out_width, dtype=DTYPE)
        bounds = (*offsets[1:], out_width)
        widths = [b - a for a, b in zip(offsets, bounds, strict=True)]
        group = _group_table(modules, offsets, widths, x.device)
        for part_x, part_y, part in lora_parts(x, y, batch):
            cfg = launch_config(part.seg_adapter.shape[0], part.max_seg_len, part.max_rank, len(modules), PAGE,
                                in_width, DTYPE, SMS, part.eager_decode)
            if split_k and cfg.use_dot:
                cfg = cfg.with_split_k(in_width, split_k)
            calls += lora_calls(part_x, part_y, torch.empty(8, PAGE, dtype=DTYPE), part, group, max(widths), cfg)
    return calls


def random_prompts(rng: random.Random, n_adapters: int) -> tuple[list, list[int]]:
    """(adapter per request, row bounds) of 1-16 prompts of 1-600 tokens, adapters drawn from
    n_adapters, some base, neighbours on one adapter sorted together."""
    n_req = rng.randint(1, 16)
    names = sorted((rng.choice([None] + [f"a{i}" for i in range(n_adapters)]) for _ in range(n_req)),
                   key=lambda n: (n is not None, n or ""))
    lengths = [rng.choice((1, 2, 3, 5, 16, 17, 33)) if rng.random() < 0.3 else rng.randint(8, 600)
               for _ in names]
    return names, np.cumsum([0, *lengths]).tolist()


def random_tables(rng: random.Random, seg_names: list) -> LoraTables:
    """Step tables (as AdapterCache.lora_tables makes them) of adapters with S2 ranks on q,k,v,o."""
    distinct = [n for n in dict.fromkeys(seg_names) if n is not None]
    ranks = {n: rng.choice((8, 16, 32, 64)) for n in distinct}
    ints = np.zeros((3, 7, len(distinct)), dtype=np.int32)
    parts, total = [], 0
    for a, name in enumerate(distinct):
        ints[0, :4, a] = ranks[name]  # q, k, v, o as in S-LoRA's workloads
        ints[1, :4, a] = total + np.arange(4) * 2 * ranks[name]
        ints[2, :4, a] = ints[1, :4, a] + ranks[name]
        parts.append(torch.arange(total, total + 8 * ranks[name], dtype=torch.int32))
        total += 8 * ranks[name]
    return LoraTables(names=distinct, seg_adapter=[-1 if n is None else distinct.index(n) for n in seg_names],
                      ints=ints, scales=np.ones((7, len(distinct)), dtype=np.float32), page_id_parts=parts,
                      total_pages=total, max_rank=max(ranks.values()), modules=0b1111)


def random_step(rng: random.Random, n_adapters: int):
    """(LoraBatch, rows) of a prefill step (random_prompts, at least one adapter)."""
    names, bounds = random_prompts(rng, n_adapters)
    if all(n is None for n in names):
        names[-1] = "a0"
    seg_starts, seg_names, max_seg_len = eager_segments(names, bounds)
    return device_lora_batch(random_tables(rng, seg_names), seg_starts, max_seg_len, torch.device("cpu")), bounds[-1]


def random_mixed_step(rng: random.Random, n_adapters: int):
    """(LoraBatch with a decode part, rows) of a mixed step, built as ModelRunner._lora_tables
    builds it: random_prompts, then 1-MAX_DECODE decode rows on adapters of the same set (some
    base, at least one not)."""
    names, bounds = random_prompts(rng, n_adapters)
    n_dec = rng.choice((1, 2, 3)) if rng.random() < 0.2 else rng.randint(1, MAX_DECODE)
    decode_names = [rng.choice([None] + [f"a{i}" for i in range(n_adapters)]) for _ in range(n_dec)]
    if all(n is None for n in decode_names):
        decode_names[-1] = "a0"
    seg_starts, seg_names, max_seg_len = eager_segments(names, bounds)
    tables = random_tables(rng, [*seg_names, *decode_names])
    batch = device_lora_batch(tables, seg_starts, max_seg_len, torch.device("cpu"), rank_buckets(MAX_RANK))
    return batch, bounds[-1] + n_dec


def decode_attention_keys(rows: int, kv_table: torch.Tensor) -> set:
    """Keys of the decode attention of `kv_table`'s rows sitting after `rows` prefill rows, with
    q a view of the step's qkv as in ModelRunner.run_layers."""
    n = kv_table.shape[0]
    qkv = torch.empty(rows + n, SPEC.q_width + 2 * SPEC.kv_width, dtype=DTYPE)
    q = qkv[:, : SPEC.q_width].view(rows + n, SPEC.heads, SPEC.head_dim)[rows:]
    calls = attention_calls(q, torch.empty(8, PAGE, dtype=DTYPE), kv_table, torch.ones(n, dtype=torch.int32),
                            0.1, SMS)
    return {cache_key(c) for c in calls}


def warm_up_keys(steps: list[dict], eager_decode: bool = True) -> set:
    """Keys of the launches the warm-up steps make (ModelRunner.warm_up_eager, one GPU of SMS
    SMs); eager_decode=False: the decode parts on the graph (specialised) MBGMV kernels."""
    keys = set()
    for kw in steps:
        inp = warmup_inputs(SPEC, PAGE, torch.device("cpu"), **kw)
        rows = inp.input_ids.shape[0]
        if inp.lora is not None:
            if inp.lora.decode is not None and not eager_decode:
                inp.lora.decode = replace(inp.lora.decode, eager_decode=False)
            for split_k in (1, 2, 4, 8):  # MBGMM: the split a GPU picks varies with the segments
                keys |= {cache_key(c) for c in step_calls(inp.lora, rows, split_k)}
        if inp.kv_table is not None:
            keys |= decode_attention_keys(kw["rows"], inp.kv_table)
    return keys


def test_warm_up_covers_the_model_lora_points():
    column_split = {0, 1, 2, 4, 5}  # q, k, v, gate, up (tensor_parallel.COLUMN_MODULES)
    assert lora_groups(SPEC) == [(len(modules), in_width, modules[0] in column_split)
                                 for modules, in_width, *_ in GROUPS]


@pytest.fixture(scope="module")
def warm_steps() -> list[dict]:
    return eager_warmup_steps(SPEC, PAGE, DTYPE, rank_buckets(MAX_RANK), MAX_DECODE, SMS)


@pytest.fixture(scope="module")
def warm_keys(warm_steps) -> set:
    return warm_up_keys(warm_steps)


def test_random_prefill_steps_need_no_compile_beyond_the_warm_up(warm_keys):
    rng = random.Random(11)
    seen = set()
    for _ in range(150):
        batch, rows = random_step(rng, n_adapters=rng.choice((1, 5, 100, 1000)))
        assert batch.max_seg_len > 4, "eager steps take the MBGMM kernels"
        for call in step_calls(batch, rows, split_k=rng.choice((1, 2, 4, 8))):
            key = cache_key(call)
            seen.add(key)
            assert key in warm_keys, f"{key[0]} would compile during serving: {key}"
    # Every kernel of the path showed up, in more than one shape class.
    assert {k[0] for k in seen} == {"_lora_shrink_kernel/unspecialised", "_lora_expand/unspecialised"}
    assert len(seen) > 4
    print(f"\n{len(seen)} distinct LoRA prefill variants over 150 random steps, "
          f"all among the {len(warm_keys)} compiled at start-up")


def test_decode_rows_in_eager_steps_need_no_attention_compile(warm_keys):
    """Decode rows riding in prefill steps (any count, any context length) use the attention
    variants the warm-up compiled: table widths padded to 8 tokens, power-of-two splits."""
    from slora_backend.model_runner import ModelRunner

    rng = random.Random(5)
    seen = set()
    for _ in range(200):
        n_dec, longest = rng.randint(1, 300), rng.randint(1, 2048)
        width = ModelRunner.decode_table_width(longest)
        keys = decode_attention_keys(rng.randint(1, 600), torch.zeros(n_dec, width, 2, dtype=torch.int32))
        seen |= keys
        assert keys <= warm_keys, f"{n_dec} rows of up to {longest} tokens would compile: {keys - warm_keys}"
    assert len({k for k in seen if k[0] == "_decode_attn_kernel"}) >= 3  # several split counts met


def test_specialised_kernels_would_compile_new_variants_per_step(warm_keys):
    """The check has teeth: with Triton's default specialisation (no jit_options), the same
    random steps need variants the warm-up never built (that was the state before)."""
    from triton.runtime.jit import JITFunction

    plain = {}

    def specialised(call: KernelCall) -> KernelCall:
        fn = call.kernel.fn
        if fn not in plain:
            plain[fn] = JITFunction(fn)
        return KernelCall(plain[fn], call.grid, call.args, call.kwargs)

    warm = set()
    for rank in rank_buckets(MAX_RANK):
        for rows in (16, 64):
            lora = warmup_inputs(SPEC, PAGE, torch.device("cpu"), rows, rank).lora
            warm |= {cache_key(specialised(c)) for c in step_calls(lora, rows, 1)}
    rng = random.Random(11)
    missing = set()
    for _ in range(60):
        batch, rows = random_step(rng, n_adapters=rng.choice((1, 5, 100, 1000)))
        missing |= {k for c in step_calls(batch, rows, 1) if (k := cache_key(specialised(c))) not in warm}
    assert len(missing) >= 5
    print(f"\nwithout jit_options: {len(missing)} variants outside the warm-up set over 60 random steps")


def test_warm_up_prefills_run_and_leave_the_pool_untouched(tmp_path):
    """The warm-up forwards run through the real model (Triton kernels in the interpreter)
    and write nothing: no KV page, no adapter page, pool bytes identical afterwards."""
    from tiny_model import build_tiny_model

    from slora_backend.config import EngineConfig
    from slora_backend.engine import Engine

    model = build_tiny_model(tmp_path / "model")
    engine = Engine(EngineConfig(model_dir=str(model), kernel_backend="triton", pool_pages=400))
    try:
        engine.pool_tensor.normal_()  # any content: it must come back bit for bit
        before = engine.pool_tensor.clone()
        free = engine.pool.free
        # On CPU (no K split) one step with MBGMV decode rows per rank bucket.
        assert engine.call_in_engine(lambda: engine.runner.warm_up_eager([8, 64], 16), timeout=300) == 4 + 5 + 2
        assert torch.equal(engine.pool_tensor, before)
        assert engine.pool.free == free
    finally:
        engine.shutdown()


def test_random_mixed_steps_need_no_compile_beyond_the_warm_up(warm_keys, warm_steps):
    """Prompts with up to 300 decode rows beside them, the decode rows on the MBGMV kernels
    (LoraBatch.decode): every key was compiled at start-up, in few warm-up steps."""
    rng = random.Random(3)
    seen = set()
    for _ in range(120):
        batch, rows = random_mixed_step(rng, n_adapters=rng.choice((1, 5, 100, 1000)))
        assert batch.decode is not None and batch.decode.max_rank in rank_buckets(MAX_RANK)
        for call in step_calls(batch, rows):
            key = cache_key(call)
            seen.add(key)
            assert key in warm_keys, f"{key[0]} would compile during serving: {key}"
    names = {k[0] for k in seen}
    assert {"_lora_shrink_gmv/unspecialised", "_lora_expand/unspecialised"} <= names
    assert "_lora_shrink_gmv" not in names and "_lora_expand" not in names  # the graph forms
    gmv = {k for k in seen if k[0] == "_lora_shrink_gmv/unspecialised"}
    assert len(gmv) > len(GROUPS)  # several K splits met
    decode_steps = [kw for kw in warm_steps if kw.get("decode_rank")]
    print(f"\n{len(gmv)} MBGMV shrink variants over 120 random mixed steps, all among the {len(warm_keys)} "
          f"compiled by {len(warm_steps)} warm-up steps ({len(decode_steps)} with MBGMV decode rows)")


def test_mixed_step_check_has_teeth(warm_steps):
    """Two ways the decode part would compile while serving, both caught by the same check:
    the graph (specialised) MBGMV kernels, whose ints (adapter count, tmp plane stride) change
    every step, and a warm-up with one decode row per rank bucket, missing the K splits a GPU
    picks for larger batches."""
    rng = random.Random(3)
    steps = [random_mixed_step(rng, n_adapters=rng.choice((1, 5, 100, 1000))) for _ in range(40)]

    def missing(warm: set, eager_decode: bool) -> set:
        out = set()
        for batch, rows in steps:
            if not eager_decode:
                batch = replace(batch, decode=replace(batch.decode, eager_decode=False))
            out |= {k for c in step_calls(batch, rows) if (k := cache_key(c)) not in warm}
        return out

    specialised = missing(warm_up_keys(warm_steps, eager_decode=False), eager_decode=False)
    assert len(specialised) >= 5 and all(k[0] in ("_lora_shrink_gmv", "_lora_expand") for k in specialised)
    one_row = [kw for kw in warm_steps if kw.get("decode_rows", 1) == 1]
    assert len(one_row) < len(warm_steps)
    too_few = missing(warm_up_keys(one_row), eager_decode=True)
    assert too_few and all(k[0] == "_lora_shrink_gmv/unspecialised" for k in too_few)
    print(f"\ngraph kernels on decode rows: {len(specialised)} variants outside the warm-up; "
          f"warm-up without the K splits: {len(too_few)}")


def test_host_arithmetic_equals_tritons():
    """kernels.launch.cdiv / next_pow2 (plain Python on the launch path) give exactly what
    triton.cdiv / triton.next_power_of_2 give, so grids and block shapes are unchanged."""
    import triton

    from kernels.launch import cdiv, next_pow2

    rng = random.Random(2)
    for n in [*range(0, 4100), *(rng.randint(0, 1 << 40) for _ in range(2000))]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
    for _ in range(5000):
        a, b = rng.randint(-(1 << 33), 1 << 33), rng.choice([1, 2, 3, 7, 16, 64, 128, 1664, rng.randint(1, 1 << 20)])
        assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
