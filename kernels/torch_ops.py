"""Pure-torch versions of the kernels, same signatures: the CPU backend of the engine.

LoRA is vectorized two ways, like the kernels: every (module, row) pair of the short
(decode) segments gathers its adapter's A / B^T rows, padded to the largest rank, for one
batched matmul per side; rows of long (prefill) segments are grouped per adapter and use
dense matmuls. No per-token loops.
"""

import torch

# Segments up to this many rows take the per-row gather path.
SHORT_SEGMENT = 4


def _paged_rows(pool_layer, page_ids, start: int, rows: int, width: int) -> torch.Tensor:
    """Dense (rows, width) matrix stored row by row from page_ids[start:]."""
    page_width = pool_layer.shape[1]
    n_chunks = -(-width // page_width)
    pages = page_ids[start : start + rows * n_chunks]
    # index_select: advanced indexing with int32 ids is ~100x slower on CPU.
    return pool_layer.index_select(0, pages).view(rows, n_chunks * page_width)[:, :width]


def _paged_rows_batched(pool_layer, page_ids, starts, ranks, rank_pad: int, n_chunks,
                        max_chunks: int) -> torch.Tensor:
    """(n, rank_pad, max_chunks * P): item i's rows j < ranks[i], each n_chunks[i] pages from
    page_ids[starts[i] + j * n_chunks[i]:]; all other entries zero."""
    dev = starts.device
    j = torch.arange(rank_pad, device=dev)[None, :, None]
    c = torch.arange(max_chunks, device=dev)[None, None, :]
    n_chunks = n_chunks[:, None, None]
    invalid = (j >= ranks[:, None, None]) | (c >= n_chunks)  # (n, R, C)
    slots = starts[:, None, None] + j * n_chunks + c
    slots.masked_fill_(invalid, 0)  # any in-range slot; its rows are zeroed below
    pages = page_ids.index_select(0, slots.view(-1))
    rows = pool_layer.index_select(0, pages).view(*invalid.shape, -1)
    rows.masked_fill_(invalid[..., None], 0)  # in place on the fresh gather: also hides NaN
    return rows.view(len(starts), rank_pad, -1)


def lora_linear(x, weight, pool_layer, batch, module_ids, out_offsets, side=None):
    """x @ weight^T plus the step's LoRA delta (kernels/lora.py: lora_linear); `side` unused."""
    return lora_apply(x, torch.nn.functional.linear(x, weight), pool_layer, batch, module_ids, out_offsets)


def lora_apply(x, y, pool_layer, batch, module_ids, out_offsets):
    """y[:, off_i : off_i + out_i] += scale * (x A_i^T) B_i^T per segment; y updated in place.
    A decode part (LoraBatch.decode) is applied to its rows (views of x and y) like a batch
    of its own."""
    if batch.decode is not None:
        n = batch.decode_start
        lora_apply(x[n:], y[n:], pool_layer, batch.decode, module_ids, out_offsets)
        _lora_rows(x[:n], y[:n], pool_layer, batch, module_ids, out_offsets)
    else:
        _lora_rows(x, y, pool_layer, batch, module_ids, out_offsets)
    return y


def _lora_rows(x, y, pool_layer, batch, module_ids, out_offsets):
    if batch.max_rank == 0 or x.shape[0] == 0:
        return
    bounds = (*out_offsets[1:], y.shape[1])
    widths = [end - off for off, end in zip(out_offsets, bounds, strict=True)]
    starts = batch.seg_starts.tolist()

    short_rows: list[int] = []
    short_adapters: list[int] = []
    long_spans: dict[int, list[tuple[int, int]]] = {}
    for s, a in enumerate(batch.seg_adapter.tolist()):
        begin, end = starts[s], starts[s + 1]
        if a < 0 or end == begin:
            continue
        if end - begin <= SHORT_SEGMENT:
            short_rows.extend(range(begin, end))
            short_adapters.extend([a] * (end - begin))
        else:
            long_spans.setdefault(a, []).append((begin, end))
    if short_rows:
        first, n = short_rows[0], len(short_rows)
        # A plain slice (the usual all-decode batch) avoids a scatter into y.
        rows = slice(first, first + n) if short_rows[-1] == first + n - 1 else short_rows
        _lora_short(x, y, pool_layer, batch, module_ids, out_offsets, widths,
                    rows, torch.tensor(short_adapters, device=x.device))
    if long_spans:
        _lora_long(x, y, pool_layer, batch, module_ids, out_offsets, widths, long_spans)


def _lora_short(x, y, pool_layer, batch, module_ids, out_offsets, widths, rows, adapters):
    """Every (module, row) pair gathers its adapter's rows: one gather + bmm per side."""
    dev = x.device
    page_width = pool_layer.shape[1]
    n_mod, n = len(module_ids), len(adapters)
    mods = torch.tensor(module_ids, device=dev)

    def per_pair(table):  # (7, A) -> (n_mod * n,)
        return table.index_select(0, mods).index_select(1, adapters).reshape(-1)

    ranks = per_pair(batch.ranks)
    rank_pad = int(ranks.max())
    if rank_pad == 0:
        return
    if isinstance(rows, slice):
        xs = x[rows]
    else:
        rows = torch.tensor(rows, device=dev)
        xs = x.index_select(0, rows)
    in_chunks = -(-x.shape[1] // page_width)
    lora_a = _paged_rows_batched(pool_layer, batch.page_ids, per_pair(batch.a_starts), ranks,
                                 rank_pad, torch.full_like(ranks, in_chunks), in_chunks)
    lora_a = lora_a.view(n_mod, n, rank_pad, -1)[..., : x.shape[1]]
    h = torch.matmul(lora_a, xs[:, :, None])  # (n_mod, n, r, 1)
    h = h.view(n_mod * n, 1, rank_pad) * per_pair(batch.scales).to(x.dtype)[:, None, None]

    out_chunks = [-(-w // page_width) for w in widths]
    chunks = torch.tensor(out_chunks, device=dev).repeat_interleave(n)
    lora_bt = _paged_rows_batched(pool_layer, batch.page_ids, per_pair(batch.b_starts), ranks,
                                  rank_pad, chunks, max(out_chunks))
    delta = torch.bmm(h, lora_bt).view(n_mod, n, -1).to(y.dtype)
    for i, (off, width) in enumerate(zip(out_offsets, widths, strict=True)):
        if isinstance(rows, slice):
            y[rows, off : off + width] += delta[i, :, :width]
        else:
            y[:, off : off + width].index_add_(0, rows, delta[i, :, :width])


def _lora_long(x, y, pool_layer, batch, module_ids, out_offsets, widths, spans_of):
    mods = list(module_ids)
    ranks = batch.ranks[mods].tolist()
    scales = batch.scales[mods].tolist()
    a_starts = batch.a_starts[mods].tolist()
    b_starts = batch.b_starts[mods].tolist()
    for a, spans in spans_of.items():
        if len(spans) == 1:
            rows = slice(*spans[0])
        else:
            rows = torch.cat([torch.arange(s, e, device=x.device) for s, e in spans])
        xa = x[rows]
        for i, off in enumerate(out_offsets):
            r = ranks[i][a]
            if r == 0:
                continue
            lora_a = _paged_rows(pool_layer, batch.page_ids, a_starts[i][a], r, x.shape[1])
            lora_bt = _paged_rows(pool_layer, batch.page_ids, b_starts[i][a], r, widths[i])
            delta = (xa @ lora_a.t()) @ lora_bt
            y[rows, off : off + widths[i]] += (delta * scales[i][a]).to(y.dtype)


def write_kv(pool_layer, k, v, k_pages, v_pages):
    """pool_layer[k_pages[t]] = k[t], pool_layer[v_pages[t]] = v[t]; negative pages skipped."""
    for rows, pages in ((k, k_pages), (v, v_pages)):
        keep = pages >= 0
        if not bool(keep.all()):
            rows, pages = rows[keep], pages[keep]
        pool_layer.index_copy_(0, pages.long(), rows.to(pool_layer.dtype))


def paged_decode_attention(q, pool_layer, kv_pages, seq_lens, sm_scale):
    """o[b, h] = softmax(sm_scale * q[b, h] K_b^T) V_b over the first seq_lens[b] tokens."""
    batch, n_heads, head_dim = q.shape
    kv_heads = pool_layer.shape[1] // head_dim
    group = n_heads // kv_heads
    max_len = int(seq_lens.max()) if batch else 0
    if max_len == 0:
        return torch.zeros_like(q)
    # Entries past a sequence's length may hold anything: clamp them to a valid page.
    pages = kv_pages[:, :max_len].clamp(0, pool_layer.shape[0] - 1)
    k = pool_layer.index_select(0, pages[..., 0].reshape(-1)).float()
    v = pool_layer.index_select(0, pages[..., 1].reshape(-1)).float()
    k = k.view(batch, max_len, kv_heads, head_dim)
    v = v.view(batch, max_len, kv_heads, head_dim)
    qg = q.float().view(batch, kv_heads, group, head_dim) * sm_scale
    pad = torch.arange(max_len, device=q.device)[None, None, :] >= seq_lens[:, None, None]
    out = torch.empty_like(qg)
    # One bmm pair per KV head on strided views: an einsum over all heads would first copy
    # K and V into head-major order (4x slower on CPU).
    for h in range(kv_heads):
        scores = torch.bmm(qg[:, h], k[:, :, h].transpose(1, 2)).masked_fill_(pad, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # empty sequences -> zeros
        out[:, h] = torch.bmm(probs, v[:, :, h])
    return out.view(batch, n_heads, head_dim).to(q.dtype)


def rms_norm(x, weight, eps):
    """weight * normalise(x): fp32 statistics, scaled in the model dtype, exactly as HF Llama."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(h, delta, weight, eps):
    """h += delta (in place, in h's dtype, as `h = h + delta`), then rms_norm(h, weight, eps)."""
    h.add_(delta)
    return rms_norm(h, weight, eps)


def apply_rope(x, cos, sin):
    """x: (T, heads, D); cos/sin: (T, 1, D) in x's dtype, half-frequencies repeated (HF)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_write_kv(qkv, cos, sin, pool_layer, k_pages, v_pages, n_heads, kv_heads, head_dim):
    """Rotate q and k of qkv (T, (n_heads + 2 kv_heads) * head_dim) in place with cos/sin
    (T, head_dim) fp32, then write k and v into their pool pages (negative pages skipped)."""
    n_tokens = qkv.shape[0]
    qw, kvw = n_heads * head_dim, kv_heads * head_dim
    cos = cos.to(qkv.dtype)[:, None, :]
    sin = sin.to(qkv.dtype)[:, None, :]
    q = apply_rope(qkv[:, :qw].view(n_tokens, n_heads, head_dim), cos, sin)
    k = apply_rope(qkv[:, qw : qw + kvw].view(n_tokens, kv_heads, head_dim), cos, sin)
    qkv[:, :qw] = q.view(n_tokens, qw)
    qkv[:, qw : qw + kvw] = k.view(n_tokens, kvw)
    write_kv(pool_layer, qkv[:, qw : qw + kvw], qkv[:, qw + kvw :], k_pages, v_pages)


def silu_mul(gate_up):
    """gate_up (T, 2N) -> silu(gate) * up, (T, N)."""
    n = gate_up.shape[1] // 2
    return torch.nn.functional.silu(gate_up[:, :n]) * gate_up[:, n:]
