"""Llama forward pass over the unified pool: base weights in torch, LoRA/KV/attention in kernels/."""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from kernels.lora import GMV_MAX_SEG_LEN, eager_decode_warmups, sm_count
from kernels.lora_batch import ALL_MODULES, LoraBatch, module_bits

from .adapter_cache import AdapterCache
from .checkpoint import BaseWeights, ModelSpec
from .scheduler import ScheduledStep

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    prefill: bool
    input_ids: torch.Tensor  # (T,) int64: tokens computed this step
    positions: torch.Tensor  # (T,) int64
    k_pages: torch.Tensor  # (T,) int32: page receiving each token's K
    v_pages: torch.Tensor  # (T,) int32: page receiving each token's V
    last_rows: torch.Tensor  # (B,) int64: row whose logits are sampled, one per request
    # Rows: each prefill request's tokens, then one row per decoding request (ScheduledStep).
    seq_bounds: list[int]  # (B_prefill+1,) host ints: rows of prefill request b; decode rows follow
    kv_table: torch.Tensor | None  # (B_decode, max_len, 2) int32: K/V pages of every token; None: no decode rows
    seq_lens: torch.Tensor | None  # (B_decode,) int32: tokens in the cache incl. this one
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


def _varlen_attn():
    """torch's variable-length flash attention (torch >= 2.10) as
    f(q, k, v, cu_seqlens, max_len, scale, group) -> (T, H, D), causal; None if absent.
    Its keywords moved between releases (is_causal, then a (-1, 0) window; enable_gqa later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        causal = {"is_causal": True}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    else:
        return None
    native_gqa = "enable_gqa" in params
    takes_scale = "scale" in params  # without it: 1/sqrt(head_dim), the scale Llama uses

    def attend(q, k, v, cu, longest: int, scale: float, group: int):
        extra = dict(causal, scale=scale) if takes_scale else dict(causal)
        if group > 1 and native_gqa:
            extra["enable_gqa"] = True
        elif group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, longest, longest, **extra)

    return attend


def adapter_runs(names: list[str | None]) -> int:
    """Runs of one adapter in row order (base rows count none): the LoRA segments those rows
    form once equal neighbours are joined, as eager_segments joins them."""
    return sum(1 for i, n in enumerate(names) if n is not None and (i == 0 or names[i - 1] != n))


def eager_segments(adapters: list[str | None], bounds: list[int]) -> tuple[list[int], list[str | None], int]:
    """LoRA segments of an eager step's rows: (seg_starts, adapter per segment, max_seg_len).

    Adjacent requests on one adapter form one segment, so its weights are read once. The
    length bound is at least GMV_MAX_SEG_LEN + 1: these rows take the MBGMM kernels (an upper
    bound is safe, rows past a segment's end are masked), whose variants are compiled at
    start-up (ModelRunner.warm_up_eager). The MBGMV kernels serve the decode graphs and the
    decode part of mixed steps (LoraBatch.decode), whose segments are one row each.
    """
    seg_starts, seg_names = [0], []
    for i, name in enumerate(adapters):
        if seg_names and seg_names[-1] == name:
            seg_starts[-1] = bounds[i + 1]
        else:
            seg_names.append(name)
            seg_starts.append(bounds[i + 1])
    longest = max(b - a for a, b in zip(seg_starts[:-1], seg_starts[1:], strict=True))
    return seg_starts, seg_names, max(longest, GMV_MAX_SEG_LEN + 1)


def warmup_inputs(spec: ModelSpec, page_width: int, device, rows: int, rank: int, tp_size: int = 1,
                  decode_width: int = 0, decode_rows: int = 1, decode_rank: int = 0) -> StepInputs:
    """An eager step that computes nothing that stays and launches what a real one of that
    shape launches: a prefill of `rows` tokens, with (rank > 0) one adapter of `rank` on all
    seven modules; with decode_width > 0, `decode_rows` decode rows whose KV table is that many
    tokens wide (all page 0, length 1), with (decode_rank > 0) their LoRA on the MBGMV kernels
    (LoraBatch.decode, an adapter of that rank on all seven modules). Every row of the
    adapters' A and B^T is on page 0, scales 0; KV writes are skipped (negative pages)."""
    s, dev = spec, device
    n_dec = decode_rows if decode_width else 0
    assert n_dec or not decode_rank, "a decode LoRA rank needs decode rows (decode_width > 0)"
    lora = None
    if rank or decode_rank:
        widest = max(s.hidden, s.q_width, 2 * s.intermediate)
        zeros = torch.zeros(7, 2, dtype=torch.int32, device=dev)
        # Adapter 0 is the prompt's, adapter 1 the decode rows'.
        lora = LoraBatch(seg_starts=torch.tensor([0, rows], dtype=torch.int32, device=dev),
                         seg_adapter=torch.tensor([0 if rank else -1], dtype=torch.int32, device=dev),
                         ranks=torch.tensor([[rank, decode_rank]] * 7, dtype=torch.int32, device=dev),
                         scales=torch.zeros(7, 2, dtype=torch.float32, device=dev), a_starts=zeros,
                         b_starts=zeros.clone(),
                         page_ids=torch.zeros(2 * max(rank, decode_rank) * tp_size * -(-widest // page_width),
                                              dtype=torch.int32, device=dev),
                         max_rank=rank, max_seg_len=rows, modules=ALL_MODULES)
        if decode_rank:
            lora.decode = replace(lora, seg_starts=torch.arange(n_dec + 1, dtype=torch.int32, device=dev),
                                  seg_adapter=torch.ones(n_dec, dtype=torch.int32, device=dev),
                                  max_rank=decode_rank, max_seg_len=1, eager_decode=True)
            lora.decode_start = rows
    total = rows + n_dec
    skip = torch.full((total,), -1, dtype=torch.int32, device=dev)
    positions = torch.arange(total, device=dev)
    positions[rows:] = 0
    return StepInputs(prefill=True, input_ids=torch.zeros(total, dtype=torch.int64, device=dev),
                      positions=positions, k_pages=skip, v_pages=skip.clone(),
                      last_rows=torch.arange(rows - 1, total, device=dev), seq_bounds=[0, rows],
                      kv_table=torch.zeros(n_dec, decode_width, 2, dtype=torch.int32, device=dev) if n_dec else None,
                      seq_lens=torch.ones(n_dec, dtype=torch.int32, device=dev) if n_dec else None,
                      lora=lora)


def lora_groups(spec: ModelSpec) -> list[tuple[int, int, bool]]:
    """(modules, input width, split by output columns under tensor parallelism) of the
    forward's LoRA points (run_layers): q,k,v; o; gate,up; down."""
    return [(3, spec.hidden, True), (1, spec.q_width, False), (2, spec.hidden, True), (1, spec.intermediate, False)]


def eager_warmup_steps(spec: ModelSpec, page_width: int, dtype, ranks: list[int], max_decode_rows: int = 0,
                       sms: int = 0, tp_size: int = 1) -> list[dict]:
    """warmup_inputs arguments of the start-up steps (ModelRunner.warm_up_eager) on a GPU of
    `sms` SMs: a LoRA prefill per (MBGMM row block, rank bucket); a decode row beside a prefill
    per attention split count (powers of two: paged_attention._num_splits); with
    max_decode_rows, decode rows on the MBGMV kernels beside a prefill per (rank bucket, K
    splits) that up to that many of them can take (kernels/lora.py: eager_decode_warmups). With
    tensor parallelism `spec` is one rank's shape and `tp_size` the ranks."""
    steps = [dict(rows=rows, rank=rank) for rank in ranks for rows in (16, 64)]  # lora.py: row blocks
    steps += [dict(rows=16, rank=0, decode_width=128 * split) for split in (1, 2, 4, 8, 16)]
    if max_decode_rows:
        plan = eager_decode_warmups(lora_groups(spec), page_width, dtype, ranks, max_decode_rows, sms, tp_size)
        steps += [dict(rows=16, rank=0, decode_width=8, decode_rows=rows, decode_rank=rank) for rank, rows in plan]
    return steps


class ModelRunner:
    def __init__(self, spec: ModelSpec, weights: BaseWeights, pool: torch.Tensor, ops,
                 max_model_len: int, tp=None, lora_decode_rows_gmv: bool = False, gmv_min_segments: int = 1,
                 lora_beside_gemm: bool = False):
        """With tensor parallelism `spec` is this rank's shape (tensor_parallel.local_spec),
        `weights` and `pool` its shards, and `tp` its tensor_parallel.TPGroup; None = one GPU.
        lora_decode_rows_gmv: the decode rows of eager steps run their LoRA on the MBGMV
        kernels (LoraBatch.decode; EngineConfig.lora_decode_rows_gmv) when they form at least
        gmv_min_segments adapter segments (EngineConfig.lora_decode_gmv_min_segments).
        lora_beside_gemm: in decode graphs on one GPU, each LoRA point's shrink runs on a side
        stream beside its base GEMM (EngineConfig.lora_beside_gemm; kernels/lora.py: lora_linear)."""
        self.spec, self.w, self.pool, self.ops = spec, weights, pool, ops
        self.tp = tp
        # With tensor parallelism too: both parts write one intermediate, so a LoRA point keeps
        # one collective (tensor_parallel.TPLoraStep).
        self.lora_decode_rows_gmv = lora_decode_rows_gmv
        self.gmv_min_segments = gmv_min_segments
        self.decode_part_steps = 0  # eager steps whose decode rows took the MBGMV kernels (benchmarks)
        self.tp_graphs = None  # tp_graphs.TPDecodeGraphs, set once captured
        self.device, self.dtype = pool.device, pool.dtype
        self.lora_side_stream = (torch.cuda.Stream(self.device)
                                 if lora_beside_gemm and self.device.type == "cuda" and tp is None else None)
        self.max_model_len = max_model_len
        inv = rope_inv_freq(spec)
        freqs = torch.outer(torch.arange(max_model_len, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.device)  # (max_model_len, D) fp32
        self.sin = emb.sin().to(self.device)
        self.sm_scale = 1.0 / math.sqrt(spec.head_dim)
        self._varlen = _varlen_attn()  # None: per-request attention (CPU, or an older torch)
        self._varlen_bounds = None  # the current step's (bounds, their int32 device copy, longest request)
        s = spec
        self.qkv_offsets = (0, s.q_width, s.q_width + s.kv_width)
        self.gate_up_offsets = (0, s.intermediate)

    # -- inputs --------------------------------------------------------------------------
    def prepare(self, step: ScheduledStep, adapters: AdapterCache) -> StepInputs:
        """A step's rows as device tensors: every token of each prefill request, then one row
        per decoding request (a decode step has only those).

        Every host-to-device copy is non_blocking: a blocking one waits for the whole stream,
        i.e. for the step still running on the GPU (Engine's overlap). The sources are pageable,
        which CUDA stages before the call returns, so they may be freed right after.
        """
        dev = self.device

        def put(a) -> torch.Tensor:
            return torch.as_tensor(a).to(dev, non_blocking=True)

        reqs = step.requests
        pre = step.prefills
        dec = reqs[len(pre) :]
        ids, positions, pages = [], [], []
        if pre:
            ids = [t for r in pre for t in r.all_ids]
            positions.append(np.concatenate([np.arange(r.seq_len) for r in pre]))
            pages.append(np.concatenate([r.kv_pages.array for r in pre]))  # K0 V0 K1 V1 ... per request
        kv_table = seq_lens = None
        if dec:
            lens = np.array([r.seq_len for r in dec], dtype=np.int64)
            ids += [r.last_id for r in dec]
            positions.append(lens - 1)
            table = np.zeros((len(dec), 2 * self.decode_table_width(int(lens.max()))), dtype=np.int32)
            for i, r in enumerate(dec):
                table[i, : len(r.kv_pages)] = r.kv_pages.array
            pages.append(table[np.arange(len(dec))[:, None], (2 * lens - 2)[:, None] + (0, 1)].reshape(-1))
            kv_table = put(table).view(len(dec), -1, 2)
            seq_lens = put(lens.astype(np.int32))
        bounds = np.cumsum([0] + [r.seq_len for r in pre] + [1] * len(dec)).tolist()  # rows of each request
        pages = np.concatenate(pages)
        return StepInputs(
            prefill=step.prefill,
            input_ids=put(np.array(ids, dtype=np.int64)),
            positions=put(np.concatenate(positions)),
            k_pages=put(pages[0::2].copy()),
            v_pages=put(pages[1::2].copy()),
            last_rows=put(np.array(bounds[1:], dtype=np.int64) - 1),
            seq_bounds=bounds[: len(pre) + 1],
            kv_table=kv_table,
            seq_lens=seq_lens,
            lora=self._lora_tables(reqs, len(pre), bounds, adapters),
        )

    def _lora_tables(self, reqs, n_prefill: int, bounds: list[int], adapters: AdapterCache) -> LoraBatch | None:
        names = [r.adapter for r in reqs]
        if all(n is None for n in names):
            return None
        decode_names = names[n_prefill:]
        if self.lora_decode_rows_gmv and n_prefill and adapter_runs(decode_names) >= max(1, self.gmv_min_segments):
            # Prompt rows on MBGMM segments, decode rows on the MBGMV kernels (LoraBatch.decode).
            self.decode_part_steps += 1
            return adapters.build_lora_batch(*eager_segments(names[:n_prefill], bounds[: n_prefill + 1]),
                                             decode_names=decode_names)
        return adapters.build_lora_batch(*eager_segments(names, bounds))

    @staticmethod
    def decode_table_width(longest: int) -> int:
        """Tokens per row of an eager step's KV table: rounded up to 8, so that the attention
        kernel's row stride is a multiple of 16 elements whatever the lengths (one compiled
        variant: kernels/launch.py)."""
        return -(-longest // 8) * 8

    # -- start-up ------------------------------------------------------------------------
    def warm_up_eager(self, ranks: list[int], max_decode_rows: int = 0) -> int:
        """Compile, before serving, every kernel variant an eager step can need (kernels/launch.py):
        the steps of eager_warmup_steps, the MBGMV decode rows' ones when lora_decode_rows_gmv
        (max_decode_rows: the most running requests). Nothing is written (warmup_inputs).
        Returns the forwards run; with tensor parallelism every rank runs them (forward shares
        the inputs)."""
        size = 1 if self.tp is None else self.tp.size
        page = self.pool.shape[-1]
        steps = eager_warmup_steps(self.spec, page, self.dtype, ranks,
                                   max_decode_rows if self.lora_decode_rows_gmv else 0, sm_count(self.device), size)
        for kw in steps:
            self.forward(warmup_inputs(self.spec, page, self.device, tp_size=size, **kw))
        return len(steps)

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
        # While a decode graph is captured, LoRA shrinks run beside the base GEMMs on a side
        # stream (kernels/lora.py: lora_linear); eager steps keep one stream.
        side = self.lora_side_stream
        if side is not None and not torch.cuda.is_current_stream_capturing():
            side = None
        x = ops.rms_norm(h, layers[0].input_norm, eps)
        for layer, w in enumerate(layers):
            pool = self.pool[layer]
            if qkv_lora and tp_lora is None:
                qkv = ops.lora_linear(x, w.qkv, pool, lora, (0, 1, 2), self.qkv_offsets, side)
            else:
                qkv = F.linear(x, w.qkv)
            if qkv_lora and tp_lora is not None:
                tp.lora_column(x, qkv, pool, tp_lora, (0, 1, 2), self.qkv_offsets)
            # q and k rotated in place in qkv; k and v written to their pages.
            ops.rope_write_kv(qkv, cos, sin, pool, inp.k_pages, inp.v_pages,
                              s.heads, s.kv_heads, s.head_dim)
            q = qkv[:, :qw].view(T, s.heads, s.head_dim)
            if inp.prefill:
                n = inp.seq_bounds[-1]  # prefill rows; decode rows (if any) follow
                k = qkv[:n, qw : qw + kvw].view(n, s.kv_heads, s.head_dim)
                v = qkv[:n, qw + kvw :].view(n, s.kv_heads, s.head_dim)
                attn = self._prefill_attention(q[:n], k, v, inp.seq_bounds)
                if n < T:
                    attn = torch.cat([attn, ops.paged_decode_attention(q[n:], pool, inp.kv_table, inp.seq_lens,
                                                                       self.sm_scale)])
            else:
                attn = ops.paged_decode_attention(q, pool, inp.kv_table, inp.seq_lens, self.sm_scale)
            attn = attn.reshape(T, qw)
            if o_lora and tp_lora is None:
                o = ops.lora_linear(attn, w.o, pool, lora, (3,), (0,), side)
            else:
                o = F.linear(attn, w.o)
            if o_lora and tp_lora is not None:
                tp.lora_row(attn, o, pool, tp_lora, 3)
            if tp is not None:
                tp.all_reduce(o)
            x = ops.add_rms_norm(h, o, w.post_norm, eps)  # h += o
            if gate_up_lora and tp_lora is None:
                gate_up = ops.lora_linear(x, w.gate_up, pool, lora, (4, 5), self.gate_up_offsets, side)
            else:
                gate_up = F.linear(x, w.gate_up)
            if gate_up_lora and tp_lora is not None:
                tp.lora_column(x, gate_up, pool, tp_lora, (4, 5), self.gate_up_offsets)
            act = ops.silu_mul(gate_up)
            if down_lora and tp_lora is None:
                down = ops.lora_linear(act, w.down, pool, lora, (6,), (0,), side)
            else:
                down = F.linear(act, w.down)
            if down_lora and tp_lora is not None:
                tp.lora_row(act, down, pool, tp_lora, 6)
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
        if q.is_cuda and self._varlen is not None and len(bounds) > 2:
            try:
                return self._varlen_attention(q, k, v, bounds)
            except (RuntimeError, TypeError, ValueError) as e:  # this torch lacks or refuses it
                log.warning("varlen flash attention unavailable (%s); prefill attention per request", e)
                self._varlen = None
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

    def _varlen_attention(self, q, k, v, bounds: list[int]) -> torch.Tensor:
        """All requests of the step in one flash-attention call (the per-request loop costs
        ~6 launches per request and layer: host time an eager step cannot hide)."""
        # Every layer of a step passes the same bounds: their device copy is made once per step,
        # not once per layer (a host tensor and an H2D copy each, 32-80 per step).
        if self._varlen_bounds is None or self._varlen_bounds[0] != bounds:
            cu = torch.tensor(bounds, dtype=torch.int32).to(q.device, non_blocking=True)
            self._varlen_bounds = (list(bounds), cu,
                                   max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)))
        _, cu, longest = self._varlen_bounds
        return self._varlen(q, k, v, cu, longest, self.sm_scale, self.spec.heads // self.spec.kv_heads)
