"""Decode attention over the paged KV cache (one query token per sequence), GQA-aware.

One program serves all query heads of one KV head, so each K/V page row is read once per
group. The group's heads are padded to tl.dot's 16 rows: the padding costs nothing in a
memory-bound loop, and the tensor-core path measured ~5x faster on H200 than a
multiply-and-reduce in registers (also for group size 1). Long sequences on a GPU that the
(batch x KV head) grid would leave mostly idle are split along the tokens (flash-decoding)
and merged by a second small kernel.
"""

import functools

import torch
import triton
import triton.language as tl

from .launch import KernelCall, cdiv, next_pow2

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_attn_kernel(
    q_ptr, q_sb, q_sh,            # (B, H, D), unit stride along D
    pool_ptr,                     # (N, P): a page is one token's K or V, heads concatenated
    kvp_ptr, kvp_sb, kvp_st,      # (B, max_len, 2) int32: K page, V page of every token
    seq_lens_ptr,                 # (B,) int32
    o_ptr, o_sb, o_sh,            # (B, H, D) output, written when NUM_SPLITS == 1
    part_o_ptr, part_ml_ptr,      # (B, H, NUM_SPLITS, D), (B, H, NUM_SPLITS, 2) fp32
    qk_scale,
    GROUP: tl.constexpr, D: tl.constexpr, P: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    IEEE: tl.constexpr,       # fp32 model: keep full precision instead of tf32
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # The split follows this row's own length, not the table's width: a CUDA graph captured
    # with a max_model_len-wide table does the same work as an eager step. Every split but
    # the last few gets a whole number of BLOCK_T blocks; trailing splits may be empty.
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_T) * BLOCK_T
    t_start = split * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + offs_d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    kvp_row = kvp_ptr + b * kvp_sb
    col = kv_head * D + offs_d
    # Blocks start below t_end, so each holds a valid token and m_i turns finite at once.
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < t_end
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k_page = tl.load(kvp_row + offs_t * kvp_st, mask=t_mask, other=0).to(tl.int64)
        v_page = tl.load(kvp_row + offs_t * kvp_st + 1, mask=t_mask, other=0).to(tl.int64)
        k = tl.load(pool_ptr + k_page[:, None] * P + col[None, :], mask=kv_mask, other=0.0)
        # qk_scale has log2(e) folded in: the softmax runs on exp2.
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(pool_ptr + v_page[:, None] * P + col[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS == 1:
        # l_i == 0 only for an empty (padding) sequence: emit zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_ptrs = o_ptr + b * o_sb + heads[:, None] * o_sh + offs_d[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=q_mask)
    else:
        row = (b * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # (G,)
        tl.store(part_o_ptr + row[:, None] * D + offs_d[None, :], acc, mask=q_mask)
        tl.store(part_ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + row * 2 + 1, l_i, mask=g_mask)


@triton.jit
def _decode_attn_merge_kernel(
    part_o_ptr, part_ml_ptr, o_ptr, o_sb, o_sh,
    H, D: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    row = (b * H + h) * NUM_SPLITS + offs_s
    m = tl.load(part_ml_ptr + row * 2, mask=s_mask, other=float("-inf"))
    l_s = tl.load(part_ml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty
    w = tl.exp2(m - m_max)
    part = tl.load(part_o_ptr + row[:, None] * D + offs_d[None, :],
                   mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    num = tl.sum(w[:, None] * part, axis=0)
    den = tl.sum(w * l_s, axis=0)
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(o_ptr + b * o_sb + h * o_sh + offs_d, out.to(o_ptr.dtype.element_ty), mask=d_mask)


def _num_splits(batch: int, kv_heads: int, max_len: int, device) -> int:
    """Splits per (row, KV head) so that the grid fills the GPU about twice over.

    Chosen from batch x KV heads against the SM count; the table width only caps it
    (a table narrower than 128 tokens per split cannot use more), which matters for
    eager steps with short sequences. Each program then divides its row's real length.
    """
    if device.type != "cuda":
        return 1
    return split_count(batch, kv_heads, max_len, _sm_count(device.index if device.index is not None else 0))


def split_count(batch: int, kv_heads: int, max_len: int, sm_count: int) -> int:
    """_num_splits for a GPU with `sm_count` SMs."""
    target = 2 * sm_count
    programs = batch * kv_heads
    if programs >= target:
        return 1
    split = max(1, min(cdiv(target, programs), cdiv(max_len, 128), 16))
    # A power of two: NUM_SPLITS is a constexpr, and eager steps (decode rows of a prefill
    # step) must only need variants the start-up warm-up compiled (kernels/launch.py).
    return 1 << (split.bit_length() - 1)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_attention(q, pool_layer, kv_pages, seq_lens, sm_scale, num_splits=None,
                     block_t=128, num_warps=4, num_stages=None):
    """paged_decode_attention with an explicit split count (tests force it on CPU) and
    launch parameters (benchmarks/kernel_bench.py --sweep)."""
    batch, n_heads, head_dim = q.shape
    page_width = pool_layer.shape[1]
    assert page_width % head_dim == 0 and n_heads % (page_width // head_dim) == 0
    assert pool_layer.stride() == (page_width, 1) and q.stride(2) == 1
    assert kv_pages.shape[0] == batch and kv_pages.shape[2] == 2 and kv_pages.stride(2) == 1
    kv_heads = page_width // head_dim
    max_len = kv_pages.shape[1]
    o = torch.empty_like(q)
    if batch == 0:
        return o
    if num_splits is None:
        num_splits = _num_splits(batch, kv_heads, max_len, q.device)

    for call in _attention_calls(q, pool_layer, kv_pages, seq_lens, sm_scale, o, num_splits, block_t, num_warps,
                                 num_stages):
        call.run()
    return o


def attention_calls(q, pool_layer, kv_pages, seq_lens, sm_scale, sm_count: int) -> list[KernelCall]:
    """The launches paged_decode_attention makes on a GPU of `sm_count` SMs (kernels/launch.py)."""
    batch, _, head_dim = q.shape
    num_splits = split_count(batch, pool_layer.shape[1] // head_dim, kv_pages.shape[1], sm_count)
    return _attention_calls(q, pool_layer, kv_pages, seq_lens, sm_scale, torch.empty_like(q), num_splits)


def _attention_calls(q, pool_layer, kv_pages, seq_lens, sm_scale, o, num_splits, block_t=128, num_warps=4,
                     num_stages=None) -> list[KernelCall]:
    batch, n_heads, head_dim = q.shape
    page_width = pool_layer.shape[1]
    kv_heads = page_width // head_dim
    group = n_heads // kv_heads
    block_g = max(16, next_pow2(group))
    block_d = max(16, next_pow2(head_dim))
    if num_splits > 1:
        part_o = torch.empty((batch, n_heads, num_splits, head_dim),
                             dtype=torch.float32, device=q.device)
        part_ml = torch.empty((batch, n_heads, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_o = part_ml = o  # unused placeholders
    calls = [KernelCall(_decode_attn_kernel, (batch, kv_heads, num_splits), (
        q, q.stride(0), q.stride(1), pool_layer,
        kv_pages, kv_pages.stride(0), kv_pages.stride(1), seq_lens,
        o, o.stride(0), o.stride(1), part_o, part_ml,
        sm_scale * _LOG2E), dict(
        GROUP=group, D=head_dim, P=page_width, NUM_SPLITS=num_splits,
        BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_T=block_t,
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps, **({} if num_stages is None else {"num_stages": num_stages})))]
    if num_splits > 1:
        calls.append(KernelCall(_decode_attn_merge_kernel, (batch, n_heads), (
            part_o, part_ml, o, o.stride(0), o.stride(1), n_heads), dict(
            D=head_dim, NUM_SPLITS=num_splits,
            BLOCK_S=next_pow2(num_splits), BLOCK_D=block_d,
            num_warps=1 if block_d <= 64 else 2)))
    return calls


def paged_decode_attention(q, pool_layer, kv_pages, seq_lens, sm_scale):
    """o[b, h] = softmax(sm_scale * q[b, h] K_b^T) V_b over the first seq_lens[b] tokens."""
    return decode_attention(q, pool_layer, kv_pages, seq_lens, sm_scale)
