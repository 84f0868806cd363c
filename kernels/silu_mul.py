"""SwiGLU gate: silu(gate) * up over the fused gate_up projection, one pass."""

import triton
import triton.language as tl

from .launch import cdiv, next_pow2


@triton.jit
def _silu_mul_kernel(
    gu_ptr, gu_stride,        # (T, 2 * N): gate columns [0, N), up columns [N, 2N)
    out_ptr, out_stride,      # (T, N)
    N, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gu_ptr + row * gu_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * gu_stride + N + cols, mask=mask, other=0.0)
    # Rounded like F.silu(gate) * up in the model dtype: silu in fp32, rounded, then the product.
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype)
    out = (act.to(tl.float32) * up.to(tl.float32)).to(dtype)
    tl.store(out_ptr + row * out_stride + cols, out, mask=mask)


def silu_mul(gate_up):
    """gate_up (T, 2N) -> silu(gate_up[:, :N]) * gate_up[:, N:] as a new (T, N) tensor."""
    n_rows, width = gate_up.shape
    assert width % 2 == 0 and gate_up.stride(1) == 1
    n = width // 2
    out = gate_up.new_empty((n_rows, n))
    if n_rows == 0:
        return out
    block = min(next_pow2(n), 2048)
    _silu_mul_kernel[(n_rows, cdiv(n, block))](
        gate_up, gate_up.stride(0), out, out.stride(0), n, BLOCK=block,
        num_warps=max(1, min(8, block // 256)),
    )
    return out
