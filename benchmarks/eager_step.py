"""Host against device time of one eager mixed step (GPU, dummy weights, no profiler).

    python3 benchmarks/eager_step.py --out DIR

A mixed step is what a serving run's prefill steps are: a few prompts being prefilled while
the running requests decode beside them, run eagerly (no CUDA graph fits its shapes). The
serving runs showed the engine thread busy for the whole run, half of it launching such
steps (Engine.host_s: 29-43 ms per prefill step on an H200 host), so this times, for the
same step with no LoRA, with few adapters and with every row on its own adapter:

* host_*: the engine thread's time to prepare the step's tables, enqueue the forward and
  launch the greedy sampling, with the GPU idle before it (sync first);
* queued_host: the same host work for a step enqueued right behind an identical one, as
  the engine's overlap does: more than host means the host waited for the GPU (a full
  launch queue, or a copy that waits for the stream);
* behind_sleep_host / gpu: the step enqueued behind a 100 ms GPU sleep: host time that no
  GPU work can block (unless the launch queue fills), and the step's device time alone;
* ops: host ms per step by op (linears, attention, each kernel op, LoRA), behind the sleep.

Each row is the median of --iters repetitions.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_step import QKVO, make_requests, newcomer_request, release  # noqa: E402
from slora_backend.config import EngineConfig  # noqa: E402
from slora_backend.dummy import random_adapter  # noqa: E402
from slora_backend.engine import Engine  # noqa: E402
from slora_backend.scheduler import ScheduledStep  # noqa: E402

log = logging.getLogger("eager_step")
S2 = (64, 32, 16, 8)


def enqueue(engine: Engine, step: ScheduledStep) -> tuple[dict, object]:
    """Prepare, forward and greedy sampling of one step, as Engine._launch does; host seconds
    of each part and the pending tokens."""
    t0 = time.perf_counter()
    inputs = engine.runner.prepare(step, engine.adapters)
    t1 = time.perf_counter()
    logits = engine.runner.forward(inputs)
    t2 = time.perf_counter()
    tokens = engine.sampler.launch_greedy(logits, step.requests)
    t3 = time.perf_counter()
    return {"prepare": t1 - t0, "forward": t2 - t1, "sample": t3 - t2, "total": t3 - t0}, tokens


def gpu_sleep(seconds: float = 0.1) -> None:
    """Keep the GPU busy for about `seconds`, so that what is enqueued next waits behind it."""
    torch.cuda._sleep(int(seconds * torch.cuda.get_device_properties(0).clock_rate * 1e3))  # clock_rate: kHz


def time_case(engine: Engine, step: ScheduledStep, iters: int) -> dict:
    """Host parts with the GPU idle; then the step enqueued behind a 100 ms GPU sleep, so that
    its host time is free of any wait on the GPU (unless the launch queue fills up) and the
    events around it time the GPU alone (everything is queued before the GPU reaches it)."""
    host: dict[str, list[float]] = {"prepare": [], "forward": [], "sample": [], "total": []}
    queued, behind, gpu = [], [], []
    for i in range(iters + 2):
        torch.cuda.synchronize()
        parts, tokens = enqueue(engine, step)
        second, tokens2 = enqueue(engine, step)  # behind the first, still on the GPU
        tokens.wait()
        tokens2.wait()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        gpu_sleep()
        start.record()
        third, tokens3 = enqueue(engine, step)
        end.record()
        tokens3.wait()
        if i >= 2:
            for k, v in parts.items():
                host[k].append(v)
            queued.append(second["total"])
            behind.append(third["total"])
            gpu.append(start.elapsed_time(end) / 1e3)
    out = {f"host_{k}_s": statistics.median(v) for k, v in host.items()}
    out["queued_host_s"] = statistics.median(queued)
    out["behind_sleep_host_s"] = statistics.median(behind)
    out["gpu_s"] = statistics.median(gpu)
    return out


class OpTimer:
    """Host time per kind of op in a forward: the runner's ops, its linears and prefill
    attention wrapped with perf_counter (about 1 us each), the Triton launches counted."""

    def __init__(self, engine: Engine):
        import slora_backend.model_runner as mr

        self.engine, self.mr = engine, mr
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed

    def measure(self, step: ScheduledStep, iters: int) -> dict:
        import types

        runner, mr = self.engine.runner, self.mr
        ops, functional, attention = runner.ops, mr.F, runner._prefill_attention
        runner.ops = types.SimpleNamespace(**{k: self.wrap(k, v) for k, v in vars(ops).items()})
        mr.F = types.SimpleNamespace(**{k: getattr(functional, k) for k in dir(functional) if not k.startswith("_")})
        mr.F.linear = self.wrap("linear", functional.linear)
        runner._prefill_attention = self.wrap("prefill_attention", attention)
        try:
            for _ in range(iters):
                torch.cuda.synchronize()
                gpu_sleep()
                t0 = time.perf_counter()
                inputs = runner.prepare(step, self.engine.adapters)
                self.seconds["prepare"] = self.seconds.get("prepare", 0.0) + time.perf_counter() - t0
                t0 = time.perf_counter()
                runner.forward(inputs)
                self.seconds["forward"] = self.seconds.get("forward", 0.0) + time.perf_counter() - t0
                torch.cuda.synchronize()
        finally:
            runner.ops, mr.F = ops, functional
            del runner._prefill_attention
        return {k: {"ms_per_step": round(1e3 * v / iters, 3), "calls_per_step": self.calls.get(k, iters) / iters}
                for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama-7b")
    ap.add_argument("--decode", type=int, default=128, help="running requests decoding in the step")
    ap.add_argument("--ctx", type=int, default=256, help="their tokens of KV")
    ap.add_argument("--prompts", default="200,200,200", help="prompt lengths prefilled in the step")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    prompts = [int(p) for p in args.prompts.split(",")]
    engine = Engine(EngineConfig(model_dir=args.model, max_model_len=2048, max_batch_size=512))
    s = engine.spec
    n_distinct = args.decode + len(prompts)
    for i in range(n_distinct):
        engine.register_adapter(random_adapter(f"a{i}", s, S2[i % 4], QKVO, engine.dtype, seed=i,
                                               device="cuda", pin=True))
    cases = {"base": lambda i: None, "n5": lambda i: f"a{i % 5}", "distinct": lambda i: f"a{i}"}
    rows = {}
    for case, adapter_of in cases.items():
        reqs = make_requests(engine, args.decode, args.ctx, [adapter_of(i) for i in range(args.decode)])
        newcomers = [newcomer_request(engine, n, adapter_of(args.decode + j)) for j, n in enumerate(prompts)]
        torch.cuda.synchronize()
        step = ScheduledStep(prefill=True, requests=[*newcomers, *reqs], decodes=len(reqs))
        split_before = engine.runner.decode_part_steps
        rows[case] = time_case(engine, step, args.iters)
        rows[case]["decode_rows_split"] = engine.runner.decode_part_steps > split_before
        rows[case]["ops"] = OpTimer(engine).measure(step, args.iters)
        release(engine, [*newcomers, *reqs])
    for label, r in rows.items():
        log.info("%-8s host %.2f ms (prepare %.2f, forward %.2f, sample %.2f), queued host %.2f ms, behind a "
                 "sleep %.2f ms, gpu %.2f ms; ops %s", label, 1e3 * r["host_total_s"], 1e3 * r["host_prepare_s"],
                 1e3 * r["host_forward_s"], 1e3 * r["host_sample_s"], 1e3 * r["queued_host_s"],
                 1e3 * r["behind_sleep_host_s"], 1e3 * r["gpu_s"], r["ops"])
    engine.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "args": vars(args),
              "rows": rows}
    (out / "eager_step.json").write_text(json.dumps(report, indent=2))
    for label, r in rows.items():
        print(f"{label:>12}: host {1e3 * r['host_total_s']:6.2f} ms (forward {1e3 * r['host_forward_s']:6.2f}) "
              f"queued {1e3 * r['queued_host_s']:6.2f} behind sleep {1e3 * r['behind_sleep_host_s']:6.2f} ms "
              f"gpu {1e3 * r['gpu_s']:6.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
