"""Kernel micro-benchmarks (issue 4) on the GPU: LoRA shrink+expand, paged decode attention and
the fused elementwise ops, each against a torch reference and its byte floor.

    python benchmarks/kernel_bench.py [--out benchmarks/results] [--reps 50]
    python benchmarks/kernel_bench.py --sweep [--quick]  # block shapes -> kernel_sweep*.json and
                                                         # lora_tuning.json ($SLORA_LORA_TUNING)
    python benchmarks/kernel_bench.py --mixed  # a mixed step's q,k,v LoRA point -> kernel_mixed.json

Shapes are Llama-2-7B's: hidden 4096, page width P = 32 KV heads x 128 = 4096, bf16.
* LoRA decode: one 4096->4096 projection (q_proj), B in {1, 16, 64, 256} tokens, each on its
  own adapter, ranks 8/16/32/64 or the S2 mix (64, 32, 16, 8 in turn); one segment per row and
  max_rank = the rank bucket, as in a CUDA-graph decode step. LoRA prefill: 16 segments x 256
  tokens, S2 ranks. Adapter rows sit on shuffled pool pages. Reference: torch gather + bmm
  (the page rows gathered padded to the largest rank, two batched matmuls).
* Byte floor: bytes that must move (every adapter's A and B^T once at its true rank, x read,
  y read and written) over the measured device-to-device copy bandwidth (bytes read + written
  per second); `bw_fraction` = floor / time.
* LoRA in a mixed step (--mixed): the q,k,v point (4096 -> 3 x 4096) of a step with 4 prompt
  segments x 256 tokens and D in {64, 171, 256} decode rows, every segment and row on its own S2
  adapter: the old path (every row in MBGMM segments) against the split one (prompt rows MBGMM,
  decode rows MBGMV: LoraBatch.decode), outputs compared. On CPU (Triton's interpreter) it runs
  at tiny sizes as a smoke test, timed by the wall clock.
* Timing (METHOD.md): each case is captured in a CUDA graph and replayed `--reps` times; before
  every replay a 256 MiB buffer is written (L2 flush), outside the timed events; median.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import LoraBatch, get_ops  # noqa: E402

log = logging.getLogger("kernel_bench")

HIDDEN, P, HEAD_DIM, N_HEADS, KV_HEADS, INTER = 4096, 4096, 128, 32, 32, 11008
S2 = (64, 32, 16, 8)
DTYPE = torch.bfloat16
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: smoke tests only


# -- timing -------------------------------------------------------------------------------
def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second (median of 10)."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * (2 << 30) / statistics.median(times)


class Timer:
    """Median time of fn replayed from a CUDA graph, L2 flushed before every replay."""

    def __init__(self, reps: int):
        self.reps = reps
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)

    def __call__(self, fn, warmup: int = 2) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]
        for start, end in events:
            self.flush.zero_()
            start.record()
            graph.replay()
            end.record()
        torch.cuda.synchronize()
        del graph
        return statistics.median(s.elapsed_time(e) / 1e3 for s, e in events)


class WallTimer:
    """Median wall time of fn (CPU smoke runs: Triton's interpreter, nothing to flush)."""

    def __init__(self, reps: int):
        self.reps = reps

    def __call__(self, fn, warmup: int = 1) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# -- LoRA cases ---------------------------------------------------------------------------
def rank_bucket(r: int) -> int:
    b = 8
    while b < r:
        b *= 2
    return b


class LoraCase:
    """One projection (module 0, 4096 -> 4096); segment s on adapter s with rank ranks[s]."""

    def __init__(self, seg_lens, ranks, seed=0):
        self.seg_lens, self.ranks = list(seg_lens), list(ranks)
        n_seg, n_rows = len(seg_lens), sum(seg_lens)
        g = torch.Generator(device=DEV).manual_seed(seed)
        needed = 2 * sum(ranks)  # in = out = P: one page per A row and per B^T row
        n_pages = 2 * needed + 1
        self.pool = (torch.randn(n_pages, P, generator=g, device=DEV) * 0.02).to(DTYPE)
        self.zero_page = n_pages - 1
        self.pool[self.zero_page] = 0
        rng = np.random.default_rng(seed)
        page_ids = rng.permutation(n_pages - 1)[:needed].astype(np.int32)
        table = np.zeros((3, 7, n_seg), np.int32)
        offset = 0
        a_idx = np.full((n_seg, rank_bucket(max(ranks))), self.zero_page, np.int64)
        b_idx = a_idx.copy()
        for a, r in enumerate(ranks):
            table[0, 0, a], table[1, 0, a], table[2, 0, a] = r, offset, offset + r
            a_idx[a, :r] = page_ids[offset : offset + r]
            b_idx[a, :r] = page_ids[offset + r : offset + 2 * r]
            offset += 2 * r
        scales = np.zeros((7, n_seg), np.float32)
        scales[0] = 0.5
        starts = np.concatenate([[0], np.cumsum(seg_lens)]).astype(np.int32)
        self.batch = LoraBatch(
            seg_starts=torch.from_numpy(starts).to(DEV),
            seg_adapter=torch.arange(n_seg, dtype=torch.int32, device=DEV),
            ranks=torch.from_numpy(table[0]).to(DEV), scales=torch.from_numpy(scales).to(DEV),
            a_starts=torch.from_numpy(table[1]).to(DEV), b_starts=torch.from_numpy(table[2]).to(DEV),
            page_ids=torch.from_numpy(page_ids).to(DEV),
            max_rank=rank_bucket(max(ranks)), max_seg_len=max(seg_lens))
        self.a_idx = torch.from_numpy(a_idx).to(DEV)
        self.b_idx = torch.from_numpy(b_idx).to(DEV)
        self.scale = torch.full((n_seg, 1, 1), 0.5, dtype=DTYPE, device=DEV)
        self.x = torch.randn(n_rows, HIDDEN, generator=g, device=DEV).to(DTYPE)
        self.y = torch.randn(n_rows, HIDDEN, generator=g, device=DEV).to(DTYPE)
        elt = 2
        self.bytes = sum(2 * r * P * elt for r in ranks) + 3 * n_rows * HIDDEN * elt
        self.group = None

    def reference(self, y):
        """torch gather + bmm, ranks padded to the bucket with a zero page."""
        a = self.pool[self.a_idx]  # (S, R, K)
        bt = self.pool[self.b_idx]  # (S, R, N)
        n_seg, seg_len = len(self.seg_lens), self.seg_lens[0]
        assert all(n == seg_len for n in self.seg_lens)
        xs = self.x.view(n_seg, seg_len, HIDDEN)
        h = torch.bmm(xs, a.transpose(1, 2)) * self.scale  # (S, L, R)
        y.view(n_seg, seg_len, HIDDEN).add_(torch.bmm(h, bt))

    def parts(self, cfg):
        """(shrink, expand, both) closures for an explicit launch configuration."""
        from kernels.lora import _group_table, run_lora
        from kernels.lora_expand import lora_expand
        from kernels.lora_shrink import lora_shrink

        group = _group_table((0,), (0,), (HIDDEN,), self.x.device)
        tmp = torch.empty((cfg.split_k, self.x.shape[0], 1, self.batch.max_rank),
                          dtype=torch.float32, device=DEV)

        def shrink():
            lora_shrink(self.x, tmp, self.pool, self.batch, group, cfg)

        def expand():
            lora_expand(self.y, tmp, self.pool, self.batch, group, HIDDEN, cfg)

        def both():  # as lora_apply launches them (the expand a programmatic dependent launch)
            run_lora(self.x, self.y, self.pool, self.batch, group, HIDDEN, cfg)

        return shrink, expand, both


def default_cfg(case: LoraCase):
    from kernels.lora import step_config

    return step_config(case.batch, 1, P, HIDDEN, DTYPE, case.x.device)


def check_lora(case: LoraCase, fn) -> float:
    """Relative error of the LoRA delta against the torch reference (y small but not zero,
    so that rounding y + delta to bf16 does not swamp the comparison)."""
    y_keep = case.y.clone()
    case.y.mul_(1e-3)
    y0 = case.y.clone()
    fn()
    got = case.y.float() - y0.float()
    case.y.copy_(y0)
    case.reference(case.y)
    want = case.y.float() - y0.float()
    case.y.copy_(y_keep)
    return rel_err(got, want)


def bench_lora_case(name, case, timer, bw, ops):
    args = (case.x, case.y, case.pool, case.batch, (0,), (0,))
    err = check_lora(case, lambda: ops.lora_apply(*args))
    t = timer(lambda: ops.lora_apply(*args))
    t_ref = timer(lambda: case.reference(case.y))
    shrink, expand, _ = case.parts(default_cfg(case))
    t_shrink, t_expand = timer(shrink), timer(expand)
    floor = case.bytes / bw
    row = dict(case=name, tokens=sum(case.seg_lens), segments=len(case.seg_lens),
               ranks=sorted(set(case.ranks)), max_rank=case.batch.max_rank, bytes=case.bytes,
               floor_s=floor, triton_s=t, shrink_s=t_shrink, expand_s=t_expand, torch_ref_s=t_ref,
               bw_fraction=floor / t, torch_ref_bw_fraction=floor / t_ref,
               speedup_vs_torch=t_ref / t, rel_err_vs_torch=err)
    log.info("%-22s triton %7.1f us (shrink %6.1f + expand %6.1f) | torch gather+bmm %7.1f us | "
             "floor %6.1f us -> %.2f of copy bw | err %.1e", name, t * 1e6, t_shrink * 1e6,
             t_expand * 1e6, t_ref * 1e6, floor * 1e6, floor / t, err)
    return row


def decode_cases():
    for b in (1, 16, 64, 256):
        for label, ranks in [(f"r{r}", [r] * b) for r in (8, 16, 32, 64)] + [
                ("S2", [S2[i % 4] for i in range(b)])]:
            yield f"decode B={b} {label}", [1] * b, ranks
        if b >= 64:
            # The same rows ordered by rank, largest first: the longest programs dispatched
            # first, so the launch does not end on a tail of rank-64 programs.
            yield f"decode B={b} S2 by rank", [1] * b, sorted((S2[i % 4] for i in range(b)), reverse=True)
            # As decode graphs launch them: per-row tables (LoraBatch.rows_are_adapters).
            yield f"decode B={b} S2 row tables", [1] * b, [S2[i % 4] for i in range(b)]


PREFILL = ("prefill 16x256 S2", [256] * 16, [S2[i % 4] for i in range(16)])


# -- LoRA in a mixed step ---------------------------------------------------------------------
class MixedCase:
    """The q,k,v LoRA point (hidden -> 3 x hidden, modules 0-2) of a mixed step: `prompts`
    segments of `prompt_len` tokens, then `decode` rows, each segment and row on its own adapter,
    S2 ranks in turn, adapter rows on shuffled pool pages. Both batches come from the engine's
    builder (adapter_cache.device_lora_batch) over the same tables: `combined` puts every row in
    MBGMM segments (lora_decode_rows_gmv off), `split` has the decode part (MBGMV)."""

    def __init__(self, prompts: int, prompt_len: int, decode: int, hidden: int, page: int, dtype, seed: int = 0):
        from kernels.lora import GMV_MAX_SEG_LEN
        from kernels.lora_batch import rank_buckets
        from slora_backend.adapter_cache import LoraTables, device_lora_batch

        n_adapters = prompts + decode
        ranks = [S2[i % 4] for i in range(n_adapters)]
        chunks = -(-hidden // page)  # pages per A row and per B^T row
        ints = np.zeros((3, 7, n_adapters), np.int32)  # ranks, A starts, B^T starts
        scales = np.zeros((7, n_adapters), np.float32)
        at = 0
        for a, r in enumerate(ranks):
            for m in range(3):
                ints[:, m, a] = (r, at, at + r * chunks)
                scales[m, a] = 0.5
                at += 2 * r * chunks
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.pool = (torch.randn(at + 1, page, generator=g, device=DEV) * 0.02).to(dtype)
        page_ids = np.random.default_rng(seed).permutation(at + 1)[:at].astype(np.int32)
        tables = LoraTables(names=[f"a{i}" for i in range(n_adapters)], seg_adapter=list(range(n_adapters)),
                            ints=ints, scales=scales, page_id_parts=[torch.from_numpy(page_ids).to(DEV)],
                            total_pages=at, max_rank=max(ranks), modules=0b111)
        prompt_starts = [i * prompt_len for i in range(prompts + 1)]
        n_rows = prompt_starts[-1] + decode
        longest = max(prompt_len, GMV_MAX_SEG_LEN + 1)  # model_runner.eager_segments' bound
        dev = torch.device(DEV)
        self.combined = device_lora_batch(tables, prompt_starts + list(range(prompt_starts[-1] + 1, n_rows + 1)),
                                          longest, dev)
        self.split = device_lora_batch(tables, prompt_starts, longest, dev, rank_buckets(64))
        self.x = torch.randn(n_rows, hidden, generator=g, device=DEV).to(dtype)
        self.y = torch.randn(n_rows, 3 * hidden, generator=g, device=DEV).to(dtype) * 1e-3
        self.offsets = (0, hidden, 2 * hidden)
        self.ranks = ranks

    def apply(self, ops, batch, rows=slice(None)):
        """lora_apply on `rows` of the step (a copy of y: timing runs leave y as it was)."""
        y = self.y[rows].clone()
        return lambda: ops.lora_apply(self.x[rows], y, self.pool, batch, (0, 1, 2), self.offsets)

    def delta(self, ops, batch) -> torch.Tensor:
        y = self.y.clone()
        ops.lora_apply(self.x, y, self.pool, batch, (0, 1, 2), self.offsets)
        return y.float() - self.y.float()


def bench_mixed(timer, ops, prompts: int, prompt_len: int, decode_rows: list[int], hidden: int, page: int,
                dtype=DTYPE):
    """Rows of the mixed-step comparison (MixedCase), one per decode row count."""
    from kernels.lora import step_config

    rows = []
    for d in decode_rows:
        case = MixedCase(prompts, prompt_len, d, hidden, page, dtype)
        split, n = case.split, case.split.decode_start
        delta_split = case.delta(ops, split)
        delta_combined = case.delta(ops, case.combined)
        delta_torch = case.delta(get_ops("torch"), case.combined)
        err = rel_err(delta_split, delta_combined)
        # Different kernels (tensor-core MBGMM rounds the intermediate to bf16): close, not equal.
        assert err < 2e-2, f"split and combined LoRA differ at D={d}: relative error {err:.2e}"
        t_combined = timer(case.apply(ops, case.combined))
        t_split = timer(case.apply(ops, split))
        t_prompt = timer(case.apply(ops, replace(split, decode=None), slice(0, n)))
        t_decode = timer(case.apply(ops, split.decode, slice(n, None)))
        prompt_cfg, decode_cfg = (step_config(b, 3, page, hidden, dtype, case.x.device) for b in (split, split.decode))
        row = dict(case=f"mixed {prompts}x{prompt_len} + {d} decode rows S2", prompt_tokens=n, decode_rows=d,
                   hidden=hidden, page_width=page, distinct_adapters=prompts + d,
                   decode_rank_bucket=split.decode.max_rank, combined_s=t_combined, split_s=t_split,
                   split_prompt_part_s=t_prompt, split_decode_part_s=t_decode, speedup=t_combined / t_split,
                   rel_err_split_vs_combined=err, rel_err_split_vs_torch=rel_err(delta_split, delta_torch),
                   rel_err_combined_vs_torch=rel_err(delta_combined, delta_torch),
                   prompt_split_k=prompt_cfg.split_k, decode_split_k=decode_cfg.split_k,
                   decode_path="MBGMM" if decode_cfg.use_dot else "MBGMV")
        rows.append(row)
        log.info("%-36s combined (all MBGMM) %8.1f us | split %8.1f us (prompts %7.1f + decode rows %7.1f) "
                 "-> %.2fx | err %.1e", row["case"], t_combined * 1e6, t_split * 1e6, t_prompt * 1e6,
                 t_decode * 1e6, row["speedup"], err)
        del case
    return rows


def mixed(args, out: Path) -> None:
    """--mixed: bench_mixed at Llama-7B sizes on a GPU, tiny ones on CPU (smoke test)."""
    ops = get_ops("triton")  # on CPU this selects Triton's interpreter, before triton's import
    gpu = DEV == "cuda"
    hidden, page = (HIDDEN, P) if gpu else (64, 32)
    # The interpreter's tensor-core path (tl.dot) is not right in bf16 on CPU: fp32 there.
    dtype = DTYPE if gpu else torch.float32
    timer = Timer(args.reps) if gpu else WallTimer(args.reps)
    rows = bench_mixed(timer, ops, args.prompts, args.prompt_len,
                       [int(d) for d in args.decode_rows.split(",")], hidden, page, dtype)
    report = dict(device=torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter: smoke test)",
                  date=time.strftime("%Y-%m-%d"), dtype=str(dtype).removeprefix("torch."), command=" ".join(sys.argv),
                  method=("CUDA graph per case, L2 flushed (256 MiB write) before every replay, median of "
                          f"{args.reps} replays" if gpu else f"wall clock, median of {args.reps}"),
                  rows=rows)
    (out / "kernel_mixed.json").write_text(json.dumps(report, indent=2))
    for r in rows:
        print(f"{r['case']:<36} combined {r['combined_s'] * 1e6:9.1f} us  split {r['split_s'] * 1e6:9.1f} us "
              f"({r['split_prompt_part_s'] * 1e6:.1f} + {r['split_decode_part_s'] * 1e6:.1f})  "
              f"{r['speedup']:.2f}x  err {r['rel_err_split_vs_combined']:.1e}")


# -- attention and elementwise --------------------------------------------------------------
class AttnCase:
    def __init__(self, batch, ctx, table_len, seed=0):
        g = torch.Generator(device=DEV).manual_seed(seed)
        n_pages = 2 * batch * ctx + 2
        self.pool = torch.randn(n_pages, P, generator=g, device=DEV).to(DTYPE)
        perm = torch.randperm(n_pages, generator=g, device=DEV)[: 2 * batch * ctx].to(torch.int32)
        self.kv_pages = torch.zeros(batch, table_len, 2, dtype=torch.int32, device=DEV)
        self.kv_pages[:, :ctx] = perm.view(batch, ctx, 2)
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
        self.q = torch.randn(batch, N_HEADS, HEAD_DIM, generator=g, device=DEV).to(DTYPE)
        self.bytes = 2 * batch * ctx * P * 2 + 2 * self.q.numel() * 2

    def args(self):
        return (self.q, self.pool, self.kv_pages, self.seq_lens, HEAD_DIM**-0.5)


def bench_attention(timer, bw, ops):
    from kernels.paged_attention import _num_splits

    rows = []
    for batch in (1, 32, 128):
        for table_len in (512, 2048):
            case = AttnCase(batch, 512, table_len)
            want = get_ops("torch").paged_decode_attention(*case.args())
            got = ops.paged_decode_attention(*case.args())
            t = timer(lambda case=case: ops.paged_decode_attention(*case.args()))
            splits = _num_splits(batch, KV_HEADS, table_len, case.q.device)
            rows.append(dict(case=f"attn B={batch} ctx=512 table={table_len}", batch=batch,
                             table_len=table_len, num_splits=splits, triton_s=t,
                             floor_s=case.bytes / bw, bw_fraction=case.bytes / bw / t,
                             rel_err_vs_torch=rel_err(got, want)))
            log.info("%-32s splits %2d  %7.1f us  -> %.2f of copy bw", rows[-1]["case"], splits,
                     t * 1e6, rows[-1]["bw_fraction"])
            del case
    return rows


def bench_elementwise(timer, bw, ops):
    """The fused kernels against the torch code they replace (per layer, per op)."""
    max_len = 4096
    inv = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2, device=DEV).float() / HEAD_DIM))
    emb = torch.outer(torch.arange(max_len, device=DEV, dtype=torch.float32), inv)
    emb = torch.cat((emb, emb), -1)
    tables = (emb.cos(), emb.sin())
    rows = []
    for n_tok in (1, 64, 256, 4096):
        rows += _elementwise_rows(n_tok, tables, timer, bw, ops)
    return rows


