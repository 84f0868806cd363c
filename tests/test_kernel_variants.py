"""No Triton compile in the middle of serving: every LoRA and decode-attention launch an eager
(prefill, or prefill with decode rows) step makes has a compile key that the start-up warm-up
already compiled.

Keys come from Triton's own argument binder for an H100/H200 target (kernels/launch.py), so
this runs on CPU. Steps are drawn at random like S-LoRA's workload (mixed ranks, base rows,
prompts of 1 to 600 tokens, many adapters per step), at Llama-7B shapes in bf16, with the
tables built by the production code (eager_segments, device_lora_batch).
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from kernels.launch import KernelCall, cache_key
from kernels.lora import _group_table, lora_calls, pick_config
from kernels.paged_attention import attention_calls
from slora_backend.adapter_cache import LoraTables, device_lora_batch
from slora_backend.cuda_graphs import rank_buckets
from slora_backend.dummy import dummy_spec
from slora_backend.model_runner import eager_segments, warmup_inputs

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


def step_calls(batch, rows: int, split_k: int) -> list[KernelCall]:
    """The launches of one eager step at every LoRA point (as lora_apply makes them), with the
    K split a GPU's pick_split_k could choose (1 on CPU)."""
    calls = []
    for modules, in_width, offsets, out_width in GROUPS:
        x = torch.empty(rows, in_width, dtype=DTYPE)
        y = torch.empty(rows, out_width, dtype=DTYPE)
        bounds = (*offsets[1:], out_width)
        widths = [b - a for a, b in zip(offsets, bounds, strict=True)]
        cfg = pick_config(batch.max_seg_len, batch.max_rank, PAGE, in_width, DTYPE).with_split_k(in_width, split_k)
        group = _group_table(modules, offsets, widths, x.device)
        calls += lora_calls(x, y, torch.empty(8, PAGE, dtype=DTYPE), batch, group, max(widths), cfg)
    return calls


def random_step(rng: random.Random, n_adapters: int):
    """(LoraBatch, rows) of a prefill step: 1-16 requests, prompts 1-600 tokens, adapters drawn
    from n_adapters with S2 ranks, some base rows, neighbours on one adapter sorted together."""
    n_req = rng.randint(1, 16)
    names = sorted((rng.choice([None] + [f"a{i}" for i in range(n_adapters)]) for _ in range(n_req)),
                   key=lambda n: (n is not None, n or ""))
    if all(n is None for n in names):
        names[-1] = "a0"
    lengths = [rng.choice((1, 2, 3, 5, 16, 17, 33)) if rng.random() < 0.3 else rng.randint(8, 600)
               for _ in names]
    bounds = np.cumsum([0, *lengths]).tolist()
    seg_starts, seg_names, max_seg_len = eager_segments(names, bounds)
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
    tables = LoraTables(names=distinct, seg_adapter=[-1 if n is None else distinct.index(n) for n in seg_names],
                        ints=ints, scales=np.ones((7, len(distinct)), dtype=np.float32), page_id_parts=parts,
                        total_pages=total, max_rank=max(ranks.values()), modules=0b1111)
    return device_lora_batch(tables, seg_starts, max_seg_len, torch.device("cpu")), bounds[-1]


SMS = 132  # an H100 SXM / H200: the attention split count depends on it


def decode_attention_keys(rows: int, kv_table: torch.Tensor) -> set:
    """Keys of the decode attention of `kv_table`'s rows sitting after `rows` prefill rows, with
    q a view of the step's qkv as in ModelRunner.run_layers."""
    n = kv_table.shape[0]
    qkv = torch.empty(rows + n, SPEC.q_width + 2 * SPEC.kv_width, dtype=DTYPE)
    q = qkv[:, : SPEC.q_width].view(rows + n, SPEC.heads, SPEC.head_dim)[rows:]
    calls = attention_calls(q, torch.empty(8, PAGE, dtype=DTYPE), kv_table, torch.ones(n, dtype=torch.int32),
                            0.1, SMS)
    return {cache_key(c) for c in calls}


@pytest.fixture(scope="module")
def warm_keys() -> set:
    """Keys of the launches ModelRunner.warm_up_eager makes (same shapes and steps, one GPU)."""
    keys = set()
    for rank in rank_buckets(MAX_RANK):
        for rows in (16, 64):
            lora = warmup_inputs(SPEC, PAGE, torch.device("cpu"), rows, rank).lora
            for split_k in (1, 2, 4, 8):
                keys |= {cache_key(c) for c in step_calls(lora, rows, split_k)}
    for split in (1, 2, 4, 8, 16):
        inp = warmup_inputs(SPEC, PAGE, torch.device("cpu"), 16, 0, decode_width=128 * split)
        keys |= decode_attention_keys(16, inp.kv_table)
    return keys


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
        assert engine._call_in_engine(lambda: engine.runner.warm_up_eager([8, 64]), timeout=300) == 4 + 5
        assert torch.equal(engine.pool_tensor, before)
        assert engine.pool.free == free
    finally:
        engine.shutdown()
