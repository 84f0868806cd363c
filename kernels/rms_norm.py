"""RMSNorm, optionally fused with the residual add before it (one pass over the row).

Same rounding as HF Llama: normalise in fp32, round to the model dtype, then multiply by
the weight in the model dtype (`weight * x.to(dtype)`); the residual sum is rounded to the
model dtype before it is normalised, as `h = h + delta` would.
"""

import triton
import triton.language as tl

from .launch import next_pow2


@triton.jit
def _rms_norm_kernel(
    h_ptr, h_stride,          # (T, N) input rows; with HAS_DELTA updated in place to h + delta
    d_ptr, d_stride,          # (T, N) residual branch (read only with HAS_DELTA)
    w_ptr,                    # (N,) weight, model dtype
    out_ptr, out_stride,      # (T, N) normalised rows, model dtype
    N, eps,
    HAS_DELTA: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    dtype = out_ptr.dtype.element_ty
    h = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * d_stride + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(dtype)
        tl.store(h_ptr + row * h_stride + cols, h, mask=mask)
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / N
    normed = (hf * tl.rsqrt(var + eps)).to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = (w.to(tl.float32) * normed.to(tl.float32)).to(dtype)
    tl.store(out_ptr + row * out_stride + cols, out, mask=mask)


def _launch(h, delta, weight, eps):
    n_rows, width = h.shape
    assert h.stride(1) == 1 and weight.shape == (width,) and weight.is_contiguous()
    out = h.new_empty((n_rows, width))
    if n_rows == 0:
        return out
    block = next_pow2(width)
    d = h if delta is None else delta
    assert d.shape == h.shape and d.stride(1) == 1
    _rms_norm_kernel[(n_rows,)](
        h, h.stride(0), d, d.stride(0), weight, out, out.stride(0), width, eps,
        HAS_DELTA=delta is not None, BLOCK_N=block,
        num_warps=max(1, min(16, block // 512)),
    )
    return out


def rms_norm(x, weight, eps):
    """weight * normalise(x): x (T, N) in the model dtype; returns a new (T, N) tensor."""
    return _launch(x, None, weight, eps)


def add_rms_norm(h, delta, weight, eps):
    """h += delta (in place, rounded to h's dtype), then return rms_norm(h, weight, eps)."""
    return _launch(h, delta, weight, eps)
