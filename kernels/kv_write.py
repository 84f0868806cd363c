"""Scatter this step's K and V rows (one page each per token) into the pool."""

import triton
import triton.language as tl

from .launch import cdiv, next_pow2


@triton.jit
def _write_kv_kernel(
    pool_ptr,                 # (N, P) contiguous rows
    k_ptr, k_stride,          # (T, P), unit column stride
    v_ptr, v_stride,          # (T, P), unit column stride
    k_pages_ptr, v_pages_ptr,  # (T,) int32; a negative page skips the token (padding rows)
    P: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < P
    k_page = tl.load(k_pages_ptr + t).to(tl.int64)
    v_page = tl.load(v_pages_ptr + t).to(tl.int64)
    dtype = pool_ptr.dtype.element_ty
    if k_page >= 0:
        k = tl.load(k_ptr + t * k_stride + cols, mask=mask)
        tl.store(pool_ptr + k_page * P + cols, k.to(dtype), mask=mask)
    if v_page >= 0:
        v = tl.load(v_ptr + t * v_stride + cols, mask=mask)
        tl.store(pool_ptr + v_page * P + cols, v.to(dtype), mask=mask)

def write_kv(pool_layer, k, v, k_pages, v_pages):
    """pool_layer[k_pages[t]] = k[t], pool_layer[v_pages[t]] = v[t] for every token t."""
    page_width = pool_layer.shape[1]
    num_tokens = k.shape[0]
    assert pool_layer.stride() == (page_width, 1)
    assert k.shape == v.shape == (num_tokens, page_width) and k.stride(1) == v.stride(1) == 1
    if num_tokens == 0:
        return
    block = min(next_pow2(page_width), 1024)
    grid = (num_tokens, cdiv(page_width, block))
    _write_kv_kernel[grid](
        pool_layer, k, k.stride(0), v, v.stride(0), k_pages, v_pages,
        P=page_width, BLOCK=block, num_warps=4 if block >= 512 else 2,
    )
