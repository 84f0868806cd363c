"""Fused elementwise kernels (Triton, interpreted on CPU) against their torch twins, which in
turn are checked against plain HF-style formulas."""

import pytest
import torch

from kernels import get_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = get_ops("triton")
TORCH = get_ops("torch")
DTYPES = [torch.float32, torch.float16]


def hf_rms_norm(x, weight, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def close(dtype):
    # One rounding step of the output dtype: the kernels reduce in a different order.
    return dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [96, 160])
def test_rms_norm(dtype, width):
    torch.manual_seed(width)
    wide = torch.randn(5, width + 8, dtype=dtype, device=DEVICE) * 3
    x = wide[:, :width]  # row stride != width
    weight = (torch.rand(width, device=DEVICE) + 0.5).to(dtype)
    expected = hf_rms_norm(x, weight, 1e-5)
    assert torch.equal(TORCH.rms_norm(x, weight, 1e-5), expected)
    got = TRITON.rms_norm(x, weight, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got, expected, **close(dtype))
    assert torch.equal(wide[:, :width], x)  # input untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    torch.manual_seed(1)
    h0 = torch.randn(7, 128, dtype=dtype, device=DEVICE)
    delta = torch.randn(7, 128, dtype=dtype, device=DEVICE)
    weight = torch.randn(128, dtype=dtype, device=DEVICE)
    h_sum = h0 + delta
    expected = hf_rms_norm(h_sum, weight, 1e-6)
    for ops in (TORCH, TRITON):
        h = h0.clone()
        got = ops.add_rms_norm(h, delta, weight, 1e-6)
        assert torch.equal(h, h_sum), "residual must be updated in place, rounded as h + delta"
        if ops is TORCH:
            assert torch.equal(got, expected)
        torch.testing.assert_close(got, expected, **close(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    torch.manual_seed(2)
    wide = torch.randn(4, 2 * 72 + 5, dtype=dtype, device=DEVICE) * 4
    gate_up = wide[:, : 2 * 72]
    expected = torch.nn.functional.silu(gate_up[:, :72]) * gate_up[:, 72:]
    assert torch.equal(TORCH.silu_mul(gate_up), expected)
    got = TRITON.silu_mul(gate_up)
    assert got.shape == (4, 72) and got.dtype == dtype
    torch.testing.assert_close(got, expected, **close(dtype))


def rope_tables(max_len, head_dim):
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,kv_heads,head_dim", [(4, 2, 32), (3, 3, 24), (8, 1, 16)])
def test_rope_write_kv(dtype, n_heads, kv_heads, head_dim):
    torch.manual_seed(n_heads * head_dim)
    n_tokens, n_pages = 5, 16
    qw, kvw = n_heads * head_dim, kv_heads * head_dim
    width = qw + 2 * kvw
    wide = torch.randn(n_tokens, width + 3, dtype=dtype)
    positions = torch.tensor([0, 7, 3, 30, 12])
    cos_t, sin_t = rope_tables(40, head_dim)
    cos, sin = cos_t[positions], sin_t[positions]
    perm = torch.randperm(n_pages)
    k_pages = perm[:n_tokens].to(torch.int32)
    v_pages = perm[n_tokens : 2 * n_tokens].to(torch.int32)
    k_pages[1] = v_pages[3] = -1  # padding: not written

    # HF: q_embed = q * cos + rotate_half(q) * sin with cos/sin cast to the model dtype.
    def hf(x, heads):
        x = x.view(n_tokens, heads, head_dim)
        c, s = cos.to(dtype)[:, None], sin.to(dtype)[:, None]
        half = head_dim // 2
        return (x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s).view(n_tokens, -1)

    qkv0 = wide[:, :width]
    q_ref, k_ref = hf(qkv0[:, :qw], n_heads), hf(qkv0[:, qw : qw + kvw], kv_heads)
    poison = torch.full((n_pages, kvw), -7.0, dtype=dtype)
    pool_ref = poison.clone()
    for t in range(n_tokens):
        if k_pages[t] >= 0:
            pool_ref[k_pages[t]] = k_ref[t]
        if v_pages[t] >= 0:
            pool_ref[v_pages[t]] = qkv0[t, qw + kvw :]
    def same(got, want):
        if DEVICE == "cuda":  # the GPU may contract into FMAs: within one rounding step
            torch.testing.assert_close(got, want, **close(dtype))
        else:
            assert torch.equal(got, want)

    for ops in (TORCH, TRITON):
        buf = wide.clone().to(DEVICE)
        qkv = buf[:, :width]
        pool = poison.clone().to(DEVICE)
        ops.rope_write_kv(qkv, cos.to(DEVICE), sin.to(DEVICE), pool, k_pages.to(DEVICE),
                          v_pages.to(DEVICE), n_heads, kv_heads, head_dim)
        # Same roundings as HF: bit-identical, on the interpreter too.
        same(qkv[:, :qw].cpu(), q_ref)
        same(qkv[:, qw : qw + kvw].cpu(), k_ref)
        assert torch.equal(qkv[:, qw + kvw :].cpu(), qkv0[:, qw + kvw :])
        assert torch.equal(buf[:, width:].cpu(), wide[:, width:])
        same(pool.cpu(), pool_ref)
