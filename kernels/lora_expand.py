"""LoRA expand: y[t, off_i + n] += scale * tmp[t, i, :r] @ B^T_{m_i, a}[:r, n], B^T rows paged.

Each (row, column) of y belongs to exactly one program, so the update needs no atomics.
Program grid: axis 0 = (segment, row block), axis 1 = (module slot, column range). A
program loads its rows' whole rank vector once (BLOCK_R >= max rank) and then walks its
column range block by block, so tmp is read once per range rather than once per block.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .launch import KernelCall, cdiv, group_mods, jit_options
from .lora_shrink import segment_rows, slot_module


def _lora_expand(
    y_ptr, y_stride,          # (T, sum of out widths) model dtype, unit column stride
    tmp_ptr,                  # (SPLIT_K, T, NMOD, R_MAX) fp32 partial sums, contiguous
    pool_ptr,                 # (N, P) model dtype, contiguous rows
    seg_starts_ptr,           # (S+1,) int32
    seg_adapter_ptr,          # (S,) int32
    ranks_ptr,                # (7, A) int32
    scales_ptr,               # (7, A) fp32
    b_starts_ptr,             # (7, A) int32
    page_ids_ptr,             # (total,) int32
    group_ptr,                # (NMOD, 3) int32: module index, out offset, out width
    num_adapters, R_MAX, m_blocks, n_progs, cols_per_prog, split_k, split_stride,
    NMOD: tl.constexpr, P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    ALIGNED: tl.constexpr,    # BLOCK_N divides P: one page per (row, block), else per element
    ONE_PAGE: tl.constexpr,   # the program's column range lies in one page: its ids loaded once
    USE_DOT: tl.constexpr,    # MBGMM (tensor cores) vs MBGMV (BLOCK_M == 1, multiply + sum)
    IEEE: tl.constexpr,       # fp32 model: keep full precision instead of tf32
    UNROLL: tl.constexpr,     # column blocks as a fixed-count (unrolled) loop of N_ITERS
    N_ITERS: tl.constexpr,    # column blocks per program (cols_per_prog = N_ITERS * BLOCK_N)
    PDL: tl.constexpr,        # launched as a programmatic dependent of the shrink (CUDA only)
    ROW_TABLES: tl.constexpr,  # LoraBatch.rows_are_adapters: segment s is row s, table column s
    MODS: tl.constexpr,       # with ROW_TABLES: slot i's module id in bits 3i..3i+2
):
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    seg = pid0 // m_blocks
    slot = pid1 // n_progs
    if ROW_TABLES:
        adapter = seg  # no segment-table loads (as in the MBGMV shrink); BLOCK_M == 1
        row0 = seg
        row_end = seg + 1
    else:
        adapter, row0, row_end = segment_rows(seg_starts_ptr, seg_adapter_ptr, pid0, m_blocks, BLOCK_M)
        if (adapter < 0) | (row0 >= row_end):  # a base-model segment, or past its end
            return
    module = slot_module(group_ptr, slot, MODS, ROW_TABLES)
    out_off = tl.load(group_ptr + slot * 3 + 1)
    width = tl.load(group_ptr + slot * 3 + 2)
    # Every table load ahead of the branches, so none waits for another's value.
    rank = tl.load(ranks_ptr + module * num_adapters + adapter)
    b_start = tl.load(b_starts_ptr + module * num_adapters + adapter)
    scale = tl.load(scales_ptr + module * num_adapters + adapter)
    n_begin = (pid1 % n_progs) * cols_per_prog
    if n_begin >= width:
        return
    if rank == 0:
        return
    n_chunks = tl.cdiv(width, P)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    row_pages = b_start + offs_r * n_chunks  # page-table slot of each B^T row's chunk 0
    arange_n = tl.arange(0, BLOCK_N)
    if ONE_PAGE:
        # Loaded before the column loop, the ids are off the loop's dependency chain: every
        # block's B^T load can issue at once instead of waiting on its own page-id load.
        page = tl.load(page_ids_ptr + row_pages + n_begin // P, mask=r_mask, other=0)
        page_off = page.to(tl.int64) * P - (n_begin // P) * P  # + column = element offset
    else:
        page_off = row_pages.to(tl.int64)  # unused
    n_end = tl.minimum(n_begin + cols_per_prog, width)
    if PDL:
        # Launched as a programmatic dependent of the shrink (lora.py: lora_calls), this
        # program may start while the shrink's last programs still run. The tables, B^T and
        # y do not depend on the shrink, tmp does: the first block of B^T is read before the
        # wait, overlapping the shrink's tail and this launch's own latency.
        b_first = _load_b(pool_ptr, page_ids_ptr, r_mask, row_pages, page_off, n_begin, n_end, arange_n,
                          P, ALIGNED, ONE_PAGE)
        gdc_wait()
    # Masked loads also shield us from the never-written (uninitialised) tmp entries.
    t_ptrs = tmp_ptr + (offs_m[:, None] * NMOD + slot) * R_MAX + offs_r[None, :]
    t_mask = m_mask[:, None] & r_mask[None, :]
    t = tl.load(t_ptrs, mask=t_mask, other=0.0)
    for k_split in range(1, split_k):
        t += tl.load(t_ptrs + k_split * split_stride, mask=t_mask, other=0.0)
    t = t * scale
    if USE_DOT:
        if not IEEE:
            # Half-precision intermediate, like the base GEMMs: full tensor-core rate.
            t = t.to(pool_ptr.dtype.element_ty)
        t_col = t  # unused on this path
    else:
        t_col = tl.trans(t)  # (BLOCK_R, 1): one row's rank vector against B^T's rows
    if PDL:
        _add_b(y_ptr, y_stride, t, t_col, b_first, offs_m, m_mask, n_begin, n_end, out_off, arange_n,
               USE_DOT, IEEE)
        n_first = n_begin + BLOCK_N
    else:
        n_first = n_begin

    if UNROLL:
        # A fixed trip count lets the compiler issue every block's loads before the first
        # block's math: more bytes in flight per program, which is what a decode-sized
        # (latency-bound) launch lacks.
        for it in tl.static_range(1 if PDL else 0, N_ITERS):
            _expand_block(y_ptr, y_stride, pool_ptr, page_ids_ptr, t, t_col, offs_m, m_mask, r_mask,
                          row_pages, page_off, n_begin + it * BLOCK_N, n_end, out_off, arange_n,
                          P, ALIGNED, ONE_PAGE, USE_DOT, IEEE)
    else:
        for n0 in range(n_first, n_end, BLOCK_N):
            _expand_block(y_ptr, y_stride, pool_ptr, page_ids_ptr, t, t_col, offs_m, m_mask, r_mask,
                          row_pages, page_off, n0, n_end, out_off, arange_n, P, ALIGNED, ONE_PAGE,
                          USE_DOT, IEEE)


@triton.jit
def _expand_block(y_ptr, y_stride, pool_ptr, page_ids_ptr, t, t_col, offs_m, m_mask, r_mask,
                  row_pages, page_off, n0, n_end, out_off, arange_n,
                  P: tl.constexpr, ALIGNED: tl.constexpr, ONE_PAGE: tl.constexpr, USE_DOT: tl.constexpr,
                  IEEE: tl.constexpr):
    """y[rows, out_off + n0 : + BLOCK_N] += t @ B^T[:, n0 : + BLOCK_N] (columns >= n_end masked).
    ONE_PAGE: page_off (per rank row) + column is the B^T element's offset in the pool."""
    b = _load_b(pool_ptr, page_ids_ptr, r_mask, row_pages, page_off, n0, n_end, arange_n, P, ALIGNED, ONE_PAGE)
    _add_b(y_ptr, y_stride, t, t_col, b, offs_m, m_mask, n0, n_end, out_off, arange_n, USE_DOT, IEEE)


