"""Host time per launch on the GPU host: what an eager (prefill) step pays per op.

    python3 benchmarks/launch_cost.py --out DIR      # GPU only; writes DIR/launch_cost.json

Eager steps are host-bound (BENCHMARKS.md: a TP=2 LoRA prefill step spends 62.6 of 71.8 ms
enqueueing), and the profilers that found it inflate Python calls. This times each kind of
launch without a profiler: `--calls` back-to-back launches of one op with no sync between
them (fewer than the launch queue holds, so the host never waits for the GPU), the wall time
over the count. Ops: an allocation, a one-element torch op, the LoRA shrink through Triton's
JIT launcher (kernels/launch.py KernelCall), the same compiled kernel called through its
launcher directly (what a cached launcher could save), a whole eager LoRA point
(`lora_apply`: table lookup, tmp, shrink, expand), and an all-reduce of a one-process NCCL
group (torch.distributed's Python wrappers). Shapes: Llama-7B q,k,v, 8 prompts x 100 tokens
on distinct S2 adapters, as in a prefill step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def host_us(fn, calls: int) -> float:
    """Median over 5 rounds of host microseconds per call (sync before each round only)."""
    fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    rounds.sort()
    return round(rounds[2], 2)


def direct_launch(call):
    """The compiled kernel of a KernelCall, launched without the JIT's per-call binding: the
    arguments are bound once here. Triton-internal API (3.x); None when it does not fit."""
    kernel = call.kernel
    compiled = kernel.warmup(*call.args, grid=call.grid, **call.kwargs)
    if hasattr(compiled, "_init_handles"):
        compiled._init_handles()
    binder = kernel.device_caches[torch.cuda.current_device()][-1]
    bound, _, _ = binder(*call.args, **call.kwargs)
    args = tuple(bound.values())
    grid = tuple(call.grid) + (1,) * (3 - len(call.grid))
    stream = torch.cuda.current_stream().cuda_stream

    def launch():
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                     None, None, None, *args)

    return launch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("launch_cost.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from benchmarks.kernel_bench import S2, LoraCase, default_cfg
    from kernels.lora import _group_table, lora_apply, lora_calls

    case = LoraCase([100] * 8, [S2[i % 4] for i in range(8)])
    batch, x, pool = case.batch, case.x, case.pool
    y = torch.zeros(x.shape[0], 3 * x.shape[1], dtype=x.dtype, device=x.device)
    group = _group_table((0, 0, 0), (0, 4096, 8192), (4096, 4096, 4096), x.device)
    cfg = default_cfg(case)
    shrink, expand = lora_calls(x, y, pool, batch, group, 4096, cfg)
    small = torch.zeros(1, device="cuda")
    n = args.calls
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__, "calls": n,
              "cpu": os.cpu_count(), "host_us_per_call": {}}
    timings = result["host_us_per_call"]
    timings["torch.empty (800, 3, 64) fp32"] = host_us(
        lambda: torch.empty((800, 3, 64), dtype=torch.float32, device="cuda"), n)
    timings["torch add_ (1 element)"] = host_us(lambda: small.add_(1.0), n)
    timings["triton shrink, JIT launcher"] = host_us(shrink.run, n)
    timings["triton expand, JIT launcher"] = host_us(expand.run, n)
    try:
        timings["triton shrink, direct launcher"] = host_us(direct_launch(shrink), n)
        timings["triton expand, direct launcher"] = host_us(direct_launch(expand), n)
    except Exception as e:  # an internal API: record why it did not fit this Triton
        result["direct_launch_error"] = repr(e)
    timings["lora_apply (q,k,v point: tmp + 2 launches)"] = host_us(
        lambda: lora_apply(x, y, pool, batch, (0, 1, 2), (0, 4096, 8192)), n // 4)
    try:
        import torch.distributed as dist

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
        part = torch.zeros(800, 64, device="cuda")
        timings["dist.all_reduce (800 x 64 fp32, 1 rank)"] = host_us(lambda: dist.all_reduce(part), n)
        gathered = torch.empty(800, 64, device="cuda")
        timings["dist.all_gather_into_tensor (1 rank)"] = host_us(
            lambda: dist.all_gather_into_tensor(gathered, part), n)
        dist.destroy_process_group()
    except Exception as e:
        result["dist_error"] = repr(e)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch_cost.json").write_text(json.dumps(result, indent=1))
    for name, us in timings.items():
        print(f"{us:9.2f} us  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
