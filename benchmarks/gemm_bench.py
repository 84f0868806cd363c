"""Decode-sized GEMMs (few rows, a whole weight matrix streamed): cuBLAS against a Triton
weight-streaming kernel, on the GPU.

    python benchmarks/gemm_bench.py --out DIR

A decode step's GEMMs read every weight once for a handful of rows: they should run at copy
bandwidth. The kernel-by-kernel profile of the B=64 decode step (decode_step.py --profile)
shows cuBLAS at 0.67-0.90 of it depending on the shape (o_proj lowest). This sweeps a plain
Triton kernel (one program per BN output columns, all rows, the K loop software-pipelined,
optionally K split across programs with an fp32 atomic reduction) over block shapes for the
Llama-7B projections and reports, per shape and row count, the best variant against
torch.nn.functional.linear and against the byte floor (weight bytes / copy bandwidth).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_step import copy_bandwidth  # noqa: E402

SHAPES = {  # name: (N, K) of a Llama-7B projection
    "qkv": (3 * 4096, 4096), "o": (4096, 4096), "gate_up": (2 * 11008, 4096), "down": (4096, 11008),
}


@triton.jit
def _stream_gemm(x_ptr, w_ptr, y_ptr, M, N, K, k_per_split,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ATOMIC: tl.constexpr):
    """y[:M, n-block] (+)= x[:M, K split] @ w[n-block, K split]^T."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k0 = split * k_per_split
    for k in range(k0, k0 + k_per_split, BK):
        cols = k + offs_k
        k_mask = cols < K
        x = tl.load(x_ptr + offs_m[:, None] * K + cols[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + cols[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0)
        acc += tl.dot(x, tl.trans(w))
    y_ptrs = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=mask)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def stream_gemm(x, w, bn, bk, warps, stages, split):
    m, k = x.shape
    n = w.shape[0]
    bm = max(16, triton.next_power_of_2(m))
    per = triton.cdiv(triton.cdiv(k, split), bk) * bk
    splits = triton.cdiv(k, per)
    if splits > 1:
        y = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    else:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)

    def run():
        if splits > 1:
            y.zero_()
        _stream_gemm[(triton.cdiv(n, bn), splits)](x, w, y, m, n, k, per, BM=bm, BN=bn, BK=bk,
                                                   ATOMIC=splits > 1, num_warps=warps, num_stages=stages)
        return y

    return run


def graph_time(fn, reps=50) -> float:
    """Median seconds of one call, CUDA graph replay, L2 flushed before each."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="16,64,128")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    bw = copy_bandwidth()
    torch.manual_seed(0)
    grid = list(itertools.product((32, 64, 128), (128, 256), (4,), (3, 4, 6), (1, 2, 4)))
    rows = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, w)
            t_ref = graph_time(lambda x=x, w=w: torch.nn.functional.linear(x, w))
            floor = (n * k + m * k + m * n) * 2 / bw
            best = None
            for bn, bk, warps, stages, split in grid:
                fn = stream_gemm(x, w, bn, bk, warps, stages, split)
                try:
                    got = fn()
                    err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
                    if err > 2e-2:
                        continue
                    t = graph_time(fn)
                except Exception:  # noqa: BLE001 - shapes the compiler or the GPU refuses are skipped
                    continue
                if best is None or t < best["t"]:
                    best = dict(t=t, bn=bn, bk=bk, warps=warps, stages=stages, split=split, err=err)
            row = dict(shape=name, n=n, k=k, rows=m, cublas_s=t_ref, floor_s=floor, best=best,
                       cublas_over_floor=t_ref / floor, best_over_floor=best["t"] / floor if best else None)
            rows.append(row)
            print(f"{name:8} M={m:4} cublas {t_ref * 1e6:7.1f} us ({t_ref / floor:.2f} of floor)  "
                  f"triton best {best['t'] * 1e6 if best else float('nan'):7.1f} us "
                  f"({(best['t'] / floor) if best else float('nan'):.2f}) {best}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm_bench.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), copy_bandwidth_Bps=bw,
                                                         rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