def _elementwise_rows(n_tok, tables, timer, bw, ops):
    from kernels import torch_ops
    from kernels.kv_write import write_kv

    g = torch.Generator(device=DEV).manual_seed(n_tok)
    qw = N_HEADS * HEAD_DIM
    kvw = KV_HEADS * HEAD_DIM
    h = torch.randn(n_tok, HIDDEN, generator=g, device=DEV).to(DTYPE)
    d = torch.randn(n_tok, HIDDEN, generator=g, device=DEV).to(DTYPE)
    w = torch.randn(HIDDEN, generator=g, device=DEV).to(DTYPE)
    gu = torch.randn(n_tok, 2 * INTER, generator=g, device=DEV).to(DTYPE)
    qkv = torch.randn(n_tok, qw + 2 * kvw, generator=g, device=DEV).to(DTYPE)
    pos = torch.randint(0, tables[0].shape[0], (n_tok,), generator=g, device=DEV)
    pool = torch.empty(2 * n_tok + 2, kvw, dtype=DTYPE, device=DEV)
    pages = torch.randperm(2 * n_tok, generator=g, device=DEV).to(torch.int32)
    kp, vp = pages[:n_tok], pages[n_tok:]
    # Per forward (outside the layer loop) in both versions: each token's table rows.
    cos_rows, sin_rows = tables[0][pos], tables[1][pos]
    cos_old, sin_old = cos_rows.to(DTYPE)[:, None, :], sin_rows.to(DTYPE)[:, None, :]

    def old_rope():  # the model's code before the fused kernel (torch RoPE + write_kv kernel)
        q = torch_ops.apply_rope(qkv[:, :qw].view(n_tok, N_HEADS, HEAD_DIM), cos_old, sin_old)
        k = torch_ops.apply_rope(qkv[:, qw : qw + kvw].view(n_tok, KV_HEADS, HEAD_DIM),
                                 cos_old, sin_old)
        v = qkv[:, qw + kvw :].contiguous()
        write_kv(pool, k.reshape(n_tok, kvw), v, kp, vp)
        return q

    def new_rope():
        ops.rope_write_kv(qkv, cos_rows, sin_rows, pool, kp, vp, N_HEADS, KV_HEADS, HEAD_DIM)

    errs = {
        "rms_norm": rel_err(ops.rms_norm(h, w, 1e-5), torch_ops.rms_norm(h, w, 1e-5)),
        "silu_mul": rel_err(ops.silu_mul(gu), torch_ops.silu_mul(gu)),
        "add_rms_norm": rel_err(ops.add_rms_norm(h.clone(), d, w, 1e-5),
                                torch_ops.rms_norm(h + d, w, 1e-5)),
    }
    qkv_keep = qkv.clone()
    q_old = old_rope()
    new_rope()
    errs["rope_write_kv"] = rel_err(qkv[:, :qw].reshape(q_old.shape), q_old)
    # (name, fused, torch before, bytes the fused kernel must move)
    cases = [
        ("rms_norm", lambda: ops.rms_norm(h, w, 1e-5), lambda: torch_ops.rms_norm(h, w, 1e-5),
         2 * h.numel() * 2),
        ("add_rms_norm", lambda: ops.add_rms_norm(h, d, w, 1e-5),
         lambda: torch_ops.rms_norm(h + d, w, 1e-5), 4 * h.numel() * 2),
        ("silu_mul", lambda: ops.silu_mul(gu), lambda: torch_ops.silu_mul(gu), gu.numel() * 3),
        ("rope_write_kv", new_rope, old_rope, (qkv.numel() + 2 * n_tok * (qw + kvw)) * 2),
    ]
    rows = []
    for name, fused, ref, nbytes in cases:
        qkv.copy_(qkv_keep)
        t = timer(fused)
        t_ref = timer(ref)
        rows.append(dict(case=f"{name} T={n_tok}", triton_s=t, torch_s=t_ref, floor_s=nbytes / bw,
                         bw_fraction=nbytes / bw / t, rel_err_vs_torch=errs[name]))
        log.info("%-22s fused %7.1f us | torch %7.1f us | %.2f of copy bw | err %.1e",
                 rows[-1]["case"], t * 1e6, t_ref * 1e6, rows[-1]["bw_fraction"], errs[name])
    return rows


