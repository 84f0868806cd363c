"""Time the Triton kernels against torch_ops and the base GEMM they ride on (CUDA only).

    python benchmarks/kernel_bench.py [--dtype float16] [--check]

Shapes: Llama-3-8B (P = 8 * 128 = 1024, hidden 4096, q/k/v = 4096/1024/1024), adapters on
q,k,v of mixed ranks, pages shuffled through the pool as the allocator would leave them.
"""

import argparse
import logging
import math

import torch
import triton.testing

from kernels import LoraBatch, get_ops

log = logging.getLogger("kernel_bench")

HIDDEN, P, HEAD_DIM, N_HEADS = 4096, 1024, 128, 32
QKV_WIDTHS = (4096, 1024, 1024)


def make_lora_batch(seg_lens, seg_adapters, adapter_ranks, in_width, out_widths, dtype, dev):
    n_adapters = len(adapter_ranks)
    ranks = torch.zeros(7, n_adapters, dtype=torch.int32)
    a_starts = torch.zeros_like(ranks)
    b_starts = torch.zeros_like(ranks)
    n_entries = 0
    for a, r in enumerate(adapter_ranks):
        for m, out_w in enumerate(out_widths):
            ranks[m, a] = r
            a_starts[m, a] = n_entries
            n_entries += r * math.ceil(in_width / P)
            b_starts[m, a] = n_entries
            n_entries += r * math.ceil(out_w / P)
    pool = torch.randn(n_entries + 64, P, dtype=dtype, device=dev) * 0.02
    page_ids = torch.randperm(n_entries + 64, device=dev)[:n_entries].to(torch.int32)
    seg_starts = torch.tensor([0, *torch.tensor(seg_lens).cumsum(0).tolist()], dtype=torch.int32)
    batch = LoraBatch(
        seg_starts=seg_starts.to(dev),
        seg_adapter=torch.tensor(seg_adapters, dtype=torch.int32, device=dev),
        ranks=ranks.to(dev),
        scales=torch.full((7, n_adapters), 2.0, device=dev),
        a_starts=a_starts.to(dev),
        b_starts=b_starts.to(dev),
        page_ids=page_ids,
        max_rank=max(adapter_ranks),
        max_seg_len=max(seg_lens),
    )
    return pool, batch


def bench_lora(name, seg_lens, seg_adapters, adapter_ranks, dtype, check, ops):
    dev = "cuda"
    pool, batch = make_lora_batch(seg_lens, seg_adapters, adapter_ranks, HIDDEN, QKV_WIDTHS,
                                  dtype, dev)
    n_rows = sum(seg_lens)
    x = torch.randn(n_rows, HIDDEN, dtype=dtype, device=dev)
    y = torch.zeros(n_rows, sum(QKV_WIDTHS), dtype=dtype, device=dev)
    w_qkv = torch.randn(sum(QKV_WIDTHS), HIDDEN, dtype=dtype, device=dev) * 0.02
    offsets = (0, QKV_WIDTHS[0], QKV_WIDTHS[0] + QKV_WIDTHS[1])
    args = (x, y, pool, batch, (0, 1, 2), offsets)
    if check:
        y_ref = torch.zeros_like(y)
        ops["torch"].lora_apply(x, y_ref, pool, batch, (0, 1, 2), offsets)
        ops["triton"].lora_apply(*args)
        err = (y.float() - y_ref.float()).abs().max().item()
        log.info("%-28s max |triton - torch| = %.3g (|y| max %.3g)", name, err,
                 y_ref.abs().max().item())
    t_base = triton.testing.do_bench(lambda: x @ w_qkv.t())
    t_triton = triton.testing.do_bench(lambda: ops["triton"].lora_apply(*args))
    t_torch = triton.testing.do_bench(lambda: ops["torch"].lora_apply(*args))
    log.info("%-28s base qkv GEMM %8.3f ms | lora triton %8.3f ms | lora torch_ops %8.3f ms",
             name, t_base, t_triton, t_torch)


def bench_attention(batch, seq_len, dtype, check, ops):
    dev = "cuda"
    kv_heads = P // HEAD_DIM
    n_pages = 2 * batch * seq_len
    pool = torch.randn(n_pages, P, dtype=dtype, device=dev)
    kv_pages = torch.randperm(n_pages, device=dev).to(torch.int32).view(batch, seq_len, 2)
    seq_lens = torch.full((batch,), seq_len, dtype=torch.int32, device=dev)
    q = torch.randn(batch, N_HEADS, HEAD_DIM, dtype=dtype, device=dev)
    args = (q, pool, kv_pages, seq_lens, HEAD_DIM**-0.5)
    name = f"decode attn B={batch} L={seq_len}"
    if check:
        err = (ops["triton"].paged_decode_attention(*args).float()
               - ops["torch"].paged_decode_attention(*args).float()).abs().max().item()
        log.info("%-28s max |triton - torch| = %.3g", name, err)
    t_triton = triton.testing.do_bench(lambda: ops["triton"].paged_decode_attention(*args))
    t_torch = triton.testing.do_bench(lambda: ops["torch"].paged_decode_attention(*args))
    gbytes = 2 * batch * seq_len * P * pool.element_size() / 1e9
    log.info("%-28s triton %8.3f ms (%6.0f GB/s KV) | torch_ops %8.3f ms (Hkv=%d)",
             name, t_triton, gbytes / (t_triton / 1e3), t_torch, kv_heads)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--check", action="store_true", help="also compare with torch_ops")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dtype = getattr(torch, args.dtype)
    ops = {"triton": get_ops("triton"), "torch": get_ops("torch")}

    ranks = [8, 16, 32, 64] * 8  # 32 adapters of mixed rank
    for n in (32, 128):  # decode: one token per request, every request its own adapter slot
        bench_lora(f"decode S={n} (MBGMV)", [1] * n, [i % len(ranks) for i in range(n)], ranks,
                   dtype, args.check, ops)
    for n_seg, seg_len in ((4, 512), (16, 128)):
        bench_lora(f"prefill {n_seg}x{seg_len} (MBGMM)", [seg_len] * n_seg, list(range(n_seg)),
                   ranks, dtype, args.check, ops)
    for batch, seq_len in ((8, 4096), (64, 1024), (128, 512)):
        bench_attention(batch, seq_len, dtype, args.check, ops)


if __name__ == "__main__":
    main()
