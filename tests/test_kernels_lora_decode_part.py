"""Mixed steps' decode part (LoraBatch.decode): prompt rows on MBGMM, decode rows on MBGMV.

The split batch is built by the production code (adapter_cache.device_lora_batch) from the
same tables as the combined one; lora_apply over it (Triton, interpreted on CPU, and the torch
twin) must equal the float64 reference and the combined (all-MBGMM) path.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_kernels_lora import DEVICE, TORCH, TRITON, make_case, reference

from kernels.lora import GMV_MAX_SEG_LEN, lora_parts, step_config
from kernels.lora_batch import ALL_MODULES, rank_buckets
from slora_backend.adapter_cache import LoraTables, device_lora_batch

QKV = dict(module_ids=(0, 1, 2), out_widths=(64, 40, 24))


def split_case(rng, *, prompts, decodes, **case):
    """make_case over `prompts` ([(rows, adapter)]) then one row per entry of `decodes`
    (adapter or -1), as (x, y0, pool, combined batch, split batch, weights)."""
    segments = prompts + [(1, a) for a in decodes]
    x, y0, pool, batch, weights = make_case(rng, segments=segments, **case)
    # An eager step's combined batch: every segment on MBGMM (eager_segments' bound).
    combined = replace(batch, max_seg_len=max(batch.max_seg_len, GMV_MAX_SEG_LEN + 1))
    ints = np.stack([t.cpu().numpy() for t in (batch.ranks, batch.a_starts, batch.b_starts)]).astype(np.int32)
    tables = LoraTables(names=[str(a) for a in range(ints.shape[2])], seg_adapter=batch.seg_adapter.tolist(),
                        ints=ints, scales=batch.scales.cpu().numpy(), page_id_parts=[batch.page_ids],
                        total_pages=batch.page_ids.shape[0], max_rank=batch.max_rank, modules=ALL_MODULES)
    prompt_starts = batch.seg_starts.tolist()[: len(prompts) + 1]
    longest = max((n for n, _ in prompts), default=0)
    split = device_lora_batch(tables, prompt_starts, max(longest, GMV_MAX_SEG_LEN + 1), torch.device(DEVICE),
                              rank_buckets(64))
    return x, y0, pool, combined, split, weights


def check_split(case, prompts, decodes, seed, atol=1e-4, rtol=1e-4):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    x, y0, pool, combined, split, weights = split_case(rng, prompts=prompts, decodes=decodes, **case)
    module_ids, out_widths = case["module_ids"], case["out_widths"]
    offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(out_widths)[:-1]]))
    expected = reference(x, y0, combined, weights, module_ids, out_widths)
    base = torch.tensor([a < 0 for n, a in prompts for _ in range(n)] + [a < 0 for a in decodes])
    outputs = {}
    for name, ops, batch in (("split", TRITON, split), ("split-torch", TORCH, split), ("combined", TRITON, combined)):
        y = y0.clone()
        ops.lora_apply(x, y, pool, batch, tuple(module_ids), offsets)
        got = y.double().cpu()
        assert torch.equal(got[base], y0.double().cpu()[base]), f"{name}: base rows changed"
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")
        outputs[name] = got
    torch.testing.assert_close(outputs["split"], outputs["combined"], atol=atol, rtol=rtol)
    return split


def test_decode_part_layout():
    """What device_lora_batch builds: decode rows after the prompt rows, one segment each, the
    rank bucket of the decode adapters; the prompt part's own max rank; one copy, 16-byte
    aligned tables."""
    rng = np.random.default_rng(0)
    case = dict(page_width=32, in_width=48, dtype=torch.float32, **QKV,
                ranks={0: [33, 33, 33], 1: [5, 0, 5], 2: [1, 1, 1]})
    *_, split, _ = split_case(rng, prompts=[(7, 1), (6, -1)], decodes=[2, -1, 1, 2], **case)
    assert split.decode_start == 13 and split.max_rank == 5 and split.max_seg_len == 7
    assert split.seg_starts.tolist() == [0, 7, 13] and split.seg_adapter.tolist() == [1, -1]
    dec = split.decode
    assert dec.seg_starts.tolist() == [0, 1, 2, 3, 4] and dec.seg_adapter.tolist() == [2, -1, 1, 2]
    assert (dec.max_rank, dec.max_seg_len, dec.eager_decode, dec.decode) == (8, 1, True, None)
    assert dec.ranks is split.ranks and dec.page_ids is split.page_ids  # shared adapter tables
    tables = (split.seg_starts, split.seg_adapter, split.ranks, split.scales, split.a_starts, split.b_starts,
              dec.seg_starts, dec.seg_adapter)
    assert len({t.untyped_storage().data_ptr() for t in tables}) == 1, "one host-to-device copy"
    for t in (split.seg_starts, split.seg_adapter, split.ranks, split.scales, dec.seg_starts, dec.seg_adapter):
        assert t.data_ptr() % 16 == 0
    x = torch.empty(17, 48)
    parts = lora_parts(x, x, split)
    assert [(p[0].shape[0], p[2].eager_decode) for p in parts] == [(13, False), (4, True)]
    assert step_config(split, 3, 32, 48, torch.float32, x.device).use_dot
    assert not step_config(dec, 3, 32, 48, torch.float32, x.device).use_dot


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prompts_and_decode_rows(dtype):
    # Rank 1 and odd ranks, a module an adapter does not target, base rows among decode rows,
    # decode rows on the prompts' adapters and on adapters only they use.
    case = dict(page_width=32, in_width=80, dtype=dtype, **QKV,
                ranks={0: [12, 12, 12], 1: [1, 0, 0], 2: [1, 0, 64], 3: [7, 3, 5]})
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=1e-2)
    check_split(case, [(20, 0), (5, -1), (17, 1)], [2, -1, 0, 3, 3, -1, 1, 2], seed=0, **tol)


def test_single_decode_row():
    case = dict(page_width=32, in_width=64, dtype=torch.float32, module_ids=(3,), out_widths=(64,),
                ranks={0: [17], 1: [3]})
    check_split(case, [(9, 0)], [1], seed=1)


def test_base_prompts_with_decode_rows():
    # No prompt row has an adapter: only the decode part launches.
    case = dict(page_width=32, in_width=64, dtype=torch.float32, module_ids=(4, 5), out_widths=(48, 48),
                ranks={0: [5, 9], 1: [16, 0]})
    split = check_split(case, [(6, -1), (11, -1)], [0, -1, 1, 0], seed=2)
    assert split.max_rank == 0 and split.decode.max_rank == 16


def test_decode_rows_on_base_only_after_adapter_prompts():
    # The decode part has rows but no adapter: only the prompt part launches.
    case = dict(page_width=32, in_width=64, dtype=torch.float32, module_ids=(6,), out_widths=(40,),
                ranks={0: [8]})
    split = check_split(case, [(12, 0)], [-1, -1], seed=3)
    assert split.decode.max_rank == 0


@pytest.mark.parametrize("seed", range(20, 26))
def test_random_mixed_steps(seed):
    rng = np.random.default_rng(seed)
    page_width = int(rng.choice([16, 24, 32, 48]))  # 24: blocks straddle pages
    n_mod = int(rng.integers(1, 4))
    n_adapters = int(rng.integers(1, 6))
    ranks = {a: [int(rng.choice([0, 1, 3, 8, 12, 33, 64])) for _ in range(n_mod)] for a in range(n_adapters)}
    ranks[0][0] = max(ranks[0][0], 1)
    prompts = [(int(rng.integers(1, 40)), int(rng.integers(-1, n_adapters))) for _ in range(int(rng.integers(1, 4)))]
    decodes = [int(rng.integers(-1, n_adapters)) for _ in range(int(rng.integers(1, 12)))]
    case = dict(page_width=page_width, in_width=int(rng.integers(8, 100)), dtype=torch.float32,
                module_ids=tuple(sorted(rng.choice(7, n_mod, replace=False).tolist())),
                out_widths=tuple(int(w) for w in rng.integers(8, 100, n_mod)), ranks=ranks)
    check_split(case, prompts, decodes, seed=seed)


def test_adapter_runs_count_the_segments_decode_rows_form():
    """The engine splits a mixed step's decode rows off only when they form many adapter
    segments (EngineConfig.lora_decode_gmv_min_segments): runs of one adapter, base rows none."""
    from slora_backend.model_runner import adapter_runs, eager_segments

    assert adapter_runs([]) == 0
    assert adapter_runs([None, None]) == 0
    assert adapter_runs(["a", "a", "a"]) == 1
    assert adapter_runs(["a", None, "a", "b", "b", None, "c"]) == 4
    rng = np.random.default_rng(3)
    for _ in range(50):
        names = [None if v == 0 else f"a{v}" for v in rng.integers(0, 4, size=int(rng.integers(1, 20)))]
        _, seg_names, _ = eager_segments(names, list(range(len(names) + 1)))
        assert adapter_runs(names) == sum(n is not None for n in seg_names)
