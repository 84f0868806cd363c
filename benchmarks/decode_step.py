"""Decode-step breakdown against its byte floor (GPU, dummy weights).

    python benchmarks/decode_step.py --model dummy:llama-7b --batch 1,32,128 --ctx 512

For each batch size B, B running requests with `ctx` tokens of KV each are set up directly
in the pool (no scheduler), each on its own S2 adapter (ranks 64/32/16/8 on q,k,v,o), and
one decode step is timed in parts: host preparation of the step's tables, the GPU forward
(CUDA events), and sampling. Also the same step with no LoRA. The floor is the bytes a step
must read (all weights + the batch's KV + every distinct adapter once) over the measured
device copy bandwidth.

With --prefill-len P (default 256), also the cost of a prefill arriving while the B requests
decode, as wall time (host and GPU, synchronised): one mixed step (the engine's default:
decode rows ride in the prefill step) against a prefill step followed by a decode step.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slora_backend.config import EngineConfig  # noqa: E402
from slora_backend.dummy import random_adapter  # noqa: E402
from slora_backend.engine import Engine  # noqa: E402
from slora_backend.page_pool import PageUse  # noqa: E402
from slora_backend.request import PageList, Request, SamplingParams, Status  # noqa: E402
from slora_backend.scheduler import ScheduledStep  # noqa: E402

log = logging.getLogger("decode_step")
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    bw = 2 * a.numel() * 10 / (start.elapsed_time(end) / 1e3)
    del a, b
    return bw


def running_request(engine: Engine, prompt_ids: list[int], adapter: str | None, output_ids: list[int]) -> Request:
    """A request set up as the scheduler would have it running: adapter resident and held,
    KV pages for every token it has."""
    r = Request(prompt_ids=prompt_ids, params=SamplingParams(max_tokens=8, ignore_eos=True), adapter=adapter,
                on_output=lambda o: None)
    r.output_ids = output_ids
    if adapter is not None:
        assert engine.adapters.start_load(adapter)
        engine.adapters.acquire(adapter)
    r.kv_pages = PageList(engine.pool.alloc(2 * r.seq_len, PageUse.KV))
    r.status = Status.RUNNING
    return r


def make_requests(engine: Engine, batch: int, ctx: int, adapters: list[str | None]) -> list[Request]:
    rng = np.random.default_rng(0)
    reqs = [running_request(engine, rng.integers(1, engine.spec.vocab, ctx - 1).tolist(), adapters[i], [1])
            for i in range(batch)]
    if engine.device.type == "cuda":  # adapter copies done before timing (tp_decode_step.py also runs on CPU)
        torch.cuda.synchronize()
    return reqs


def release(engine: Engine, reqs: list[Request]) -> None:
    for r in reqs:
        engine.pool.release(r.kv_pages.tolist(), PageUse.KV)
        if r.adapter is not None:
            engine.adapters.release(r.adapter)
    engine.adapters.evict_all_idle()


def time_step(engine: Engine, reqs: list[Request], iters: int, graph: bool) -> dict:
    """Median times of one decode step; with graph=True the replay path the engine uses."""
    step = ScheduledStep(prefill=False, requests=reqs)
    prep, fwd, launch, samp = [], [], [], []
    for i in range(iters + 3):
        torch.cuda.synchronize()
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        if graph:  # staging the static buffers is the host part, the replay the GPU part
            staged = engine.graphs.stage(step, engine.adapters)
            t1 = time.perf_counter()
            ev0.record()
            logits = engine.graphs.replay(*staged)
        else:
            inputs = engine.runner.prepare(step, engine.adapters)
            t1 = time.perf_counter()
            ev0.record()
            logits = engine.runner.forward(inputs)
        ev1.record()
        t2 = time.perf_counter()
        engine.sampler.sample(logits, reqs)
        t3 = time.perf_counter()
        if i >= 3:
            prep.append(t1 - t0)
            fwd.append(ev0.elapsed_time(ev1) / 1e3)
            launch.append(t2 - t1)
            samp.append(t3 - t2)
    return {"prepare_s": statistics.median(prep), "forward_gpu_s": statistics.median(fwd),
            "forward_launch_s": statistics.median(launch), "sample_and_sync_s": statistics.median(samp)}


def profile_step(engine: Engine, reqs: list[Request], steps: int = 5) -> dict:
    """GPU time by kernel name over `steps` graph replays (torch.profiler, CUPTI), per step:
    where a decode step's time goes. Kernels on the side stream overlap others, so the sum
    may exceed the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    step = ScheduledStep(prefill=False, requests=reqs)
    staged = engine.graphs.stage(step, engine.adapters)
    engine.graphs.replay(*staged)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.graphs.replay(*staged)
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            entry = by_name.setdefault(ev.name[:90], [0.0, 0])
            entry[0] += ev.device_time / 1e6 / steps  # us -> s, per step
            entry[1] += 1 / steps
    rows = sorted(({"kernel": k, "s_per_step": v[0], "calls_per_step": v[1]} for k, v in by_name.items()),
                  key=lambda r: -r["s_per_step"])
    return {"kernels": rows, "sum_s": sum(r["s_per_step"] for r in rows)}


