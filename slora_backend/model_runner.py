"""Llama forward pass over the unified pool: base weights in torch, LoRA/KV/attention in kernels/."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kernels.lora_batch import LoraBatch, module_bits

from .adapter_cache import AdapterCache
from .checkpoint import BaseWeights, ModelSpec
from .scheduler import ScheduledStep


@dataclass
class StepInputs:
    prefill: bool
    input_ids: torch.Tensor  # (T,) int64: tokens computed this step
    positions: torch.Tensor  # (T,) int64
    k_pages: torch.Tensor  # (T,) int32: page receiving each token's K
    v_pages: torch.Tensor  # (T,) int32: page receiving each token's V
    last_rows: torch.Tensor  # (B,) int64: row whose logits are sampled, one per request
    seq_bounds: list[int]  # (B+1,) host ints, prefill only: rows of request b
    kv_table: torch.Tensor | None  # (B, max_len, 2) int32, decode only: K/V pages of every token
    seq_lens: torch.Tensor | None  # (B,) int32, decode only: tokens in the cache incl. this one
    lora: LoraBatch | None  # None when no request in the step uses an adapter


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = spec.rope_scaling
    if scaling is None:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)


class ModelRunner:
    def __init__(self, spec: ModelSpec, weights: BaseWeights, pool: torch.Tensor, ops,
                 max_model_len: int, tp=None):
        """With tensor parallelism `spec` is this rank's shape (tensor_parallel.local_spec),
        `weights` and `pool` its shards, and `tp` its tensor_parallel.TPGroup; None = one GPU."""
        self.spec, self.w, self.pool, self.ops = spec, weights, pool, ops
        self.tp = tp
        self.tp_graphs = None  # tp_graphs.TPDecodeGraphs, set once captured
        self.device, self.dtype = pool.device, pool.dtype
        self.max_model_len = max_model_len
        inv = rope_inv_freq(spec)
        freqs = torch.outer(torch.arange(max_model_len, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.device)  # (max_model_len, D) fp32
        self.sin = emb.sin().to(self.device)
        self.sm_scale = 1.0 / math.sqrt(spec.head_dim)
        s = spec
        self.qkv_offsets = (0, s.q_width, s.q_width + s.kv_width)
        self.gate_up_offsets = (0, s.intermediate)

    # -- inputs --------------------------------------------------------------------------
    def prepare(self, step: ScheduledStep, adapters: AdapterCache) -> StepInputs:
        dev = self.device
        reqs = step.requests
        if step.prefill:
            ids = [t for r in reqs for t in r.all_ids]
            positions = np.concatenate([np.arange(r.seq_len) for r in reqs])
            pages = np.concatenate([r.kv_pages.array for r in reqs])  # K0 V0 K1 V1 ... per request
            bounds = np.cumsum([0] + [r.seq_len for r in reqs]).tolist()
            kv_table = seq_lens = None
        else:
            lens = np.array([r.seq_len for r in reqs], dtype=np.int64)
            ids = [r.last_id for r in reqs]
            positions = lens - 1
            table = np.zeros((len(reqs), int(lens.max()) * 2), dtype=np.int32)
            for i, r in enumerate(reqs):
                table[i, : len(r.kv_pages)] = r.kv_pages.array
            pages = table[np.arange(len(reqs))[:, None], (2 * positions)[:, None] + (0, 1)].reshape(-1)
            bounds = list(range(len(reqs) + 1))
            kv_table = torch.from_numpy(table).view(len(reqs), -1, 2).to(dev)
            seq_lens = torch.from_numpy(lens.astype(np.int32)).to(dev)
        return StepInputs(
            prefill=step.prefill,
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.from_numpy(np.asarray(positions, dtype=np.int64)).to(dev),
            k_pages=torch.from_numpy(pages[0::2].copy()).to(dev),
            v_pages=torch.from_numpy(pages[1::2].copy()).to(dev),
            last_rows=torch.tensor([b - 1 for b in bounds[1:]], dtype=torch.int64, device=dev),
            seq_bounds=bounds,
            kv_table=kv_table,
            seq_lens=seq_lens,
            lora=self._lora_tables(reqs, bounds, adapters),
        )

    @staticmethod
    def _lora_tables(reqs, bounds: list[int], adapters: AdapterCache) -> LoraBatch | None:
        if all(r.adapter is None for r in reqs):
            return None
        # Adjacent requests on one adapter form one segment, so its weights are read once.
        seg_starts, seg_names = [0], []
        for i, r in enumerate(reqs):
            if seg_names and seg_names[-1] == r.adapter:
                seg_starts[-1] = bounds[i + 1]
            else:
                seg_names.append(r.adapter)
                seg_starts.append(bounds[i + 1])
        longest = max(b - a for a, b in zip(seg_starts[:-1], seg_starts[1:], strict=True))
        return adapters.build_lora_batch(seg_starts, seg_names, longest)

    # -- forward -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, inp: StepInputs) -> torch.Tensor | None:
        """Logits (B, vocab) in fp32 for the last row of every request (None on TP workers).

        Elementwise work goes through fused ops (RMSNorm with the residual add before it,
        RoPE with the KV write, SwiGLU); the torch backend's twins round exactly as HF does.
        """
        tp = self.tp
        if tp is not None:
            tp.share_inputs(inp)  # rank 0: every worker runs this same step
            if self.tp_graphs is not None and self.tp_graphs.covers(inp):
                return self.tp_graphs.run_inputs(inp)
        return self.run_layers(inp)

    @torch.inference_mode()
    def run_layers(self, inp: StepInputs) -> torch.Tensor | None:
        s, ops, lora, tp = self.spec, self.ops, inp.lora, self.tp
        # Tensor parallel: shards of each projection, sharded LoRA (tensor_parallel.py), and
        # an all-reduce completing o and down (base and LoRA alike).
        tp_lora = tp.lora_step(lora) if tp is not None and lora is not None else None
        # LoRA points no adapter of the step targets are skipped (on every rank alike).
        mods = 0 if lora is None else lora.modules
        qkv_lora, o_lora = bool(mods & module_bits((0, 1, 2))), bool(mods & module_bits((3,)))
        gate_up_lora, down_lora = bool(mods & module_bits((4, 5))), bool(mods & module_bits((6,)))
        T = inp.input_ids.shape[0]
        h = self.w.embed[inp.input_ids]
        cos = self.cos[inp.positions]  # (T, D) fp32
        sin = self.sin[inp.positions]
        qw, kvw, eps = s.q_width, s.kv_width, s.rms_eps
        layers = self.w.layers
        x = ops.rms_norm(h, layers[0].input_norm, eps)
        for layer, w in enumerate(layers):
            pool = self.pool[layer]
            qkv = F.linear(x, w.qkv)
            if qkv_lora and tp_lora is not None:
                tp.lora_column(x, qkv, pool, tp_lora, (0, 1, 2), self.qkv_offsets)
            elif qkv_lora:
                ops.lora_apply(x, qkv, pool, lora, (0, 1, 2), self.qkv_offsets)
            # q and k rotated in place in qkv; k and v written to their pages.
            ops.rope_write_kv(qkv, cos, sin, pool, inp.k_pages, inp.v_pages,
                              s.heads, s.kv_heads, s.head_dim)
            q = qkv[:, :qw].view(T, s.heads, s.head_dim)
            if inp.prefill:
                k = qkv[:, qw : qw + kvw].view(T, s.kv_heads, s.head_dim)
                v = qkv[:, qw + kvw :].view(T, s.kv_heads, s.head_dim)
                attn = self._prefill_attention(q, k, v, inp.seq_bounds)
            else:
                attn = ops.paged_decode_attention(q, pool, inp.kv_table, inp.seq_lens, self.sm_scale)
            attn = attn.reshape(T, qw)
            o = F.linear(attn, w.o)
            if o_lora and tp_lora is not None:
                tp.lora_row(attn, o, pool, tp_lora, 3)
            elif o_lora:
                ops.lora_apply(attn, o, pool, lora, (3,), (0,))
            if tp is not None:
                tp.all_reduce(o)
            x = ops.add_rms_norm(h, o, w.post_norm, eps)  # h += o
            gate_up = F.linear(x, w.gate_up)
            if gate_up_lora and tp_lora is not None:
                tp.lora_column(x, gate_up, pool, tp_lora, (4, 5), self.gate_up_offsets)
            elif gate_up_lora:
                ops.lora_apply(x, gate_up, pool, lora, (4, 5), self.gate_up_offsets)
            act = ops.silu_mul(gate_up)
            down = F.linear(act, w.down)
            if down_lora and tp_lora is not None:
                tp.lora_row(act, down, pool, tp_lora, 6)
            elif down_lora:
                ops.lora_apply(act, down, pool, lora, (6,), (0,))
            if tp is not None:
                tp.all_reduce(down)
            if layer + 1 < len(layers):
                x = ops.add_rms_norm(h, down, layers[layer + 1].input_norm, eps)  # h += down
            else:
                h += down
        if tp is not None and not tp.is_leader:
            return None  # only rank 0 samples
        last = ops.rms_norm(h[inp.last_rows], self.w.norm, eps)
        return F.linear(last, self.w.lm_head).float()

    def _prefill_attention(self, q, k, v, bounds: list[int]) -> torch.Tensor:
        """Causal attention over each request's own tokens (prefill always starts at 0)."""
        s = self.spec
        group = s.heads // s.kv_heads
        out = torch.empty_like(q)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            qi = q[a:b].transpose(0, 1)  # (H, n, D)
            ki = k[a:b].transpose(0, 1).repeat_interleave(group, dim=0)
            vi = v[a:b].transpose(0, 1).repeat_interleave(group, dim=0)
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=self.sm_scale)
            out[a:b] = oi.transpose(0, 1)
        return out
