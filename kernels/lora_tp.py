"""LoRA shrink and expand as two separate steps, for tensor parallelism.

Single-GPU LoRA (`lora_apply`) runs shrink and expand back to back. Under tensor parallelism
(slora_backend/tensor_parallel.py) the small `(T, modules, rank)` intermediate crosses the
GPUs between them (all-gather or all-reduce), so the two halves are exposed here:

    tmp = shrink(x, pool_layer, batch, module_ids, out=None)   # (T, NMOD, batch.max_rank) fp32
    ... collective on tmp ...
    expand(y, tmp, pool_layer, batch, module_ids, out_offsets, widths)

`tmp` entries of rows without an adapter, or past a module's rank, are undefined (never read
by expand). `out`, when given, is a (T, NMOD, W >= batch.max_rank) fp32 block of rows to
write instead (a step's kernel paths share one intermediate: tensor_parallel.TPLoraStep).
The Triton versions call the existing launchers (kernels/lora_shrink.py,
kernels/lora_expand.py) with the configuration lora.py would pick; the torch versions are the
CPU twins. `get_tp_lora_ops(backend)` returns the pair.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .lora import _group_table  # one table per distinct group, shared with lora_apply


# -- Triton ------------------------------------------------------------------------------
def _shrink_out(x, batch, n_mod: int, out) -> torch.Tensor:
    if out is None:
        return torch.empty((x.shape[0], n_mod, batch.max_rank), dtype=torch.float32, device=x.device)
    assert out.shape[:2] == (x.shape[0], n_mod) and out.shape[2] >= batch.max_rank and out.is_contiguous()
    return out


def shrink_triton(x, pool_layer, batch, module_ids, out=None) -> torch.Tensor:
    """(T, NMOD, batch.max_rank) fp32 (or `out`): x @ A^T of every row's adapter, per module slot."""
    from .lora import step_config
    from .lora_shrink import lora_shrink

    n_mod, n_rows = len(module_ids), x.shape[0]
    page_width = pool_layer.shape[1]
    assert x.stride(1) == 1 and x.dtype == pool_layer.dtype
    out = _shrink_out(x, batch, n_mod, out)
    cfg = step_config(batch, n_mod, page_width, x.shape[1], x.dtype, x.device)
    # K-split partial sums are added here, so the collective moves one plane.
    tmp = out.unsqueeze(0) if cfg.split_k == 1 else out.new_empty((cfg.split_k, *out.shape))
    if n_rows:
        group = _group_table(module_ids, [0] * n_mod, [0] * n_mod, x.device)  # shrink reads the module only
        lora_shrink(x, tmp, pool_layer, batch, group, cfg)
    if cfg.split_k > 1:
        torch.sum(tmp, 0, out=out)
    return out


def expand_triton(y, tmp, pool_layer, batch, module_ids, out_offsets, widths) -> None:
    """y[:, off_i : off_i + width_i] += scale * tmp[:, i, :rank] @ B^T, in place."""
    from .lora import pick_config
    from .lora_expand import lora_expand

    if y.shape[0] == 0:
        return
    assert y.stride(1) == 1 and tmp.is_contiguous() and tmp.shape[-1] <= batch.max_rank
    # Chosen once per step (every layer asks the same), like step_config for the shrink.
    key = ("expand", pool_layer.shape[1], tmp.shape[-1], y.dtype)
    cfg = batch.configs.get(key)
    if cfg is None:
        cfg = batch.configs[key] = pick_config(batch.max_seg_len, batch.max_rank, pool_layer.shape[1],
                                               tmp.shape[-1], y.dtype)
    group = _group_table(module_ids, out_offsets, widths, y.device)
    lora_expand(y, tmp.unsqueeze(0), pool_layer, batch, group, max(widths), cfg)


# -- torch (CPU) -------------------------------------------------------------------------
def _paged_rows(pool_layer, page_ids, start: int, rows: int, width: int) -> torch.Tensor:
    """Dense (rows, width) matrix stored row by row from page_ids[start:]."""
    page_width = pool_layer.shape[1]
    n_chunks = -(-width // page_width)
    pages = page_ids[start : start + rows * n_chunks]
    return pool_layer.index_select(0, pages).view(rows, n_chunks * page_width)[:, :width]


def _rows_by_adapter(batch) -> dict[int, torch.Tensor]:
    """Row indices of every adapter of the step (segments of one adapter joined)."""
    starts = batch.seg_starts.tolist()
    spans: dict[int, list[torch.Tensor]] = {}
    for s, a in enumerate(batch.seg_adapter.tolist()):
        if a >= 0 and starts[s + 1] > starts[s]:
            spans.setdefault(a, []).append(torch.arange(starts[s], starts[s + 1]))
    return {a: torch.cat(parts).to(batch.seg_starts.device) for a, parts in spans.items()}


def shrink_torch(x, pool_layer, batch, module_ids, out=None) -> torch.Tensor:
    tmp = _shrink_out(x, batch, len(module_ids), out).zero_()
    ranks, a_starts = batch.ranks.tolist(), batch.a_starts.tolist()
    for a, rows in _rows_by_adapter(batch).items():
        xa = x.index_select(0, rows)
        for i, m in enumerate(module_ids):
            r = ranks[m][a]
            if r:
                lora_a = _paged_rows(pool_layer, batch.page_ids, a_starts[m][a], r, x.shape[1])
                tmp[rows, i, :r] = (xa @ lora_a.t()).float()
    return tmp


def expand_torch(y, tmp, pool_layer, batch, module_ids, out_offsets, widths) -> None:
    ranks, b_starts, scales = batch.ranks.tolist(), batch.b_starts.tolist(), batch.scales.tolist()
    for a, rows in _rows_by_adapter(batch).items():
        for i, (m, off, width) in enumerate(zip(module_ids, out_offsets, widths, strict=True)):
            r = ranks[m][a]
            if r:
                lora_bt = _paged_rows(pool_layer, batch.page_ids, b_starts[m][a], r, width)
                delta = (tmp[rows, i, :r] @ lora_bt.float()) * scales[m][a]
                y[rows, off : off + width] += delta.to(y.dtype)


def get_tp_lora_ops(backend: str) -> SimpleNamespace:
    if backend == "triton":
        return SimpleNamespace(shrink=shrink_triton, expand=expand_triton)
    if backend == "torch":
        return SimpleNamespace(shrink=shrink_torch, expand=expand_torch)
    raise ValueError(f"unknown kernel backend {backend!r} (expected 'triton' or 'torch')")