def _sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def time_mixed(engine: Engine, reqs: list[Request], newcomer: Request, iters: int) -> dict:
    """Median wall times of serving `newcomer`'s prefill while `reqs` decode: as one mixed step,
    and as a prefill step then a decode step (graph replay when the engine has graphs)."""
    mixed = ScheduledStep(prefill=True, requests=[newcomer, *reqs], decodes=len(reqs))
    alone = ScheduledStep(prefill=True, requests=[newcomer])
    decode = ScheduledStep(prefill=False, requests=reqs)

    def run(step: ScheduledStep) -> None:
        if not step.prefill and engine.graphs is not None:
            logits = engine.graphs.run(step, engine.adapters)
        else:
            logits = engine.runner.forward(engine.runner.prepare(step, engine.adapters))
        engine.sampler.sample(logits, step.requests)

    out = {}
    for label, steps in (("mixed_s", [mixed]), ("separate_s", [alone, decode])):
        times = []
        for i in range(iters + 2):
            _sync(engine)
            t0 = time.perf_counter()
            for step in steps:
                run(step)
            _sync(engine)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out[label] = statistics.median(times)
    return out


def newcomer_request(engine: Engine, length: int, adapter: str | None) -> Request:
    """A request about to be prefilled: `length` prompt tokens, nothing generated yet."""
    rng = np.random.default_rng(1)
    return running_request(engine, rng.integers(1, engine.spec.vocab, length).tolist(), adapter, [])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama-7b")
    ap.add_argument("--batch", default="1,32,128")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--no-lora-beside", action="store_true",
                    help="LoRA shrinks after the base GEMMs on one stream (EngineConfig.lora_beside_gemm=false)")
    ap.add_argument("--prefill-len", type=int, default=256, help="newcomer prompt for the mixed-step rows; 0: none")
    ap.add_argument("--profile", default="", help="batch sizes whose graph step is also profiled by kernel")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    profiled = {int(b) for b in args.profile.split(",") if b}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bw = copy_bandwidth()
    batches = [int(b) for b in args.batch.split(",")]
    engine = Engine(EngineConfig(model_dir=args.model, max_model_len=max(2048, args.ctx + 16),
                                 max_batch_size=max(batches), cuda_graphs=not args.no_graphs,
                                 lora_beside_gemm=not args.no_lora_beside))
    s, elt = engine.spec, engine.pool_tensor.element_size()
    ranks = (64, 32, 16, 8)
    for i in range(max(batches) + 1):  # the last one is the newcomer's (--prefill-len)
        engine.register_adapter(random_adapter(f"a{i}", s, ranks[i % 4], QKVO, engine.dtype, seed=i,
                                               device="cuda", pin=True))
    weight_bytes = sum(t.numel() * t.element_size() for lw in engine.runner.w.layers
                       for t in (lw.qkv, lw.o, lw.gate_up, lw.down, lw.input_norm, lw.post_norm))
    weight_bytes += engine.runner.w.lm_head.numel() * elt
    rows, profiles = [], []
    for b in batches:
        kv_bytes = b * args.ctx * 2 * s.layers * s.page_width * elt
        for label, names in (("base", [None] * b), ("lora", [f"a{i}" for i in range(b)])):
            for graph in ([False, True] if engine.graphs is not None else [False]):
                reqs = make_requests(engine, b, args.ctx, names)
                adapter_bytes = sum(engine.adapters.host[n].nbytes for n in set(names) if n is not None)
                t = time_step(engine, reqs, args.iters, graph)
                if graph and b in profiled:
                    prof = profile_step(engine, reqs)
                    profiles.append(dict(batch=b, mode=label.split("/")[0], forward_gpu_s=t["forward_gpu_s"], **prof))
                    log.info("B=%3d %s kernels by GPU time per step (sum %.2f ms):\n%s", b, label.split("/")[0],
                             1e3 * prof["sum_s"],
                             "\n".join(f"  {1e6 * r['s_per_step']:9.1f} us {r['calls_per_step']:6.1f}x {r['kernel']}"
                                       for r in prof["kernels"][:25]))
                release(engine, reqs)
                label = f"{label.split('/')[0]}/{'graph' if graph else 'eager'}"
                floor = (weight_bytes + kv_bytes + adapter_bytes) / bw
                row = dict(batch=b, mode=label, ctx=args.ctx, **t, floor_s=floor,
                           forward_over_floor=t["forward_gpu_s"] / floor, adapter_bytes=adapter_bytes,
                           kv_bytes=kv_bytes, weight_bytes=weight_bytes)
                rows.append(row)
                log.info("B=%3d %-10s prepare %.2fms forward(gpu) %.2fms sample+sync %.2fms floor %.2fms -> %.2fx",
                         b, label, 1e3 * t["prepare_s"], 1e3 * t["forward_gpu_s"], 1e3 * t["sample_and_sync_s"],
                         1e3 * floor, t["forward_gpu_s"] / floor)
            if args.prefill_len > 0:  # a prefill arriving while these decode: mixed step vs two steps
                reqs = make_requests(engine, b, args.ctx, names)
                newcomer = newcomer_request(engine, args.prefill_len, None if label.startswith("base") else
                                           f"a{max(batches)}")
                t = time_mixed(engine, reqs, newcomer, args.iters)
                release(engine, [*reqs, newcomer])
                mode = f"{label.split('/')[0]}/prefill{args.prefill_len}+decode"
                rows.append(dict(batch=b, mode=mode, ctx=args.ctx, **t,
                                 mixed_over_separate=t["mixed_s"] / t["separate_s"]))
                log.info("B=%3d %-10s mixed %.2fms, prefill step + decode step %.2fms (%.2fx)", b, mode,
                         1e3 * t["mixed_s"], 1e3 * t["separate_s"], t["mixed_s"] / t["separate_s"])
    engine.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "copy_bandwidth_Bps": bw, "model": args.model, "rows": rows}
    if profiles:
        report["profiles"] = profiles
    (out / "decode_step.json").write_text(json.dumps(report, indent=2))
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    for r in rows:
        if "mixed_s" in r:
            print(f"B={r['batch']:>4} {r['mode']:<10} mixed {1e3 * r['mixed_s']:6.2f}ms "
                  f"separate {1e3 * r['separate_s']:6.2f}ms ratio {r['mixed_over_separate']:.2f}")
            continue
        print(f"B={r['batch']:>4} {r['mode']:<10} prep {1e3 * r['prepare_s']:6.2f}ms "
              f"fwd {1e3 * r['forward_gpu_s']:6.2f}ms (launch {1e3 * r['forward_launch_s']:6.2f}ms) "
              f"sample {1e3 * r['sample_and_sync_s']:6.2f}ms floor {1e3 * r['floor_s']:6.2f}ms "
              f"fwd/floor {r['forward_over_floor']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
