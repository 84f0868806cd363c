"""LoRA shrink: tmp[k, t, i, :r] = x[t, Kslice_k] @ A_{m_i, a}[:, Kslice_k]^T, A paged.

One launch covers every segment and every module of a projection group (modules sharing x).
Program grid: axis 0 = (segment, row block), axis 1 = (module slot, rank block), axis 2 =
K split. A decode step has too few (segment, module) pairs to fill a GPU while each would
walk the whole hidden size alone, so K is split; the partial sums land in separate tmp
planes that the expand kernel adds up: deterministic, no atomics, no zero-fill.
"""

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from .launch import KernelCall, cdiv, group_mods, jit_options

# Arguments that change from one eager (prefill) step to the next stay unspecialised, so that
# the variants compiled at start-up cover every step (kernels/launch.py). The MBGMV kernel has
# two forms: in decode CUDA graphs its ints are fixed per graph, so it keeps Triton's hints;
# for the decode rows of eager steps (LoraBatch.eager_decode) they change every step.
_STEP_ARGS = jit_options("a_starts_ptr", "num_adapters", "R_MAX", "m_blocks", "r_blocks", "split_stride")


@triton.jit
def segment_rows(seg_starts_ptr, seg_adapter_ptr, row_prog, m_blocks, BLOCK_M: tl.constexpr):
    """(adapter, first row, end row) of row block `row_prog` (segment row_prog // m_blocks):
    the three segment-table loads of every LoRA kernel, issued together. The caller returns
    early for a base-model segment (adapter < 0) or a block past its segment's end."""
    seg = row_prog // m_blocks
    adapter = tl.load(seg_adapter_ptr + seg)
    row0 = tl.load(seg_starts_ptr + seg) + (row_prog % m_blocks) * BLOCK_M
    row_end = tl.load(seg_starts_ptr + seg + 1)
    return adapter, row0, row_end


@triton.jit
def slot_module(group_ptr, slot, MODS: tl.constexpr, ROW_TABLES: tl.constexpr):
    """The module id of group slot `slot`: with per-row tables (decode graphs) unpacked from
    the constant MODS (3 bits a slot), so no table load; else read from the group table."""
    if ROW_TABLES:
        module = (MODS >> (3 * slot)) & 7
    else:
        module = tl.load(group_ptr + slot * 3)
    return module