# -- sweeps ---------------------------------------------------------------------------------
_CASES: dict = {}


def _case(key):
    if key not in _CASES:
        if key == "prefill":
            _, seg_lens, ranks = PREFILL
        else:
            parts = key.split("-")  # decode-B (S2 ranks in turn) or decode-B-rR (all rank R)
            b = int(parts[1])
            seg_lens = [1] * b
            ranks = [int(parts[2][1:])] * b if len(parts) > 2 else [S2[i % 4] for i in range(b)]
        _CASES[key] = LoraCase(seg_lens, ranks)
    return _CASES[key]


def _cfg(case, **kw):
    split = kw.pop("split_k", 1)
    return replace(default_cfg(case), **kw).with_split_k(HIDDEN, split)


def _attn_variant(batch, table_len, splits, block_t, warps, stages):
    from kernels.paged_attention import decode_attention

    key = ("attn", batch, table_len)
    if key not in _CASES:
        _CASES[key] = AttnCase(batch, 512, table_len)
    case = _CASES[key]
    return lambda: decode_attention(*case.args(), num_splits=splits, block_t=block_t,
                                    num_warps=warps, num_stages=stages)


def _warm(jobs):
    """Compile (populate Triton's on-disk cache) in a worker process; returns failures."""
    torch.cuda.set_device(0)
    failed = []
    for job in jobs:
        try:
            _run_job(job)()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - a config the compiler rejects is skipped
            failed.append((repr(job), repr(exc)[:300]))
    return failed


