"""Fused MBGMV LoRA for small ranks: y[t, off_i + n] += scale * (x[t] @ A^T) @ B^T[:, n], one launch.

Why. At decode the two-kernel path (lora_shrink.py into an fp32 tmp, then lora_expand.py)
is latency-bound at small ranks, not bandwidth-bound: at B=256 rank 8 (Llama-7B, P = 4096,
4096 -> 4096) it takes 28.5 us against a 9.4 us byte floor, and at B=1 any rank takes 14-19
us. Every LoRA point pays two launches, the dependency between them (the expand waits for
the whole shrink grid) and the tmp round trip, 4 x 32 times per decode step. This kernel
does both halves in one program, keeping the rank vector in registers.

Design. A 1-D grid of programs p = ((row * NMOD) + module slot) * n_splits + column range:
* each program recomputes its row's shrink for its module over the whole K (rank <= 16: 8-16
  page rows of A, a (BLOCK_R, BLOCK_K) fp32 tile of products reduced once at the end, as in
  the MBGMV shrink), scales it, then streams the B^T columns of its range into y through the
  expand kernel's block step (`_expand_block`, shared so the two paths add identically);
* there is no K split (it would need a cross-program reduction: atomics or the tmp we
  remove), so parallelism comes from splitting N into `n_splits` column ranges. Every range
  re-reads A and x: more ranges hide more latency but cost bytes. lora.py picks the fewest
  power-of-two ranges (of >= 512 columns) that give about 2 programs per SM, and
  `kernel_bench.py --variants` times 1/2/4/8 explicitly;
* the ranges of one (row, module) are adjacent program ids, so they are dispatched together
  and their A re-reads should be L2 hits: extra L2-to-SM traffic, little extra DRAM traffic.
  Worst case (every re-read from DRAM), per row of a bf16 4096 -> 4096 module at rank 8 the
  two-kernel path moves A 64 KiB + B^T 64 KiB + x 8 KiB + y 16 KiB (+ 256 B of tmp) = 152
  KiB; fused moves 80 + 72 * n_splits KiB: n_splits 1: +0%, 2: +47%, 4: +142%. At rank 16
  (288 KiB, x read twice by the shrink's two rank blocks): 144 + 136 * n_splits KiB, so
  -3%, +44%, +139%. Narrow modules of a group (GQA k, v) only get the ranges that reach
  their width (ranges are cut from the widest module), so they re-read less;
* programs of base-only rows (adapter -1), of rank-0 modules and of ranges past a module's
  width return before reading anything.

Precision: products and sums in fp32 FMAs (no tl.dot on this path), so fp32 models get full
precision without an `ieee` switch; y is read, updated in fp32 and rounded once.

Pages: as in the two kernels, a block that divides the page width (ALIGNED_*) looks its page
up once per rank row; otherwise every element looks up its own page.

Only for the MBGMV path (one row per program); lora.py uses it when LoraLaunchConfig.fused
is set and the step's rank bucket is <= fused_max_rank, otherwise the two-kernel path.
"""

import triton
import triton.language as tl

from .launch import cdiv
from .lora_expand import _expand_block
from .lora_shrink import segment_rows