@triton.jit(**_STEP_ARGS)
def _lora_shrink_kernel(
    x_ptr, x_stride,          # (T, K) model dtype, unit column stride
    tmp_ptr,                  # (SPLIT_K, T, NMOD, R_MAX) fp32, contiguous
    pool_ptr,                 # (N, P) model dtype, contiguous rows
    seg_starts_ptr,           # (S+1,) int32
    seg_adapter_ptr,          # (S,) int32
    ranks_ptr,                # (7, A) int32
    a_starts_ptr,             # (7, A) int32
    page_ids_ptr,             # (total,) int32
    group_ptr,                # (NMOD, 3) int32: module index, out offset, out width
    num_adapters, K, R_MAX, m_blocks, r_blocks, k_per_split, split_stride,
    NMOD: tl.constexpr, P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ALIGNED: tl.constexpr,    # BLOCK_K divides P: one page per (row, block), else per element
    ONE_PAGE: tl.constexpr,   # ALIGNED and the split lies in one page: its ids loaded once
    IEEE: tl.constexpr,       # fp32 model: keep full precision instead of tf32
    PDL: tl.constexpr,        # the expand is launched as our programmatic dependent (CUDA only)
):
    """MBGMM (tensor cores): BLOCK_M rows of one segment, BLOCK_R rank rows, one K split."""
    if PDL:
        # Let the expand launch once every program of ours is resident: it reads its tables
        # and B^T while our last programs finish, and waits for them before reading tmp.
        gdc_launch_dependents()
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    k_split = tl.program_id(2)
    slot = pid1 // r_blocks
    adapter, row0, row_end = segment_rows(seg_starts_ptr, seg_adapter_ptr, pid0, m_blocks, BLOCK_M)
    if (adapter < 0) | (row0 >= row_end):  # a base-model segment, or past its end
        return
    module = tl.load(group_ptr + slot * 3)
    rank = tl.load(ranks_ptr + module * num_adapters + adapter)
    a_start = tl.load(a_starts_ptr + module * num_adapters + adapter)  # not behind the branch
    r0 = (pid1 % r_blocks) * BLOCK_R
    if r0 >= rank:
        return
    n_chunks = tl.cdiv(K, P)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    row_pages = a_start + offs_r * n_chunks  # page-table slot of each A row's chunk 0

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_begin = k_split * k_per_split
    if ONE_PAGE:
        # Off the loop's dependency chain, so the pipeliner can prefetch A like x.
        page = tl.load(page_ids_ptr + row_pages + k_begin // P, mask=r_mask, other=0)
        page_off = page.to(tl.int64)[:, None] * P - (k_begin // P) * P + offs_k[None, :]
    else:
        page_off = offs_k[None, :].to(tl.int64)  # unused
    for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, K), BLOCK_K):
        cols = k0 + offs_k
        k_mask = cols < K
        x = tl.load(x_ptr + offs_m[:, None] * x_stride + cols[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a_mask = r_mask[:, None] & k_mask[None, :]
        if ONE_PAGE:
            a_ptrs = pool_ptr + page_off + k0
        elif ALIGNED:
            page = tl.load(page_ids_ptr + row_pages + k0 // P, mask=r_mask, other=0)
            a_ptrs = pool_ptr + page.to(tl.int64)[:, None] * P + (k0 % P + offs_k)[None, :]
        else:
            page = tl.load(page_ids_ptr + row_pages[:, None] + (cols // P)[None, :],
                           mask=a_mask, other=0)
            a_ptrs = pool_ptr + page.to(tl.int64) * P + (cols % P)[None, :]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)  # (BLOCK_R, BLOCK_K), contiguous along K
        if IEEE:
            acc += tl.dot(x, tl.trans(a), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(a))

    tmp_ptrs = (tmp_ptr + k_split * split_stride
                + (offs_m[:, None] * NMOD + slot) * R_MAX + offs_r[None, :])
    tl.store(tmp_ptrs, acc, mask=m_mask[:, None] & r_mask[None, :])


def lora_shrink(x, tmp, pool_layer, batch, group, cfg):
    """Fill tmp (cfg.split_k, T, NMOD, max_rank) fp32 for the rows and ranks that have LoRA.

    Entries of rows without an adapter or beyond a module's rank are left untouched: the
    expand kernel never reads them. `group` is the (NMOD, 3) int32 table from lora.py,
    `cfg` the block configuration chosen there.
    """
    shrink_call(x, tmp, pool_layer, batch, group, cfg).run()


def shrink_call(x, tmp, pool_layer, batch, group, cfg, pdl: bool = False) -> KernelCall:
    """The launch lora_shrink makes (kernels/launch.py). pdl: the expand that follows is
    launched as its programmatic dependent (expand_call)."""
    num_seg = batch.seg_adapter.shape[0]
    split_k, n_rows, nmod, max_rank = tmp.shape
    in_width = x.shape[1]
    page_width = pool_layer.shape[1]
    assert split_k == cfg.split_k and n_rows == x.shape[0]
    assert cfg.use_dot or cfg.block_m == 1
    m_blocks = cdiv(batch.max_seg_len, cfg.block_m)
    r_blocks = cdiv(max_rank, cfg.block_r)
    grid = (num_seg * m_blocks, nmod * r_blocks, split_k)
    common = (
        x, x.stride(0), tmp, pool_layer,
        batch.seg_starts, batch.seg_adapter, batch.ranks, batch.a_starts, batch.page_ids, group,
        batch.ranks.shape[1], in_width, max_rank, m_blocks, r_blocks,
        cfg.k_per_split, n_rows * nmod * max_rank,
    )
    launch = {"num_warps": cfg.shrink_warps}
    if cfg.shrink_stages:
        launch["num_stages"] = cfg.shrink_stages
    if cfg.use_dot:
        return KernelCall(_lora_shrink_kernel, grid, common, dict(
            NMOD=nmod, P=page_width, BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k,
            ALIGNED=page_width % cfg.block_k == 0,
            ONE_PAGE=cfg.one_page and page_width % cfg.block_k == 0 and page_width % cfg.k_per_split == 0,
            IEEE=cfg.ieee, PDL=pdl, **launch))
    aligned = page_width % cfg.block_k == 0 and cfg.k_per_split % cfg.block_k == 0
    # Unrolling needs every split to lie inside one page.
    unroll = cfg.shrink_unroll and aligned and page_width % cfg.k_per_split == 0
    kernel = _lora_shrink_gmv_step_kernel if batch.eager_decode else _lora_shrink_gmv_kernel
    return KernelCall(kernel, grid, common, dict(
        NMOD=nmod, P=page_width, BLOCK_R=cfg.block_r, BLOCK_K=cfg.block_k,
        ALIGNED=aligned, UNROLL=unroll, K_ITERS=cfg.k_per_split // cfg.block_k if unroll else 1, PDL=pdl,
        ROW_TABLES=batch.rows_are_adapters, MODS=group_mods(group) if batch.rows_are_adapters else 0,
        **launch))


def _lora_shrink_gmv(
    x_ptr, x_stride,          # (T, K) model dtype, unit column stride
    tmp_ptr,                  # (SPLIT_K, T, NMOD, R_MAX) fp32, contiguous
    pool_ptr,                 # (N, P) model dtype, contiguous rows
    seg_starts_ptr,           # (S+1,) int32
    seg_adapter_ptr,          # (S,) int32
    ranks_ptr,                # (7, A) int32
    a_starts_ptr,             # (7, A) int32
    page_ids_ptr,             # (total,) int32
    group_ptr,                # (NMOD, 3) int32: module index, out offset, out width
    num_adapters, K, R_MAX, m_blocks, r_blocks, k_per_split, split_stride,
    NMOD: tl.constexpr, P: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    ALIGNED: tl.constexpr,    # BLOCK_K divides P (and k_per_split): page ids once per chunk
    UNROLL: tl.constexpr,     # the split is K_ITERS blocks inside one page: fixed-count loop
    K_ITERS: tl.constexpr,
    PDL: tl.constexpr,        # the expand is launched as our programmatic dependent (CUDA only)
    ROW_TABLES: tl.constexpr,  # LoraBatch.rows_are_adapters: segment s is row s, table column s
    MODS: tl.constexpr,       # with ROW_TABLES: slot i's module id in bits 3i..3i+2
):
    """MBGMV: one row, BLOCK_R rank rows of A, one K split.

    The page ids of the rank block are loaded once per page-sized chunk of K and then feed
    P / BLOCK_K contiguous tile loads (a whole 2*P-byte page row per id); products
    accumulate elementwise in a (BLOCK_R, BLOCK_K) tile, reduced once at the end, so the
    loop body is loads and FMAs only.
    """
    if PDL:
        gdc_launch_dependents()  # as in the MBGMM kernel above
    pid0 = tl.program_id(0)
    pid1 = tl.program_id(1)
    k_split = tl.program_id(2)
    seg = pid0 // m_blocks
    slot = pid1 // r_blocks
    if ROW_TABLES:
        # No segment-table loads: the rank below is the first load, one fewer in the chain
        # of dependent loads ahead of the first byte of A (base and padding rows: rank 0).
        adapter = seg
        row = seg
    else:
        adapter, row, row_end = segment_rows(seg_starts_ptr, seg_adapter_ptr, pid0, m_blocks, 1)
        if (adapter < 0) | (row >= row_end):  # a base-model segment, or past its end
            return
    module = slot_module(group_ptr, slot, MODS, ROW_TABLES)
    # Both loads ahead of the branch on the rank: a_start then does not wait for it.
    rank = tl.load(ranks_ptr + module * num_adapters + adapter)
    a_start = tl.load(a_starts_ptr + module * num_adapters + adapter)
    r0 = (pid1 % r_blocks) * BLOCK_R
    if r0 >= rank:
        return
    n_chunks = tl.cdiv(K, P)

    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    offs_k = tl.arange(0, BLOCK_K)
    row_pages = a_start + offs_r * n_chunks  # page-table slot of each A row's chunk 0
    x_row = x_ptr + row.to(tl.int64) * x_stride

    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    k_begin = k_split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    if UNROLL:
        # One page id per rank row for the whole split, then independent loads the
        # compiler can all issue up front (see the expand kernel).
        c0 = (k_begin // P) * P
        page = tl.load(page_ids_ptr + row_pages + k_begin // P, mask=r_mask, other=0)
        page_base = pool_ptr + page.to(tl.int64)[:, None] * P + offs_k[None, :]
        for it in tl.static_range(K_ITERS):
            k0 = k_begin + it * BLOCK_K
            cols = k0 + offs_k
            k_mask = cols < k_end
            x = tl.load(x_row + cols, mask=k_mask, other=0.0)
            a = tl.load(page_base + (k0 - c0), mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc += a.to(tl.float32) * x.to(tl.float32)[None, :]
    elif ALIGNED:
        for c in range(k_begin // P, tl.cdiv(k_end, P)):
            page = tl.load(page_ids_ptr + row_pages + c, mask=r_mask, other=0)
            page_base = pool_ptr + page.to(tl.int64)[:, None] * P + offs_k[None, :]
            c0 = c * P
            for k0 in range(tl.maximum(k_begin, c0), tl.minimum(k_end, c0 + P), BLOCK_K):
                cols = k0 + offs_k
                k_mask = cols < k_end
                x = tl.load(x_row + cols, mask=k_mask, other=0.0)
                a = tl.load(page_base + (k0 - c0), mask=r_mask[:, None] & k_mask[None, :],
                            other=0.0)
                acc += a.to(tl.float32) * x.to(tl.float32)[None, :]
    else:
        for k0 in range(k_begin, k_end, BLOCK_K):
            cols = k0 + offs_k
            k_mask = cols < k_end
            a_mask = r_mask[:, None] & k_mask[None, :]
            x = tl.load(x_row + cols, mask=k_mask, other=0.0)
            page = tl.load(page_ids_ptr + row_pages[:, None] + (cols // P)[None, :],
                           mask=a_mask, other=0)
            a = tl.load(pool_ptr + page.to(tl.int64) * P + (cols % P)[None, :], mask=a_mask,
                        other=0.0)
            acc += a.to(tl.float32) * x.to(tl.float32)[None, :]

    out = tl.sum(acc, axis=1)
    tl.store(tmp_ptr + k_split * split_stride + (row * NMOD + slot) * R_MAX + offs_r, out,
             mask=r_mask)


_lora_shrink_gmv_kernel = triton.jit(_lora_shrink_gmv)  # graph decode: fully specialised
_lora_shrink_gmv_step_kernel = triton.jit(_lora_shrink_gmv, **_STEP_ARGS)  # eager decode rows