@triton.jit
def _load_b(pool_ptr, page_ids_ptr, r_mask, row_pages, page_off, n0, n_end, arange_n,
            P: tl.constexpr, ALIGNED: tl.constexpr, ONE_PAGE: tl.constexpr):
    """B^T[:, n0 : + BLOCK_N] of the program's rank rows, (BLOCK_R, BLOCK_N), zero where masked."""
    offs_n = n0 + arange_n
    n_mask = offs_n < n_end
    b_mask = r_mask[:, None] & n_mask[None, :]
    if ONE_PAGE:
        b_ptrs = pool_ptr + page_off[:, None] + offs_n[None, :]
    elif ALIGNED:
        # Masked when the block lies past the end: its page-table slot may not be this adapter's.
        live = r_mask & ((row_pages * 0 + n0) < n_end)  # a tensor compare: the interpreter needs one
        page = tl.load(page_ids_ptr + row_pages + n0 // P, mask=live, other=0)
        b_ptrs = pool_ptr + page.to(tl.int64)[:, None] * P + (n0 % P + arange_n)[None, :]
    else:
        page = tl.load(page_ids_ptr + row_pages[:, None] + (offs_n // P)[None, :],
                       mask=b_mask, other=0)
        b_ptrs = pool_ptr + page.to(tl.int64) * P + (offs_n % P)[None, :]
    return tl.load(b_ptrs, mask=b_mask, other=0.0)  # contiguous along N


@triton.jit
def _add_b(y_ptr, y_stride, t, t_col, b, offs_m, m_mask, n0, n_end, out_off, arange_n,
           USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """y[rows, out_off + n0 : + BLOCK_N] += t @ b, read, added in fp32 and rounded once."""
    offs_n = n0 + arange_n
    n_mask = offs_n < n_end
    if USE_DOT:
        if IEEE:
            delta = tl.dot(t, b, input_precision="ieee")
        else:
            delta = tl.dot(t, b)
    else:
        delta = tl.sum(t_col * b.to(tl.float32), axis=0)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * y_stride + out_off + offs_n[None, :]
    y_mask = m_mask[:, None] & n_mask[None, :]
    y_old = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y_old.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=y_mask)


# Two compiled forms of one kernel. Decode steps replay CUDA graphs whose ints are fixed per
# graph: fully specialised (divisibility hints). Eager steps (MBGMM, and the MBGMV decode rows
# of mixed steps) change the adapter count, rank, row blocks and K splits every step: those
# arguments stay unspecialised, so that the variants compiled at start-up cover every step
# (kernels/launch.py).
_lora_expand_kernel = triton.jit(_lora_expand)
_lora_expand_step_kernel = triton.jit(_lora_expand, **jit_options(
    "b_starts_ptr", "num_adapters", "R_MAX", "m_blocks", "split_k", "split_stride"))



def lora_expand(y, tmp, pool_layer, batch, group, max_width, cfg):
    """Add the scaled LoRA delta of every module slot into its column slice of y."""
    expand_call(y, tmp, pool_layer, batch, group, max_width, cfg).run()


def expand_call(y, tmp, pool_layer, batch, group, max_width, cfg, pdl: bool = False) -> KernelCall:
    """The launch lora_expand makes (kernels/launch.py). pdl: launched as a programmatic
    dependent of the shrink launched just before it (which then starts its dependents early)."""
    num_seg = batch.seg_adapter.shape[0]
    split_k, n_rows, nmod, max_rank = tmp.shape
    page_width = pool_layer.shape[1]
    assert cfg.block_r_expand >= max_rank and (cfg.use_dot or cfg.block_m == 1)
    block_m = cfg.expand_block_m or cfg.block_m
    m_blocks = cdiv(batch.max_seg_len, block_m)
    cols_per_prog = cfg.block_n * cfg.n_iters
    n_progs = cdiv(max_width, cols_per_prog)
    grid = (num_seg * m_blocks, nmod * n_progs)
    common = (
        y, y.stride(0), tmp, pool_layer,
        batch.seg_starts, batch.seg_adapter, batch.ranks, batch.scales, batch.b_starts,
        batch.page_ids, group,
        batch.ranks.shape[1], max_rank, m_blocks, n_progs, cols_per_prog, split_k,
        n_rows * nmod * max_rank,
    )
    launch = {"num_warps": cfg.expand_warps}
    if cfg.expand_stages:
        launch["num_stages"] = cfg.expand_stages
    kernel = _lora_expand_step_kernel if cfg.use_dot or batch.eager_decode else _lora_expand_kernel
    row_tables = batch.rows_are_adapters and not cfg.use_dot
    return KernelCall(kernel, grid, common, dict(
        NMOD=nmod, P=page_width,
        BLOCK_M=block_m, BLOCK_R=cfg.block_r_expand, BLOCK_N=cfg.block_n,
        ALIGNED=page_width % cfg.block_n == 0,
        ONE_PAGE=cfg.one_page and page_width % cfg.block_n == 0 and page_width % cols_per_prog == 0,
        USE_DOT=cfg.use_dot, IEEE=cfg.ieee, UNROLL=cfg.expand_unroll and not cfg.use_dot,
        N_ITERS=cfg.n_iters, PDL=pdl, ROW_TABLES=row_tables, MODS=group_mods(group) if row_tables else 0, **launch,
        **({"launch_pdl": True} if pdl else {})))
