"""Rotary embedding of q and k in place in the fused qkv output, with the KV-cache write.

One pass over the qkv row: q and k heads are rotated (HF `rotate_half` convention) and
written back, the rotated k and the untouched v are also scattered into their pool pages
(this replaces write_kv). Rounding follows HF in the model dtype: cos/sin are rounded to the
model dtype, `x * cos` and `rotate_half(x) * sin` are each rounded, then their sum.
"""

import triton
import triton.language as tl

from .launch import cdiv, next_pow2


@triton.jit
def _rope_write_kv_kernel(
    qkv_ptr, qkv_stride,      # (T, (H + 2 * HKV) * D): q heads, k heads, v heads
    cos_ptr, sin_ptr,         # (T, D) fp32 each, contiguous: the rows of each token's position
    pool_ptr,                 # (N, HKV * D): a page is one token's K or V, heads concatenated
    k_pages_ptr, v_pages_ptr,  # (T,) int32; a negative page skips the write (padding rows)
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # over the H + 2 HKV heads
    half: tl.constexpr = D // 2
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < half
    is_q = heads < H
    is_v = heads >= H + HKV
    is_kv = (heads >= H) & (heads < H + 2 * HKV)
    h_mask = is_q | is_kv
    mask = h_mask[:, None] & d_mask[None, :]
    dtype = qkv_ptr.dtype.element_ty

    row = qkv_ptr + t * qkv_stride + heads[:, None] * D + offs[None, :]
    x1 = tl.load(row, mask=mask, other=0.0)
    x2 = tl.load(row + half, mask=mask, other=0.0)
    c1 = tl.load(cos_ptr + t * D + offs, mask=d_mask, other=0.0).to(dtype).to(tl.float32)
    c2 = tl.load(cos_ptr + t * D + half + offs, mask=d_mask, other=0.0).to(dtype).to(tl.float32)
    s1 = tl.load(sin_ptr + t * D + offs, mask=d_mask, other=0.0).to(dtype).to(tl.float32)
    s2 = tl.load(sin_ptr + t * D + half + offs, mask=d_mask, other=0.0).to(dtype).to(tl.float32)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    # out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1); each product rounded.
    r1 = ((x1f * c1[None, :]).to(dtype).to(tl.float32)
          + (-x2f * s1[None, :]).to(dtype).to(tl.float32)).to(dtype)
    r2 = ((x2f * c2[None, :]).to(dtype).to(tl.float32)
          + (x1f * s2[None, :]).to(dtype).to(tl.float32)).to(dtype)
    o1 = tl.where(is_v[:, None], x1, r1)
    o2 = tl.where(is_v[:, None], x2, r2)
    rot_mask = mask & ~is_v[:, None]
    tl.store(row, o1, mask=rot_mask)
    tl.store(row + half, o2, mask=rot_mask)

    k_page = tl.load(k_pages_ptr + t).to(tl.int64)
    v_page = tl.load(v_pages_ptr + t).to(tl.int64)
    page = tl.where(is_v, v_page, k_page)
    kv_head = tl.where(is_v, heads - H - HKV, heads - H)
    dst = pool_ptr + page[:, None] * (HKV * D) + kv_head[:, None] * D + offs[None, :]
    kv_mask = mask & (is_kv & (page >= 0))[:, None]
    pool_dtype = pool_ptr.dtype.element_ty
    tl.store(dst, o1.to(pool_dtype), mask=kv_mask)
    tl.store(dst + half, o2.to(pool_dtype), mask=kv_mask)


def rope_write_kv(qkv, cos, sin, pool_layer, k_pages, v_pages, n_heads, kv_heads, head_dim):
    """Rotate q and k of qkv (T, (n_heads + 2 kv_heads) * head_dim) in place with cos/sin
    (T, head_dim) fp32 (each token's row of the HF tables), and write k, v into the pool:
    pool_layer[k_pages[t]] = k[t], pool_layer[v_pages[t]] = v[t] (negative pages skipped)."""
    n_tokens, width = qkv.shape
    assert width == (n_heads + 2 * kv_heads) * head_dim and head_dim % 2 == 0
    assert qkv.stride(1) == 1 and cos.is_contiguous() and sin.is_contiguous()
    assert cos.shape == sin.shape == (n_tokens, head_dim)
    assert pool_layer.shape[1] == kv_heads * head_dim
    assert pool_layer.stride() == (pool_layer.shape[1], 1)
    if n_tokens == 0:
        return
    block_half = next_pow2(head_dim // 2)
    block_h = max(1, min(16, 2048 // block_half, next_pow2(n_heads + 2 * kv_heads)))
    grid = (n_tokens, cdiv(n_heads + 2 * kv_heads, block_h))
    _rope_write_kv_kernel[grid](
        qkv, qkv.stride(0), cos, sin, pool_layer, k_pages, v_pages,
        H=n_heads, HKV=kv_heads, D=head_dim, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=4 if block_h * block_half >= 512 else 2,
    )