def _run_job(job):
    kind, case_key, kw = job
    if kind == "attn":
        return _attn_variant(**kw)
    case = _case(case_key)
    shrink, expand, both = case.parts(_cfg(case, **kw))
    return {"shrink": shrink, "expand": expand, "both": both}[kind]


def sweep_grids(quick: bool):
    """The variants swept (dicts of LoraLaunchConfig fields / decode_attention arguments)."""
    if quick:
        return quick_grids()
    shrink_grid = [dict(block_r=r, block_k=k, shrink_warps=w, split_k=s)
                   for r, k, w, s in itertools.product((8, 16, 32), (256, 512, 1024), (2, 4, 8),
                                                       (1, 2, 4, 8))]
    expand_grid = [dict(block_r_expand=64, block_n=n, expand_warps=w, n_iters=i, expand_stages=st)
                   for n, w, i, st in itertools.product((128, 256, 512), (2, 4, 8), (1, 2, 4),
                                                        (0, 4))]
    pre_shrink = [dict(block_m=m, block_k=k, shrink_warps=w, shrink_stages=st, split_k=s)
                  for m, k, w, st, s in itertools.product((32, 64, 128), (64, 128), (4, 8), (3, 4),
                                                           (1, 2, 4))]
    pre_expand = [dict(expand_block_m=m, block_n=n, expand_warps=w, n_iters=i)
                  for m, n, w, i in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (1, 4))]
    attn = [dict(batch=b, table_len=2048, splits=s, block_t=t, warps=w, stages=st)
            for b, splits in ((1, (4, 8, 16)), (32, (1, 2, 4)), (128, (1, 2)))
            for s, t, w, st in itertools.product(splits, (32, 64, 128), (4, 8), (None, 2))]
    return shrink_grid, expand_grid, pre_shrink, pre_expand, attn


