"""LoRA shrink/expand (Triton, interpreted on CPU) and torch_ops vs a naive float64 reference."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import triton

from kernels import LoraBatch, get_ops
from kernels.lora import (  # conftest.py has chosen the interpreter on CPU
    GMV_MAX_SEG_LEN,
    TUNED,
    _group_table,
    pick_config,
    run_lora,
    step_config,
)
from kernels.lora_fused import lora_fused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = get_ops("triton")
TORCH = get_ops("torch")


def _chunks(width, page_width):
    return -(-width // page_width)


def make_case(rng, *, page_width, in_width, module_ids, out_widths, segments, ranks, dtype):
    """Random adapters written into a NaN-poisoned pool through shuffled page ids.

    segments: [(n_rows, adapter)]; ranks: {adapter: [rank per module slot]}.
    Returns (x, y0, pool, batch, weights) with weights[(slot, a)] = (A, B) in float64,
    already rounded to the pool dtype.
    """
    n_adapters = max(ranks) + 1
    table = {name: np.zeros((7, n_adapters), np.int64) for name in ("r", "a", "b")}
    scales = np.zeros((7, n_adapters), np.float32)
    rows = []  # (page-table offset, dense row) to place later
    n_entries = 0
    weights = {}
    for a, slot_ranks in ranks.items():
        for slot, (m, out_w, r) in enumerate(zip(module_ids, out_widths, slot_ranks, strict=True)):
            if r == 0:
                continue
            A = rng.normal(0.0, 1.0 / np.sqrt(in_width), (r, in_width))
            B = rng.normal(0.0, 1.0, (out_w, r))
            table["r"][m, a] = r
            scales[m, a] = rng.uniform(0.5, 2.0)
            table["a"][m, a] = n_entries
            for j in range(r):
                rows.append((n_entries, A[j]))
                n_entries += _chunks(in_width, page_width)
            table["b"][m, a] = n_entries
            for j in range(r):
                rows.append((n_entries, B[:, j]))
                n_entries += _chunks(out_w, page_width)
            weights[(slot, a)] = (A, B)

    n_pages = n_entries + 5  # spare pages stay NaN: reading one would show
    page_ids = rng.permutation(n_pages)[:n_entries]
    pool = torch.full((n_pages, page_width), float("nan"), dtype=torch.float64)
    for entry, dense in rows:
        for c in range(_chunks(dense.size, page_width)):
            part = dense[c * page_width : (c + 1) * page_width]
            pool[page_ids[entry + c], : part.size] = torch.from_numpy(part)
    pool = pool.to(dtype)
    # Reference weights as the kernels see them (rounded to the pool dtype).
    for key, (A, B) in weights.items():
        weights[key] = (torch.tensor(A).to(dtype).double(), torch.tensor(B).to(dtype).double())

    seg_starts = np.concatenate([[0], np.cumsum([n for n, _ in segments])])
    n_rows = int(seg_starts[-1])
    x = torch.randn(n_rows, in_width, dtype=torch.float64).to(dtype)
    y0 = torch.randn(n_rows, sum(out_widths), dtype=torch.float64).to(dtype)

    def i32(v):
        return torch.tensor(np.asarray(v), dtype=torch.int32, device=DEVICE)

    batch = LoraBatch(
        seg_starts=i32(seg_starts),
        seg_adapter=i32([a for _, a in segments]),
        ranks=i32(table["r"]),
        scales=torch.tensor(scales, device=DEVICE),
        a_starts=i32(table["a"]),
        b_starts=i32(table["b"]),
        page_ids=i32(page_ids),
        max_rank=int(table["r"].max()),
        max_seg_len=max(n for n, _ in segments),
    )
    return x.to(DEVICE), y0.to(DEVICE), pool.to(DEVICE), batch, weights


def reference(x, y0, batch, weights, module_ids, out_widths):
    """Per-token loop in float64 with the explicit A, B matrices."""
    y = y0.double().cpu().clone()
    xd = x.double().cpu()
    starts = batch.seg_starts.tolist()
    scales = batch.scales.cpu()
    offsets = np.concatenate([[0], np.cumsum(out_widths)])
    for s, a in enumerate(batch.seg_adapter.tolist()):
        for t in range(starts[s], starts[s + 1]):
            for slot, m in enumerate(module_ids):
                if a < 0 or (slot, a) not in weights:
                    continue
                A, B = weights[(slot, a)]
                y[t, offsets[slot] : offsets[slot + 1]] += float(scales[m, a]) * (B @ (A @ xd[t]))
    return y


def split_k_lora(split_k):
    """lora_apply with K forced into split_k parts (on by itself only on a GPU) and one
    column block per expand program."""

    def apply(x, y, pool, batch, module_ids, offsets):
        widths = [b - a for a, b in zip(offsets, (*offsets[1:], y.shape[1]), strict=True)]
        cfg = pick_config(batch.max_seg_len, batch.max_rank, pool.shape[1], x.shape[1], x.dtype)
        group = _group_table(module_ids, offsets, widths, x.device)
        cfg = replace(cfg, n_iters=1).with_split_k(x.shape[1], split_k)
        run_lora(x, y, pool, batch, group, max(widths), cfg)

    return apply


def unrolled_lora(x, y, pool, batch, module_ids, offsets):
    """The MBGMV fixed-count loops: 3 expand column blocks, shrink splits of 2+ K blocks
    inside one page (the page table is read once per split)."""
    widths = [b - a for a, b in zip(offsets, (*offsets[1:], y.shape[1]), strict=True)]
    cfg = pick_config(batch.max_seg_len, batch.max_rank, pool.shape[1], x.shape[1], x.dtype)
    cfg = replace(cfg, shrink_unroll=True, expand_unroll=True, n_iters=3, block_n=min(cfg.block_n, 16),
                  block_k=min(cfg.block_k, 16))
    cfg = cfg.with_split_k(x.shape[1], triton.cdiv(x.shape[1], pool.shape[1]))
    run_lora(x, y, pool, batch, _group_table(module_ids, offsets, widths, x.device), max(widths), cfg)


def fused_lora(splits, unroll):
    """The fused MBGMV kernel forced on, at any rank, through run_lora's dispatch
    (prefill-shaped steps fall back to the two kernels there): `splits` column ranges per
    (row, module), the K and column loops unrolled or not."""

    def apply(x, y, pool, batch, module_ids, offsets):
        widths = [b - a for a, b in zip(offsets, (*offsets[1:], y.shape[1]), strict=True)]
        cfg = pick_config(batch.max_seg_len, batch.max_rank, pool.shape[1], x.shape[1], x.dtype)
        cfg = replace(cfg, fused=True, fused_splits=splits, shrink_unroll=unroll,
                      expand_unroll=unroll)
        run_lora(x, y, pool, batch, _group_table(module_ids, offsets, widths, x.device),
                 max(widths), cfg)

    return apply


def direct_fused(splits, unroll, block_k=0):
    """lora_fused called directly (no dispatch, so no fallback can pass the test)."""

    def apply(x, y, pool, batch, module_ids, offsets):
        widths = [b - a for a, b in zip(offsets, (*offsets[1:], y.shape[1]), strict=True)]
        cfg = pick_config(batch.max_seg_len, batch.max_rank, pool.shape[1], x.shape[1], x.dtype)
        assert not cfg.use_dot
        cfg = replace(cfg, shrink_unroll=unroll, expand_unroll=unroll, fused_block_k=block_k)
        lora_fused(x, y, pool, batch, _group_table(module_ids, offsets, widths, x.device),
                   max(widths), cfg, splits)

    return apply


DEFAULT_APPLIERS = (TRITON.lora_apply, split_k_lora(3), unrolled_lora, fused_lora(1, False),
                    fused_lora(3, True), TORCH.lora_apply)


def check(case_kwargs, seed, atol, rtol, appliers=DEFAULT_APPLIERS):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    x, y0, pool, batch, weights = make_case(rng, **case_kwargs)
    module_ids, out_widths = case_kwargs["module_ids"], case_kwargs["out_widths"]
    offsets = tuple(int(o) for o in np.concatenate([[0], np.cumsum(out_widths)[:-1]]))
    expected = reference(x, y0, batch, weights, module_ids, out_widths)
    base_rows = torch.zeros(x.shape[0], dtype=torch.bool)
    starts = batch.seg_starts.tolist()
    for s, a in enumerate(batch.seg_adapter.tolist()):
        if a < 0:
            base_rows[starts[s] : starts[s + 1]] = True
    for lora_apply in appliers:
        # y as a column slice of a wider buffer: row stride != width must be honoured.
        wide = torch.zeros(y0.shape[0], y0.shape[1] + 7, dtype=y0.dtype, device=DEVICE)
        y = wide[:, : y0.shape[1]]
        y.copy_(y0)
        lora_apply(x, y, pool, batch, tuple(module_ids), offsets)
        got = y.double().cpu()
        assert torch.equal(got[base_rows], y0.double().cpu()[base_rows]), "base rows changed"
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
        assert torch.all(wide[:, y0.shape[1] :] == 0), "wrote past the group's columns"


QKV = dict(module_ids=(0, 1, 2), out_widths=(64, 40, 24))  # k, v widths not multiples of P


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_mbgmm_mixed_ranks(dtype):
    case = dict(
        page_width=32, in_width=80, dtype=dtype, **QKV,
        # adapter 1 targets q only; adapter 2 has rank 64 on v and 1 on q
        ranks={0: [12, 12, 12], 1: [1, 0, 0], 2: [1, 0, 64]},
        segments=[(20, 0), (5, -1), (17, 1), (1, 2), (30, 0), (3, 2)],
    )
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=1e-2)
    check(case, seed=0, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_mbgmv(dtype):
    case = dict(
        page_width=48, in_width=96, dtype=dtype, **QKV,
        ranks={0: [12, 0, 12], 1: [64, 64, 64], 2: [1, 1, 0], 3: [8, 8, 8]},
        segments=[(1, 1), (1, -1), (1, 0), (2, 2), (1, 1), (1, 3), (1, -1), (1, 0)],
    )
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=1e-2)
    check(case, seed=1, **tol)


def test_decode_every_row_has_lora():
    # Contiguous LoRA rows: torch_ops adds into a slice of y instead of scattering.
    case = dict(
        page_width=32, in_width=48, dtype=torch.float32, **QKV,
        ranks={0: [3, 0, 5], 1: [2, 2, 2]},
        segments=[(1, 0), (2, 1), (1, 0), (1, 1)],
    )
    check(case, seed=4, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seg_len", [2, 24])
def test_unaligned_page_width(seg_len):
    # P = 24 has power-of-two factor 8 < 16: blocks straddle pages, per-element page lookup.
    case = dict(
        page_width=24, in_width=40, dtype=torch.float32,
        module_ids=(4, 5), out_widths=(56, 30),
        ranks={0: [12, 5], 1: [0, 16]},
        segments=[(seg_len, 0), (1, -1), (seg_len, 1), (1, 0)],
    )
    check(case, seed=2, atol=1e-4, rtol=1e-4)


def test_single_module_group():
    case = dict(
        page_width=32, in_width=64, dtype=torch.float32,
        module_ids=(3,), out_widths=(64,),
        ranks={0: [1], 1: [0], 2: [17]},
        segments=[(9, 2), (4, 1), (1, 0), (6, -1), (18, 0)],
    )
    check(case, seed=3, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", [10, 11, 12])
def test_random_shapes(seed):
    rng = np.random.default_rng(seed)
    page_width = int(rng.choice([16, 32, 48]))
    n_mod = int(rng.integers(1, 4))
    n_adapters = int(rng.integers(1, 5))
    decode = seed % 2 == 0
    segments = [
        (int(rng.integers(1, 3 if decode else 40)), int(rng.integers(-1, n_adapters)))
        for _ in range(int(rng.integers(2, 7)))
    ]
    ranks = {
        a: [int(rng.choice([0, 1, 4, 12, 33])) for _ in range(n_mod)] for a in range(n_adapters)
    }
    ranks[0][0] = max(ranks[0][0], 1)
    case = dict(
        page_width=page_width, in_width=int(rng.integers(8, 100)), dtype=torch.float32,
        module_ids=tuple(sorted(rng.choice(7, n_mod, replace=False).tolist())),
        out_widths=tuple(int(w) for w in rng.integers(8, 100, n_mod)),
        ranks=ranks, segments=segments,
    )
    check(case, seed=seed, atol=1e-4, rtol=1e-4)


def test_configs():
    # The decode tests above must really take the MBGMV path, the prefill ones MBGMM.
    assert not pick_config(GMV_MAX_SEG_LEN, 64, 192, 576, torch.float16).use_dot
    cfg = pick_config(GMV_MAX_SEG_LEN + 1, 12, 192, 576, torch.float16)
    assert cfg.use_dot and cfg.block_k == 64 and 192 % cfg.block_n == 0
    cfg = pick_config(300, 64, 4096, 4096, torch.bfloat16)
    assert 4096 % cfg.block_n == 0 and 4096 % cfg.block_k == 0 and cfg.block_r_expand == 64
    # Every K split is non-empty and block aligned.
    for in_width, split in ((576, 3), (576, 100), (80, 3), (4096, 16)):
        cfg = pick_config(1, 16, 192, in_width, torch.float16).with_split_k(in_width, split)
        assert cfg.k_per_split % cfg.block_k == 0
        assert (cfg.split_k - 1) * cfg.k_per_split < in_width <= cfg.split_k * cfg.k_per_split


def test_no_lora_rows_is_noop():
    rng = np.random.default_rng(5)
    case = dict(page_width=32, in_width=32, dtype=torch.float32, module_ids=(0,),
                out_widths=(32,), ranks={0: [4]}, segments=[(3, -1), (1, -1)])
    x, y0, pool, batch, _ = make_case(rng, **case)
    for ops in (TRITON, TORCH):
        y = y0.clone()
        ops.lora_apply(x, y, pool, batch, (0,), (0,))
        assert torch.equal(y, y0)


@pytest.mark.parametrize("page_width", [32, 24])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_small_ranks(dtype, page_width):
    # Ranks 1, odd and up to the bucket of 16; rank-0 modules; base rows; segments up to the
    # MBGMV limit; q wide and k/v GQA-narrow (v not a page multiple), K ending mid-page at
    # P = 32, and P = 24 (per-element page lookup). Column ranges 1, 4 (narrow modules get
    # fewer) and 3 with K steps of 16.
    case = dict(
        page_width=page_width, in_width=72, dtype=dtype,
        module_ids=(0, 1, 2), out_widths=(96, 32, 20),
        ranks={0: [1, 1, 1], 1: [3, 0, 5], 2: [7, 13, 0], 3: [0, 0, 16], 4: [16, 9, 2]},
        segments=[(1, 0), (1, -1), (3, 1), (1, 2), (GMV_MAX_SEG_LEN, -1), (2, 3), (1, 4), (1, 2)],
    )
    tol = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-2, rtol=1e-2),
           torch.bfloat16: dict(atol=2e-2, rtol=1e-2)}[dtype]
    check(case, seed=7, appliers=(direct_fused(1, False), direct_fused(4, True),
                                  direct_fused(3, False, block_k=16)), **tol)


def test_fused_dispatch(monkeypatch):
    # Off by default (a GPU measurement decides); when switched on through the tuning table,
    # only for rank buckets <= fused_max_rank and only on the MBGMV path.
    assert not pick_config(1, 8, 4096, 4096, torch.bfloat16).fused
    monkeypatch.setitem(TUNED["gmv"], "fused", True)
    assert pick_config(1, 8, 4096, 4096, torch.bfloat16).fused
    assert pick_config(GMV_MAX_SEG_LEN, 16, 4096, 4096, torch.bfloat16).fused
    assert not pick_config(1, 32, 4096, 4096, torch.bfloat16).fused
    assert not pick_config(GMV_MAX_SEG_LEN + 1, 8, 4096, 4096, torch.bfloat16).fused
    monkeypatch.setitem(TUNED["gmv"], "fused_max_rank", 64)
    assert pick_config(1, 64, 4096, 4096, torch.bfloat16).fused
    # Through lora_apply with the table switched on: a decode step with ranks <= 16.
    rng = np.random.default_rng(8)
    case = dict(page_width=32, in_width=64, dtype=torch.float32, module_ids=(3,), out_widths=(48,),
                ranks={0: [5], 1: [16]}, segments=[(1, 0), (1, -1), (2, 1), (1, 0)])
    x, y0, pool, batch, weights = make_case(rng, **case)
    assert step_config(batch, 1, 32, 64, x.dtype, x.device).fused  # what lora_apply runs
    y = y0.clone()
    TRITON.lora_apply(x, y, pool, batch, (3,), (0,))
    torch.testing.assert_close(y.double().cpu(), reference(x, y0, batch, weights, (3,), (48,)),
                               atol=1e-4, rtol=1e-4)


def test_page_ids_hoisted_only_inside_one_page():
    # The split applier above (K in 3 one-page splits, one column block per expand program)
    # must take the hoisted page-id path of both kernels and the default (splits and column
    # ranges spanning pages) the per-block one: check() then covers both against the reference.
    from kernels.lora import lora_calls

    rng = np.random.default_rng(6)
    case = dict(page_width=32, in_width=80, dtype=torch.float32, module_ids=(0,), out_widths=(96,),
                ranks={0: [12]}, segments=[(20, 0)])
    x, y0, pool, batch, _ = make_case(rng, **case)
    group = _group_table((0,), (0,), (96,), x.device)
    base = pick_config(batch.max_seg_len, batch.max_rank, 32, 80, x.dtype)
    for one_page, cfg in ((False, base.with_split_k(80, 1)),
                          (True, replace(base, n_iters=1).with_split_k(80, 3))):
        shrink, expand = lora_calls(x, y0.clone(), pool, batch, group, 96, cfg)
        assert shrink.kwargs["ONE_PAGE"] is one_page and expand.kwargs["ONE_PAGE"] is one_page


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_with_per_row_tables(dtype):
    # Decode graphs' tables (LoraBatch.rows_are_adapters): row i reads column i of the rank,
    # start and scale tables, base rows rank 0; the MBGMV kernels then load no segment table
    # and take the group's module ids as a constant. Same delta as the per-adapter tables.
    rng = np.random.default_rng(7)
    adapters = [1, -1, 0, 2, 1, 3, -1, 0, 2]  # one row each; repeats and base rows
    case = dict(page_width=48, in_width=96, dtype=dtype, **QKV,
                ranks={0: [12, 0, 12], 1: [64, 64, 64], 2: [1, 1, 0], 3: [8, 8, 8]},
                segments=[(1, a) for a in adapters])
    x, y0, pool, batch, weights = make_case(rng, **case)
    expected = reference(x, y0, batch, weights, QKV["module_ids"], QKV["out_widths"])
    cols = torch.tensor([max(a, 0) for a in adapters], device=DEVICE)
    base = torch.tensor([a < 0 for a in adapters], device=DEVICE)
    ranks = batch.ranks[:, cols].clone()
    ranks[:, base] = 0
    rows = replace(batch, ranks=ranks, scales=batch.scales[:, cols], a_starts=batch.a_starts[:, cols],
                   b_starts=batch.b_starts[:, cols], rows_are_adapters=True,
                   seg_adapter=torch.tensor([-1 if a < 0 else i for i, a in enumerate(adapters)],
                                            dtype=torch.int32, device=DEVICE))
    offsets = (0, 64, 104)
    for ops in (TRITON, TORCH):
        y = y0.clone()
        ops.lora_apply(x, y, pool, rows, QKV["module_ids"], offsets)
        tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=2e-2)
        torch.testing.assert_close(y.double().cpu(), expected, **tol)
    calls = lora_calls_of(x, y0, pool, rows, offsets)
    assert all(c.kwargs["ROW_TABLES"] for c in calls) and calls[0].kwargs["MODS"] == 0 + (1 << 3) + (2 << 6)


def lora_calls_of(x, y, pool, batch, offsets):
    from kernels.lora import _group_table, lora_calls

    widths = [b - a for a, b in zip(offsets, (*offsets[1:], y.shape[1]), strict=True)]
    group = _group_table(QKV["module_ids"], offsets, widths, x.device)
    cfg = step_config(batch, 3, pool.shape[1], x.shape[1], x.dtype, x.device)
    return lora_calls(x, y, pool, batch, group, max(widths), cfg)