@triton.jit
def _lora_fused_kernel(
    x_ptr, x_stride,          # (T, K) model dtype, unit column stride
    y_ptr, y_stride,          # (T, sum of out widths) model dtype, unit column stride
    pool_ptr,                 # (N, P) model dtype, contiguous rows
    seg_starts_ptr,           # (S+1,) int32
    seg_adapter_ptr,          # (S,) int32
    ranks_ptr,                # (7, A) int32
    scales_ptr,               # (7, A) fp32
    a_starts_ptr,             # (7, A) int32
    b_starts_ptr,             # (7, A) int32
    page_ids_ptr,             # (total,) int32
    group_ptr,                # (NMOD, 3) int32: module index, out offset, out width
    num_adapters, K, m_blocks, n_splits, cols_per_prog,
    NMOD: tl.constexpr, P: tl.constexpr,
    BLOCK_R: tl.constexpr,    # >= the step's largest rank: the whole rank in one tile
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ALIGNED_K: tl.constexpr,  # BLOCK_K divides P: page ids once per page-sized chunk of K
    ALIGNED_N: tl.constexpr,  # BLOCK_N divides P (cols_per_prog is a multiple of BLOCK_N)
    UNROLL_K: tl.constexpr,   # a page's K blocks as a fixed-count loop (needs ALIGNED_K)
    UNROLL_N: tl.constexpr,   # the range's column blocks as a fixed-count loop of N_ITERS
    N_ITERS: tl.constexpr,    # cols_per_prog // BLOCK_N
):
    pid = tl.program_id(0)
    n_split = pid % n_splits
    slot = (pid // n_splits) % NMOD
    row_prog = pid // (n_splits * NMOD)
    adapter, row, row_end = segment_rows(seg_starts_ptr, seg_adapter_ptr, row_prog, m_blocks, 1)
    if (adapter < 0) | (row >= row_end):  # a base-model segment, or past its end
        return
    module = tl.load(group_ptr + slot * 3)
    out_off = tl.load(group_ptr + slot * 3 + 1)
    width = tl.load(group_ptr + slot * 3 + 2)
    n_begin = n_split * cols_per_prog
    if n_begin >= width:
        return
    rank = tl.load(ranks_ptr + module * num_adapters + adapter)
    if rank == 0:
        return
    a_start = tl.load(a_starts_ptr + module * num_adapters + adapter)
    b_start = tl.load(b_starts_ptr + module * num_adapters + adapter)
    scale = tl.load(scales_ptr + module * num_adapters + adapter)

    # -- shrink: h = x[row] @ A^T over the whole K -------------------------------------
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    k_chunks = tl.cdiv(K, P)
    a_pages = a_start + offs_r * k_chunks  # page-table slot of each A row's chunk 0
    x_row = x_ptr + row.to(tl.int64) * x_stride
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    if ALIGNED_K:
        for chunk in range(0, k_chunks):
            page = tl.load(page_ids_ptr + a_pages + chunk, mask=r_mask, other=0)
            page_base = pool_ptr + page.to(tl.int64)[:, None] * P + offs_k[None, :]
            c0 = chunk * P
            if UNROLL_K:
                # Independent loads the compiler can issue before the first FMA (the last
                # chunk of a K that is not a multiple of P is masked, never read).
                for it in tl.static_range(P // BLOCK_K):
                    cols = c0 + it * BLOCK_K + offs_k
                    k_mask = cols < K
                    x = tl.load(x_row + cols, mask=k_mask, other=0.0)
                    a = tl.load(page_base + it * BLOCK_K, mask=r_mask[:, None] & k_mask[None, :],
                                other=0.0)
                    acc += a.to(tl.float32) * x.to(tl.float32)[None, :]
            else:
                for k0 in range(c0, tl.minimum(K, c0 + P), BLOCK_K):
                    cols = k0 + offs_k
                    k_mask = cols < K
                    x = tl.load(x_row + cols, mask=k_mask, other=0.0)
                    a = tl.load(page_base + (k0 - c0), mask=r_mask[:, None] & k_mask[None, :],
                                other=0.0)
                    acc += a.to(tl.float32) * x.to(tl.float32)[None, :]
    else:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            k_mask = cols < K
            a_mask = r_mask[:, None] & k_mask[None, :]
            x = tl.load(x_row + cols, mask=k_mask, other=0.0)
            page = tl.load(page_ids_ptr + a_pages[:, None] + (cols // P)[None, :], mask=a_mask,
                           other=0)
            a = tl.load(pool_ptr + page.to(tl.int64) * P + (cols % P)[None, :], mask=a_mask,
                        other=0.0)
            acc += a.to(tl.float32) * x.to(tl.float32)[None, :]
    h = tl.sum(acc, axis=1) * scale  # (BLOCK_R,) fp32, rows past the rank are 0
    t_col = h[:, None]               # (BLOCK_R, 1): the rank vector against B^T's rows

    # -- expand: y[row, out_off + range] += h @ B^T[:, range] ----------------------------
    offs_m = row + tl.arange(0, 1)
    m_mask = offs_m < row_end
    b_pages = b_start + offs_r * tl.cdiv(width, P)  # page-table slot of each B^T row's chunk 0
    arange_n = tl.arange(0, BLOCK_N)
    n_end = tl.minimum(n_begin + cols_per_prog, width)
    if UNROLL_N:
        for it in tl.static_range(N_ITERS):
            _expand_block(y_ptr, y_stride, pool_ptr, page_ids_ptr, t_col, t_col, offs_m, m_mask,
                          r_mask, b_pages, b_pages, n_begin + it * BLOCK_N, n_end, out_off, arange_n,
                          P, ALIGNED_N, False, False, False)
    else:
        for n0 in range(n_begin, n_end, BLOCK_N):
            _expand_block(y_ptr, y_stride, pool_ptr, page_ids_ptr, t_col, t_col, offs_m, m_mask,
                          r_mask, b_pages, b_pages, n0, n_end, out_off, arange_n, P, ALIGNED_N, False, False,
                          False)


def fused_block_k(cfg, page_width: int) -> int:
    """Shrink columns per step: cfg.fused_block_k, or a 4096-element fp32 product tile
    (512 columns at rank 8, 256 at rank 16), kept inside a page when the page allows."""
    cap = cfg.fused_block_k or max(16, 4096 // cfg.block_r_expand)
    block = min(page_width & -page_width, cap)
    return block if block >= 16 else min(32, cap)


def lora_fused(x, y, pool_layer, batch, group, max_width, cfg, n_splits):
    """Add every row's scaled LoRA delta into y in one launch (MBGMV: one row per program).

    `group` is lora.py's (NMOD, 3) int32 table, `n_splits` the column ranges per (row,
    module), cut from max_width (lora.py: pick_fused_splits); `cfg.block_r_expand` must
    cover the step's largest rank.
    """
    num_seg = batch.seg_adapter.shape[0]
    nmod = group.shape[0]
    page_width = pool_layer.shape[1]
    assert not cfg.use_dot and cfg.block_m == 1, "the fused kernel is the MBGMV path only"
    assert cfg.block_r_expand >= batch.max_rank and n_splits >= 1
    cols_per_prog = cdiv(cdiv(max_width, n_splits), cfg.block_n) * cfg.block_n
    n_splits = cdiv(max_width, cols_per_prog)  # no range starts past every width
    m_blocks = batch.max_seg_len
    block_k = fused_block_k(cfg, page_width)
    aligned_k = page_width % block_k == 0
    grid = (num_seg * m_blocks * nmod * n_splits,)
    launch = {"num_warps": cfg.fused_warps}
    if cfg.fused_stages:
        launch["num_stages"] = cfg.fused_stages
    _lora_fused_kernel[grid](
        x, x.stride(0), y, y.stride(0), pool_layer,
        batch.seg_starts, batch.seg_adapter, batch.ranks, batch.scales, batch.a_starts,
        batch.b_starts, batch.page_ids, group,
        batch.ranks.shape[1], x.shape[1], m_blocks, n_splits, cols_per_prog,
        NMOD=nmod, P=page_width, BLOCK_R=cfg.block_r_expand, BLOCK_K=block_k, BLOCK_N=cfg.block_n,
        ALIGNED_K=aligned_k, ALIGNED_N=page_width % cfg.block_n == 0,
        UNROLL_K=cfg.shrink_unroll and aligned_k, UNROLL_N=cfg.expand_unroll,
        N_ITERS=cols_per_prog // cfg.block_n if cfg.expand_unroll else 1,  # 1: one compile
        **launch,
    )
    return y