def quick_grids():
    """Around the full sweep's best (H200): MBGMV with pipelining depths, the full-rank
    expand tile with longer column loops, tensor-core (16-row padded) decode variants, and
    more K splits / longer loops for prefill; each expand and MBGMM shrink with its page ids
    loaded once per program (one_page, the default) and per block."""
    prod = itertools.product
    shrink = [dict(block_r=r, block_k=k, shrink_warps=4, shrink_stages=st, split_k=s)
              for r, k, st, s in prod((8, 16), (128, 256), (0, 2, 4), (1, 2))]
    shrink_dot = [dict(use_dot=True, block_m=16, block_r=r, block_k=k, shrink_warps=4,
                       shrink_stages=st, split_k=s)
                  for r, k, st, s in prod((16, 64), (128, 256), (3, 4), (1, 2, 4))]
    expand = [dict(block_r_expand=64, block_n=n, expand_warps=w, n_iters=i, expand_stages=st, one_page=o)
              for n, w, i, st, o in prod((128, 256), (1, 2, 4), (1, 2, 4), (0, 4), (True, False))]
    expand_dot = [dict(use_dot=True, expand_block_m=16, block_r_expand=64, block_n=n,
                       expand_warps=w, n_iters=i)
                  for n, w, i in prod((64, 128, 256), (4, 8), (2, 4, 8))]
    pre_shrink = [dict(block_m=m, block_k=k, shrink_warps=w, shrink_stages=st, split_k=s, one_page=o)
                  for m, k, w, st, s, o in prod((32, 64, 128), (64, 128), (4, 8), (3, 4), (2, 4, 8, 16),
                                                (True, False))]
    pre_expand = [dict(expand_block_m=m, block_n=n, expand_warps=w, n_iters=i, expand_stages=st)
                  for m, n, w, i, st in prod((16, 32, 64, 128), (32, 64, 128, 256), (4, 8), (4, 8, 16), (0, 3))
                  if n * i <= 4096]
    return shrink + shrink_dot, expand + expand_dot, pre_shrink, pre_expand, []


def compile_all(jobs) -> list:
    """Compile the jobs' kernels in parallel worker processes (Triton's on-disk cache is
    shared); jobs differing only in run-time arguments go to the same worker, so each kernel
    compiles once. Returns the failures."""
    t0 = time.monotonic()
    groups: dict = {}
    for job in jobs:
        kw = {k: v for k, v in job[2].items() if k not in ("split_k", "n_iters", "splits")}
        groups.setdefault((job[0], job[1], json.dumps(kw, sort_keys=True)), []).append(job)
    n_workers = 14
    chunks = [[] for _ in range(n_workers)]
    for i, group in enumerate(groups.values()):
        chunks[i % n_workers].extend(group)
    ctx = mp.get_context("spawn")
    with ctx.Pool(n_workers) as pool:
        failures = [f for part in pool.map(_warm, chunks) for f in part]
    log.info("compiled %d variants in %.0fs (%d failed)", len(jobs), time.monotonic() - t0,
             len(failures))
    return failures


