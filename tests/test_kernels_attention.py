"""Paged decode attention and KV write (Triton, interpreted on CPU) and torch_ops vs naive
float64 references."""

import math

import numpy as np
import pytest
import torch

from kernels import get_ops
from kernels.paged_attention import decode_attention  # conftest.py chose the interpreter on CPU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = get_ops("triton")
TORCH = get_ops("torch")


def make_cache(rng, seq_lens, kv_heads, head_dim, dtype, table_len=None):
    """NaN-poisoned pool whose K/V pages are scattered; unused table slots hold -1."""
    page_width = kv_heads * head_dim
    max_len = table_len or max(seq_lens) + 3
    n_pages = 2 * sum(seq_lens) + 4
    perm = rng.permutation(n_pages)
    pool = torch.full((n_pages, page_width), float("nan"), dtype=torch.float64)
    kv_pages = torch.full((len(seq_lens), max_len, 2), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(seq_lens):
        pages = torch.from_numpy(perm[used : used + 2 * n].reshape(n, 2).astype(np.int32))
        used += 2 * n
        kv_pages[b, :n] = pages
        pool[pages.reshape(-1).long()] = torch.randn(2 * n, page_width, dtype=torch.float64)
    return pool.to(dtype), kv_pages


def reference(q, pool, kv_pages, seq_lens, sm_scale):
    q = q.double().cpu()
    pool = pool.double().cpu()
    batch, n_heads, head_dim = q.shape
    group = n_heads // (pool.shape[1] // head_dim)
    out = torch.zeros_like(q)
    for b, n in enumerate(seq_lens):
        for h in range(n_heads):
            cols = slice((h // group) * head_dim, (h // group + 1) * head_dim)
            k = pool[kv_pages[b, :n, 0].long(), cols]
            v = pool[kv_pages[b, :n, 1].long(), cols]
            scores = (k @ q[b, h]) * sm_scale
            out[b, h] = torch.softmax(scores, dim=0) @ v
    return out


CASES = [
    # (seq_lens, kv_heads, group, head_dim, dtype)
    ([1, 7, 33, 70], 2, 1, 64, torch.float32),
    ([5, 1, 40], 2, 3, 48, torch.float32),
    ([1, 65, 9], 1, 4, 80, torch.float16),
    ([17, 2], 3, 4, 64, torch.float16),
]


@pytest.mark.parametrize("seq_lens,kv_heads,group,head_dim,dtype", CASES)
def test_paged_decode_attention(seq_lens, kv_heads, group, head_dim, dtype):
    rng = np.random.default_rng(sum(seq_lens))
    torch.manual_seed(len(seq_lens))
    pool, kv_pages = make_cache(rng, seq_lens, kv_heads, head_dim, dtype)
    q = torch.randn(len(seq_lens), kv_heads * group, head_dim, dtype=torch.float64).to(dtype)
    sm_scale = 1.0 / math.sqrt(head_dim)
    expected = reference(q, pool, kv_pages, seq_lens, sm_scale)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    args = (q.to(DEVICE), pool.to(DEVICE), kv_pages.to(DEVICE), lens.to(DEVICE), sm_scale)
    for ops in (TRITON, TORCH):
        got = ops.paged_decode_attention(*args)
        assert got.dtype == dtype and got.shape == q.shape
        torch.testing.assert_close(got.double().cpu(), expected, **tol)
    # flash-decoding split (on by itself only for long sequences on a GPU); split 2 of the
    # first case holds no token of its shorter sequences.
    got = decode_attention(*args, num_splits=3)
    torch.testing.assert_close(got.double().cpu(), expected, **tol)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_wide_table_splits_by_row_length(num_splits):
    # A CUDA graph's table is max_model_len wide: each row splits its own length, and rows
    # shorter than the splits (1 token, 64 = one block) leave some splits empty.
    seq_lens = [1, 64, 65, 300, 129]
    rng = np.random.default_rng(num_splits)
    torch.manual_seed(num_splits)
    pool, kv_pages = make_cache(rng, seq_lens, 2, 32, torch.float32, table_len=2048)
    q = torch.randn(len(seq_lens), 4, 32, dtype=torch.float64).float()
    expected = reference(q, pool, kv_pages, seq_lens, 0.2)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    got = decode_attention(q.to(DEVICE), pool.to(DEVICE), kv_pages.to(DEVICE), lens.to(DEVICE),
                           0.2, num_splits=num_splits)
    torch.testing.assert_close(got.double().cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_empty_sequence_gives_zeros(num_splits):
    # Padding rows (seq_len 0, e.g. a CUDA-graph batch padded up) must not produce NaN.
    rng = np.random.default_rng(3)
    pool, kv_pages = make_cache(rng, [4, 0], 2, 16, torch.float32)
    q = torch.randn(2, 4, 16)
    lens = torch.tensor([4, 0], dtype=torch.int32)
    args = (q.to(DEVICE), pool.to(DEVICE), kv_pages.to(DEVICE), lens.to(DEVICE), 0.25)
    expected = reference(q, pool, kv_pages, [4, 0], 0.25)
    triton_out = decode_attention(*args, num_splits=num_splits)
    for got in (triton_out, TORCH.paged_decode_attention(*args)):
        torch.testing.assert_close(got.double().cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("page_width,dtype", [(192, torch.float16), (48, torch.float32)])
def test_write_kv(page_width, dtype):
    n_pages, n_tokens = 40, 6
    perm = torch.randperm(n_pages)
    k_pages = perm[:n_tokens].to(torch.int32)
    v_pages = perm[n_tokens : 2 * n_tokens].to(torch.int32)
    k_pages[2] = -1  # padding token: nothing written
    k = torch.randn(n_tokens, page_width).to(dtype)
    v = torch.randn(n_tokens, page_width).to(dtype)
    poison = torch.full((n_pages, page_width), -7.0, dtype=dtype)
    expected = poison.clone()
    keep = k_pages >= 0
    expected[k_pages[keep].long()] = k[keep]
    expected[v_pages.long()] = v
    for ops in (TRITON, TORCH):
        pool = poison.clone().to(DEVICE)
        ops.write_kv(pool, k.to(DEVICE), v.to(DEVICE), k_pages.to(DEVICE), v_pages.to(DEVICE))
        assert torch.equal(pool.cpu(), expected)


def test_write_kv_into_layer_view():
    # The engine passes pool[l], a view at an offset into the (L, N, P) pool.
    pool = torch.zeros(3, 8, 32, device=DEVICE)
    k = torch.randn(2, 32, device=DEVICE)
    v = torch.randn(2, 32, device=DEVICE)
    pages = torch.tensor([5, 1], dtype=torch.int32, device=DEVICE)
    TRITON.write_kv(pool[1], k, v, pages, pages + 1)
    assert torch.equal(pool[1, 5], k[0]) and torch.equal(pool[1, 2], v[1])
    assert torch.equal(pool[1, 1], k[1]) and torch.equal(pool[1, 6], v[0])
    assert pool[0].abs().sum() == 0 and pool[2].abs().sum() == 0


def test_varlen_prefill_attention_copies_bounds_once_per_step():
    """The varlen prefill path (GPU only) makes the bounds' device copy once per step and a
    new one when the next step's bounds differ. torch's varlen kernel is replaced here by a
    per-request SDPA reading the same cu_seqlens, so a stale copy gives wrong rows."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from slora_backend.model_runner import ModelRunner

    heads, kv_heads, dim = 4, 2, 8
    copies = []

    def varlen(q, k, v, cu, longest, scale, group):
        copies.append(cu)
        out = torch.empty_like(q)
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            ki = k[a:b].repeat_interleave(group, dim=1).transpose(0, 1)
            vi = v[a:b].repeat_interleave(group, dim=1).transpose(0, 1)
            oi = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), ki, vi, is_causal=True, scale=scale)
            out[a:b] = oi.transpose(0, 1)
        return out

    runner = SimpleNamespace(_varlen=varlen, _varlen_bounds=None, sm_scale=dim**-0.5,
                             spec=SimpleNamespace(heads=heads, kv_heads=kv_heads))
    gen = torch.Generator().manual_seed(0)
    for bounds in ([0, 3, 7, 8], [0, 3, 7, 8], [0, 5, 8], [0, 1, 2, 8]):  # step 2 repeats step 1's bounds
        q = torch.randn(8, heads, dim, generator=gen)
        k = torch.randn(8, kv_heads, dim, generator=gen)
        v = torch.randn(8, kv_heads, dim, generator=gen)
        for _ in range(3):  # layers of one step
            got = ModelRunner._varlen_attention(runner, q, k, v, list(bounds))
            assert copies[-1].tolist() == bounds
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            want = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].repeat_interleave(2, dim=1).transpose(0, 1),
                v[a:b].repeat_interleave(2, dim=1).transpose(0, 1), is_causal=True, scale=dim**-0.5)
            torch.testing.assert_close(got[a:b], want.transpose(0, 1))
    # One device copy per distinct run of bounds: steps 1-2 share one, 3 and 4 one each.
    assert len({id(c) for c in copies}) == 3