def sweep_small(timer, bw, out: Path) -> None:
    """MBGMV shapes for small decode batches (B=64 S2, where a decode step is furthest above its
    floor): shrink and expand grids, then the best pairs with K splits at B=16 and 64. Writes
    lora_tuning_small.json ({"gmv_small": ...}: kernels.lora.TUNED, launch_config applies it
    to steps of at most SMALL_BATCH rows)."""
    prod = itertools.product
    shrink_grid = [dict(block_r=r, block_k=k, shrink_warps=w, shrink_stages=st, split_k=sp)
                   for r, k, w, st, sp in prod((8, 16), (128, 256, 512), (2, 4), (0, 4), (2, 4, 8))]
    expand_grid = [dict(block_n=n, expand_warps=w, n_iters=i, expand_stages=st)
                   for n, w, i, st in prod((64, 128, 256), (1, 2, 4), (1, 2, 4), (0, 4))]
    jobs = ([("shrink", "decode-64", kw) for kw in shrink_grid]
            + [("expand", "decode-64", kw) for kw in expand_grid])
    compile_all(jobs)
    results = []
    for job in jobs:
        try:
            results.append(dict(kind=job[0], case=job[1], cfg=job[2], t=timer(_run_job(job))))
        except Exception as exc:  # noqa: BLE001 - a config the compiler rejects is skipped
            results.append(dict(kind=job[0], case=job[1], cfg=job[2], error=repr(exc)[:300]))
    timed = [r for r in results if "t" in r]
    best_s = sorted((r for r in timed if r["kind"] == "shrink"), key=lambda r: r["t"])[:3]
    best_e = sorted((r for r in timed if r["kind"] == "expand"), key=lambda r: r["t"])[:3]
    combos = []
    for s_row, e_row in itertools.product(best_s, best_e):
        for split in (2, 4, 8):
            kw = {**s_row["cfg"], **e_row["cfg"], "split_k": split}
            for b in (16, 64):
                combos.append(dict(case=f"decode-{b}", cfg=kw, t=timer(_run_job(("both", f"decode-{b}", kw)))))
    default = {b: timer(_run_job(("both", f"decode-{b}", {}))) for b in (16, 64)}
    top = sorted((c for c in combos if c["case"] == "decode-64"), key=lambda c: c["t"])
    report = dict(device=torch.cuda.get_device_name(), copy_bandwidth_Bps=bw, default_s=default,
                  results=results, combos=combos)
    (out / "kernel_sweep_small.json").write_text(json.dumps(report, indent=1))
    (out / "lora_tuning_small.json").write_text(json.dumps({"gmv_small": top[0]["cfg"]}, indent=1))
    for r in best_s + best_e:
        print(f"{r['kind']:6} decode-64 {r['t'] * 1e6:7.1f} us {r['cfg']}")
    for b in (16, 64):
        print(f"default decode-{b}: {default[b] * 1e6:.1f} us")
        for c in sorted((c for c in combos if c["case"] == f"decode-{b}"), key=lambda c: c["t"])[:3]:
            print(f"combo decode-{b} {c['t'] * 1e6:7.1f} us {c['cfg']}")


def sweep(timer, bw, out: Path, quick: bool = False):
    shrink_grid, expand_grid, pre_shrink, pre_expand, attn = sweep_grids(quick)
    jobs = ([("shrink", "decode-256", kw) for kw in shrink_grid]
            + [("expand", "decode-256", kw) for kw in expand_grid]
            + [("shrink", "prefill", kw) for kw in pre_shrink]
            + [("expand", "prefill", kw) for kw in pre_expand]
            + [("attn", None, kw) for kw in attn])
    t0 = time.monotonic()
    failures = compile_all(jobs)
    results = []
    for job in jobs:
        try:
            t = timer(_run_job(job))
        except Exception as exc:  # noqa: BLE001
            results.append(dict(kind=job[0], case=job[1], cfg=job[2], error=repr(exc)[:300]))
            continue
        results.append(dict(kind=job[0], case=job[1], cfg=job[2], t=t))
    log.info("timed %d variants, %.0fs in all", len(results), time.monotonic() - t0)

    def best(kind, case, n=3, dot=None):
        rows = [r for r in results if r["kind"] == kind and r["case"] == case and "t" in r
                and (dot is None or r["cfg"].get("use_dot", False) == dot)]
        return sorted(rows, key=lambda r: r["t"])[:n]

    # Combinations of the best shrink and expand shapes of one path (MBGMV or tensor cores:
    # both kernels of a step take the same), timed together; decode at every batch size.
    pairs = []
    for case_key in ("decode-256", "prefill"):
        for dot, n in ((False, 3), (True, 2)):
            pairs += [(case_key, s, e) for s, e in itertools.product(
                best("shrink", case_key, n, dot), best("expand", case_key, n, dot))]
    combos = []
    for case_key, s, e in pairs:
        kw = {**s["cfg"], **e["cfg"]}
        if case_key.startswith("decode"):
            for b in (1, 16, 64, 256):
                for split in (1, 2, 4) if quick else (1, 2, 4, 8, 16):
                    k2 = {**kw, "split_k": split}
                    combos.append(dict(case=f"decode-{b}", cfg=k2,
                                       t=timer(_run_job(("both", f"decode-{b}", k2)))))
        else:
            combos.append(dict(case=case_key, cfg=kw, t=timer(_run_job(("both", case_key, kw)))))
    report = dict(device=torch.cuda.get_device_name(), copy_bandwidth_Bps=bw,
                  bytes={k: _case(k).bytes for k in ("decode-256", "prefill")},
                  failures=failures, results=results, combos=combos)
    (out / ("kernel_sweep_quick.json" if quick else "kernel_sweep.json")).write_text(
        json.dumps(report, indent=1))
    # The fastest pairs as a tuning table for kernels.lora.TUNED (decode: the K split stays
    # with split_k_for, which depends on the batch).
    tuning = {}
    for path, case in (("gmv", "decode-256"), ("gmm", "prefill")):
        rows = sorted((c for c in combos if c["case"] == case), key=lambda c: c["t"])
        if rows:
            cfg = dict(rows[0]["cfg"])
            if path == "gmv":
                cfg.pop("split_k", None)
            tuning[path] = cfg
            tuning[f"{path}_sweep_s"] = rows[0]["t"]
    (out / "lora_tuning.json").write_text(json.dumps(tuning, indent=1))
    print("tuning", json.dumps(tuning))
    for kind, case in (("shrink", "decode-256"), ("expand", "decode-256"), ("shrink", "prefill"),
                       ("expand", "prefill")):
        for r in best(kind, case, 5):
            print(f"{kind:6} {case:10} {r['t'] * 1e6:7.1f} us {r['cfg']}")
    for b in (1, 16, 64, 256):
        rows = sorted((c for c in combos if c["case"] == f"decode-{b}"), key=lambda c: c["t"])[:3]
        for c in rows:
            frac = _case(f"decode-{b}").bytes / bw / c["t"]
            print(f"combo decode-{b:<4} {c['t'] * 1e6:7.1f} us frac {frac:.2f} {c['cfg']}")
    for c in sorted((c for c in combos if c["case"] == "prefill"), key=lambda c: c["t"])[:3]:
        print(f"combo prefill {c['t'] * 1e6:7.1f} us frac {_case('prefill').bytes / bw / c['t']:.2f}"
              f" {c['cfg']}")
    for b in (1, 32, 128):
        for r in sorted((r for r in results if r["kind"] == "attn" and r["cfg"]["batch"] == b
                         and "t" in r), key=lambda r: r["t"])[:3]:
            print(f"attn B={b:<4} {r['t'] * 1e6:7.1f} us {r['cfg']}")


REG_CASES = {  # label: LoraLaunchConfig overrides of the decode-256 default
    "expand 2 warps": dict(expand_warps=2),
    "expand 4 warps": dict(expand_warps=4),
    "expand 1 warp": dict(expand_warps=1),
    "shrink default": dict(),
}


def regs(out: Path) -> None:
    """Registers and spills per thread of the decode-256 kernels (a kernel whose tile does
    not fit its registers spills to local memory: one explanation of a slow variant)."""
    from kernels.lora import _group_table
    from kernels.lora_expand import expand_call
    from kernels.lora_shrink import shrink_call

    case = _case("decode-256")
    group = _group_table((0,), (0,), (HIDDEN,), case.x.device)
    rows = []
    for label, kw in REG_CASES.items():
        cfg = _cfg(case, **kw)
        tmp = torch.zeros((cfg.split_k, case.x.shape[0], 1, case.batch.max_rank), dtype=torch.float32, device=DEV)
        call = (shrink_call(case.x, tmp, case.pool, case.batch, group, cfg) if label.startswith("shrink")
                else expand_call(case.y, tmp, case.pool, case.batch, group, HIDDEN, cfg))
        compiled = call.run()
        rows.append(dict(label=label, cfg=kw, n_regs=getattr(compiled, "n_regs", None),
                         n_spills=getattr(compiled, "n_spills", None)))
        print(f"{label:<40} regs {rows[-1]['n_regs']} spills {rows[-1]['n_spills']}")
    (out / "kernel_regs.json").write_text(json.dumps(rows, indent=1))


def fused_fn(case: LoraCase, cfg):
    """The fused one-launch kernel (kernels/lora_fused.py) through run_lora's dispatch."""
    from kernels.lora import _group_table, run_lora

    group = _group_table((0,), (0,), (HIDDEN,), case.x.device)
    return lambda: run_lora(case.x, case.y, case.pool, case.batch, group, HIDDEN, cfg)


# The fused kernel's shapes, each timed (and checked) against the default two-kernel path:
# column ranges per row (0: pick_fused_splits), the K loop unrolled or not, K steps, the
# column loop unrolled, warps.
FUSED_GRID = (
    [dict(fused_splits=s, shrink_unroll=u) for s, u in itertools.product((0, 1, 2, 4, 8),
                                                                         (True, False))]
    + [dict(fused_splits=s, fused_block_k=k, expand_unroll=eu, fused_warps=w)
       for s, k, eu, w in itertools.product((0, 2), (256, 512), (False, True), (4, 8))])


def variants(timer, bw, out: Path):
    """MBGMV shapes against the default: the fixed-count (unrolled) loops, wider column blocks
    and K splits; each timed alone, the best pair timed together and checked against torch.
    Then the fused kernel (FUSED_GRID) on every case, and on the small-rank cases below alone
    (rank 8 and 16, where it is meant to replace the two launches)."""
    cases = {"decode B=256 S2": ([1] * 256, [S2[i % 4] for i in range(256)]),
             "decode B=256 r8": ([1] * 256, [8] * 256),
             "decode B=64 S2": ([1] * 64, [S2[i % 4] for i in range(64)])}
    fused_only = {"decode B=256 r16": ([1] * 256, [16] * 256),
                  "decode B=64 r8": ([1] * 64, [8] * 64),
                  "decode B=64 r16": ([1] * 64, [16] * 64),
                  "decode B=16 r8": ([1] * 16, [8] * 16),
                  "decode B=1 r8": ([1], [8]),
                  "decode B=1 r16": ([1], [16])}

    def write():  # after every case: a run cut short by its time limit keeps what it measured
        (out / "kernel_variants.json").write_text(json.dumps(dict(
            device=torch.cuda.get_device_name(), copy_bandwidth_Bps=bw,
            date=time.strftime("%Y-%m-%d"), rows=rows), indent=1))

    rows = two_kernel_variants(timer, bw, cases)
    write()
    for name, (seg_lens, ranks) in fused_only.items():
        case = LoraCase(seg_lens, ranks)
        _, _, default_both = case.parts(default_cfg(case))
        t_default = timer(default_both)
        rows.append(dict(case=name, default_s=t_default,
                         default_bw_fraction=case.bytes / bw / t_default))
        del case
    for row in rows:
        name = row["case"]
        case = LoraCase(*{**cases, **fused_only}[name])
        base = replace(default_cfg(case), fused=True)
        timed = []
        # Rank 64 (the S2 cases) is not what the kernel is for: the short grid only.
        for kw in FUSED_GRID if case.batch.max_rank <= 16 else FUSED_GRID[:10]:
            fn = fused_fn(case, replace(base, **kw))
            try:
                t = timer(fn)
            except Exception as exc:  # noqa: BLE001 - a shape the compiler rejects
                log.info("%s fused %s failed: %r", name, kw, exc)
                continue
            timed.append(dict(t=t, cfg=kw, rel_err=check_lora(case, fn)))
        if not timed:
            continue
        best = min(timed, key=lambda r: r["t"])
        floor = case.bytes / bw
        row.update(fused=timed, fused_best_s=best["t"], fused_best_cfg=best["cfg"],
                   fused_best_bw_fraction=floor / best["t"], fused_best_rel_err=best["rel_err"],
                   fused_speedup_vs_default=row["default_s"] / best["t"])
        log.info("%-18s fused best %.1f us (%.2f of floor, %.2fx the default %.1f us) err %.1e %s",
                 name, best["t"] * 1e6, floor / best["t"], row["default_s"] / best["t"],
                 row["default_s"] * 1e6, best["rel_err"], best["cfg"])
        for r in sorted(timed, key=lambda r: r["t"])[:4]:
            log.info("   fused  %7.1f us err %.1e %s", r["t"] * 1e6, r["rel_err"], r["cfg"])
        del case
        write()


def two_kernel_variants(timer, bw, cases):
    """The two-kernel (shrink + expand) variants of each case; a row per case."""
    expand = [{}] + [dict(expand_unroll=True, block_n=n, n_iters=i, expand_warps=w)
                     for n, i, w in itertools.product((256, 512), (2, 4), (2, 4))]
    shrink = [{}] + [dict(shrink_unroll=u, block_k=k, split_k=sp)
                     for u, k, sp in itertools.product((False, True), (256, 512), (0, 4, 8))]
    rows = []
    for name, (seg_lens, ranks) in cases.items():
        case = LoraCase(seg_lens, ranks)
        base = default_cfg(case)

        def cfg_of(kw, base=base):
            kw = dict(kw)
            split = kw.pop("split_k", 0) or base.split_k
            return replace(base, **kw).with_split_k(HIDDEN, split)

        timed = {"expand": [], "shrink": []}
        for kind, grid in (("expand", expand), ("shrink", shrink)):
            for kw in grid:
                sh, ex, _ = case.parts(cfg_of(kw))
                try:
                    t = timer(ex if kind == "expand" else sh)
                except Exception as exc:  # noqa: BLE001 - a shape the compiler rejects
                    log.info("%s %s %s failed: %r", name, kind, kw, exc)
                    continue
                timed[kind].append((t, kw))
        best_e = min(timed["expand"], key=lambda r: r[0])
        best_s = min(timed["shrink"], key=lambda r: r[0])
        both_kw = {**best_s[1], **best_e[1]}
        _, _, both = case.parts(cfg_of(both_kw))
        t_both, err = timer(both), check_lora(case, both)
        _, _, default_both = case.parts(cfg_of({}))
        t_default = timer(default_both)
        floor = case.bytes / bw
        row = dict(case=name, default_s=t_default, default_bw_fraction=floor / t_default,
                   best_s=t_both, best_bw_fraction=floor / t_both, best_cfg=both_kw, rel_err=err,
                   expand=[dict(t=t, cfg=kw) for t, kw in timed["expand"]],
                   shrink=[dict(t=t, cfg=kw) for t, kw in timed["shrink"]])
        rows.append(row)
        log.info("%-18s default %.1f us (%.2f) -> best %.1f us (%.2f) err %.1e %s", name,
                 t_default * 1e6, floor / t_default, t_both * 1e6, floor / t_both, err, both_kw)
        for kind in ("shrink", "expand"):
            for t, kw in sorted(timed[kind], key=lambda r: r[0])[:4]:
                log.info("   %-6s %7.1f us %s", kind, t * 1e6, kw)
        del case
    return rows


# -- main ---------------------------------------------------------------------------------
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="block-shape sweeps instead")
    parser.add_argument("--quick", action="store_true", help="with --sweep: the short sweep")
    parser.add_argument("--small", action="store_true", help="with --sweep: MBGMV shapes for B <= 64")
    parser.add_argument("--variants", action="store_true",
                        help="MBGMV variants (unrolled loops, block shapes) against the default")
    parser.add_argument("--only", default="lora,attention,elementwise")
    parser.add_argument("--regs", action="store_true", help="registers and spills of the decode kernels")
    parser.add_argument("--mixed", action="store_true",
                        help="a mixed step's q,k,v LoRA point: all rows on MBGMM vs decode rows on MBGMV")
    parser.add_argument("--decode-rows", default="64,171,256", help="with --mixed: decode row counts")
    parser.add_argument("--prompts", type=int, default=4, help="with --mixed: prompt segments")
    parser.add_argument("--prompt-len", type=int, default=256, help="with --mixed: tokens per prompt")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mixed:
        mixed(args, out)
        return
    if args.regs:
        regs(out)
        return
    bw = copy_bandwidth()
    log.info("%s: copy bandwidth %.2f TB/s (read + write)", torch.cuda.get_device_name(), bw / 1e12)
    timer = Timer(args.reps)
    if args.sweep:
        if args.small:
            sweep_small(timer, bw, out)
        else:
            sweep(timer, bw, out, args.quick)
        return
    if args.variants:
        variants(timer, bw, out)
        return
    ops = get_ops("triton")
    from kernels.lora import TUNED  # $SLORA_LORA_TUNING overrides, if any

    tuning = {path: dict(overrides) for path, overrides in TUNED.items() if overrides}
    report = dict(device=torch.cuda.get_device_name(), copy_bandwidth_Bps=bw,
                  date=time.strftime("%Y-%m-%d"), dtype="bfloat16",
                  command="python benchmarks/kernel_bench.py", lora_tuning=tuning,
                  method=(
                      "CUDA graph per case, L2 flushed (256 MiB write) before every replay, "
                      f"median of {args.reps} replays; floor = minimum bytes / copy bandwidth"))
    only = args.only.split(",")
    if "lora" in only:
        rows = []
        for name, seg_lens, ranks in [*decode_cases(), PREFILL]:
            case = LoraCase(seg_lens, ranks)
            # Segment s is on adapter s already: its tables are per-row tables.
            case.batch.rows_are_adapters = name.endswith("row tables")
            rows.append(bench_lora_case(name, case, timer, bw, ops))
            del case
        report["lora"] = rows
        by_name = {r["case"]: r for r in rows}
        report["lora_decode_kernel_bw_fraction"] = by_name["decode B=256 S2"]["bw_fraction"]
        report["lora_prefill_kernel_bw_fraction"] = by_name[PREFILL[0]]["bw_fraction"]
    if "attention" in only:
        report["attention"] = bench_attention(timer, bw, ops)
    if "elementwise" in only:
        report["elementwise"] = bench_elementwise(timer, bw, ops)
    (out / "kernel_bench.json").write_text(json.dumps(report, indent=2))
    print(f"device {report['device']}, copy bandwidth {bw / 1e12:.2f} TB/s")
    for r in report.get("lora", []):
        print(f"{r['case']:<24} {r['triton_s'] * 1e6:8.1f} us  torch {r['torch_ref_s'] * 1e6:8.1f} us"
              f"  floor {r['floor_s'] * 1e6:7.1f} us  bw_frac {r['bw_fraction']:.2f}"
              f"  err {r['rel_err_vs_torch']:.1e}")
    for key in ("lora_decode_kernel_bw_fraction", "lora_prefill_kernel_bw_fraction"):
        if key in report:
            print(f"{key} = {report[key]:.3f}")
    for r in report.get("attention", []) + report.get("elementwise", []):
        print(f"{r['case']:<32} {r['triton_s'] * 1e6:8.1f} us  bw_frac {r['bw_fraction']:.2f}"
              + (f"  torch {r['torch_s'] * 1e6:8.1f} us" if "torch_s" in r else ""))


if __name__ == "__main__":
    main()
