"""Where a tensor-parallel prefill step's time goes: rank 0's host and device view.

    python benchmarks/tp_profile.py --out results_dir                 # TP=2 and TP=1 (a process each), Llama-13B, S4
    python benchmarks/tp_profile.py --model dummy:tiny --tp 2,1 --tokens 64 --out /tmp/p   # CPU (gloo)

For each TP size: an engine (dummy weights and adapters, eager steps), then bursts of
`--requests` prompts of `--tokens` tokens with one output token each, so that every step is a
prefill of about requests x tokens rows: once as base-model requests, once each on its own
adapter. Reported per kind: wall ms per step (the engine's own step timer), and one burst
under torch.profiler on rank 0: the ops with the most host time and the most device time
(NCCL waits show up as collective kernels' device time). The tp_bench runs showed TP=2 LoRA
prefill steps at 164 ms against 64 ms without LoRA and 74 ms for TP=1 with LoRA; this says why.

With `--decode-rows D`, D long requests (each on its own adapter) decode throughout, so every
burst step is a mixed step with D decode rows, and a third kind, `lora_split`, runs the LoRA
bursts with those rows on the MBGMV kernels (LoraBatch.decode; under TP the shared
intermediate of tensor_parallel.TPLoraStep). Only the forwards of prefill (mixed) steps are
timed and profiled. This is the measurement BENCHMARKS.md item 17 asks for: where the split
loses time under TP with the collectives on.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.tp_bench import nvlink_multicast_off  # noqa: E402  (after the path set-up)

nvlink_multicast_off()

log = logging.getLogger("tp_profile")


def burst(engine, prompts: list[list[int]], adapters: list[str | None]) -> None:
    """Submit all prompts at once (one output token each) and wait until all have finished."""
    from slora_backend.request import SamplingParams

    done = threading.Semaphore(0)
    errors = []

    def on_output(out):
        if out.finished:
            if out.error:
                errors.append(out.error)
            done.release()

    for ids, adapter in zip(prompts, adapters, strict=True):
        engine.submit(prompt_ids=ids, adapter=adapter, params=SamplingParams(max_tokens=1, ignore_eos=True),
                      on_output=on_output)
    for _ in prompts:
        if not done.acquire(timeout=300):
            raise RuntimeError("a burst did not finish in 300 s")
    if errors:
        raise RuntimeError(f"requests failed: {errors[:3]}")


class StepProfiler:
    """Profiles the engine thread's forwards while `on` (the profiler records the thread it runs
    in, so it is entered around each forward there) and sums the ops over the profiled steps."""

    def __init__(self, runner):
        import torch

        self.on, self.ops, self.forward = False, {}, runner.forward
        self.python = None  # a cProfile.Profile while the Python-level profile is on
        self.cuda = torch.cuda.is_available()
        self.times = []  # (host ms to enqueue the forward, ms until the device finished it)
        runner.forward = self._forward

    def _forward(self, inp):
        import torch
        from torch.profiler import ProfilerActivity, profile

        if not inp.prefill:  # decode steps of --decode-rows' requests: not what is measured
            return self.forward(inp)
        if self.python is not None:  # Python functions: where host time goes outside torch ops
            self.python.enable()
            try:
                return self.forward(inp)
            finally:
                self.python.disable()
        if not self.on:  # timed: host enqueue time against the time until the device is done
            t0 = time.perf_counter()
            logits = self.forward(inp)
            t1 = time.perf_counter()
            if self.cuda:
                torch.cuda.synchronize()
            self.times.append((1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t0)))
            return logits
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with profile(activities=activities) as prof:
            logits = self.forward(inp)
            if self.cuda:
                torch.cuda.synchronize()
        for e in prof.key_averages():
            row = self.ops.setdefault(e.key[:70], [0, 0.0, 0.0])
            row[0] += e.count
            row[1] += e.self_cpu_time_total / 1e3
            row[2] += getattr(e, "self_device_time_total", 0) / 1e3
        return logits

    def take_times(self) -> dict:
        n = max(len(self.times), 1)
        out = {"forwards": len(self.times), "enqueue_ms": round(sum(t[0] for t in self.times) / n, 2),
               "forward_ms": round(sum(t[1] for t in self.times) / n, 2)}
        self.times = []
        return out

    def take(self, top: int) -> dict:
        """The `top` ops by host time and by device time (calls, self ms), and forget them."""
        rows = [{"op": k, "calls": c, "self_cpu_ms": round(h, 3), "self_device_ms": round(d, 3)}
                for k, (c, h, d) in self.ops.items()]
        self.ops = {}
        return {"top_host": sorted(rows, key=lambda r: -r["self_cpu_ms"])[:top],
                "top_device": sorted(rows, key=lambda r: -r["self_device_ms"])[:top]}


def print_ops(title: str, rows: list[dict]) -> None:
    print(f"--- {title}")
    for r in rows:
        print(f"  {r['op']:<70} {r['calls']:>6} calls  host {r['self_cpu_ms']:9.2f} ms  "
              f"device {r['self_device_ms']:9.2f} ms")


def profile_tp(args, tp: int) -> dict:
    import numpy as np
    import torch

    from benchmarks.slora_bench import run_counters
    from slora_backend.config import EngineConfig
    from slora_backend.engine import Engine

    ranks = ",".join(map(str, args.ranks))
    split = args.decode_rows > 0  # the decode-row split is compiled in and toggled per kind
    cfg = EngineConfig(model_dir=args.model, tensor_parallel_size=tp, max_model_len=2048,
                       max_batch_size=max(64, args.requests + args.decode_rows), max_prefill_tokens=8192,
                       cuda_graphs=False, dummy_adapters=f"{args.requests + args.decode_rows}:{ranks}:qkvo",
                       lora_decode_rows_gmv=split, tp_lora_decode_rows_gmv=split, lora_decode_gmv_min_segments=1,
                       admit_min_batch=1)
    t0 = time.monotonic()
    engine = Engine(cfg)
    log.info("TP=%d engine ready in %.1fs", tp, time.monotonic() - t0)
    profiler = StepProfiler(engine.runner)
    rng = np.random.default_rng(0)
    vocab = engine.spec.vocab
    out = {"tp": tp, "startup_s": time.monotonic() - t0, "decode_rows": args.decode_rows}
    background = start_decoders(engine, args, rng)
    try:
        for kind in ("base", "lora", "lora_split") if split else ("base", "lora"):
            # Rank 0 decides the split when it builds a step's tables; the workers follow.
            engine.runner.lora_decode_rows_gmv = kind == "lora_split"
            adapters = [None if kind == "base" else f"adapter-{i:05d}" for i in range(args.requests)]

            def prompts():
                return [rng.integers(0, vocab, args.tokens).tolist() for _ in range(args.requests)]

            burst(engine, prompts(), adapters)  # adapters loaded, anything lazy done
            profiler.take_times()
            before = engine.stats()
            t1 = time.monotonic()
            for _ in range(args.bursts):
                burst(engine, prompts(), adapters)
            wall = time.monotonic() - t1
            counters = run_counters(before, engine.stats())
            forwards = profiler.take_times()
            profiler.on = True
            burst(engine, prompts(), adapters)
            profiler.on = False
            ops = profiler.take(args.top)
            profiler.python = cProfile.Profile()
            burst(engine, prompts(), adapters)
            python, profiler.python = profiler.python, None
            text = io.StringIO()
            pstats.Stats(python, stream=text).sort_stats("tottime").print_stats(args.top)
            print(f"--- TP={tp} {kind}, one burst on rank 0: Python functions by own time")
            print("\n".join(text.getvalue().splitlines()[-args.top - 3:]))
            ops["python_top"] = text.getvalue().splitlines()[-args.top - 3:]
            out[kind] = {"counters": counters, "ms_per_step": counters["prefill_ms_per_step"],
                         "tokens_per_step": counters["prefill_tokens_per_step"], "burst_wall_s": wall / args.bursts,
                         **forwards,
                         **ops}
            log.info("TP=%d %s: %d prefill steps, %.1f ms/step, %.0f tokens/step; forward: enqueue %.1f ms, "
                     "done %.1f ms", tp, kind, counters["prefill_steps"], out[kind]["ms_per_step"],
                     out[kind]["tokens_per_step"], forwards["enqueue_ms"], forwards["forward_ms"])
            print_ops(f"TP={tp} {kind}, one burst on rank 0: by host time", ops["top_host"])
            if torch.cuda.is_available():
                print_ops(f"TP={tp} {kind}, one burst on rank 0: by device time", ops["top_device"])
        out["decode_part_steps"] = engine.runner.decode_part_steps
    finally:
        for request_id in background:
            engine.cancel(request_id)
        engine.shutdown()
    return out


def start_decoders(engine, args, rng) -> list[int]:
    """--decode-rows requests, each on its own adapter (after the bursts' ones), that decode for
    as long as the profile runs: every burst step then carries that many decode rows."""
    from slora_backend.request import SamplingParams

    if not args.decode_rows:
        return []
    first = threading.Semaphore(0)
    seen: set[int] = set()

    def on_output(out):
        if out.request_id not in seen:
            seen.add(out.request_id)
            first.release()

    ids = [engine.submit(prompt_ids=rng.integers(0, engine.spec.vocab, 16).tolist(),
                         adapter=f"adapter-{args.requests + i:05d}", on_output=on_output,
                         params=SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True))
           for i in range(args.decode_rows)]
    for _ in ids:  # every one has its first token: all of them decode from here on
        if not first.acquire(timeout=300):
            raise RuntimeError("the decoding requests did not start within 300 s")
    return ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="dummy:llama-13b")
    ap.add_argument("--tp", default="2,1", help="comma-separated TP sizes, profiled one after another")
    ap.add_argument("--ranks", default="64,32,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--requests", type=int, default=8, help="prompts per burst (each its own adapter)")
    ap.add_argument("--tokens", type=int, default=100, help="tokens per prompt")
    ap.add_argument("--bursts", type=int, default=5)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--decode-rows", type=int, default=0,
                    help="requests decoding throughout: every burst step is a mixed step (and kind lora_split)")
    ap.add_argument("--decode-tokens", type=int, default=1900, help="output tokens of each decoding request")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d"), "args": {k: v for k, v in vars(args).items()}, "runs": []}
    sizes = [int(x) for x in args.tp.split(",")]
    if len(sizes) == 1:
        results["runs"].append(profile_tp(args, sizes[0]))
    else:
        # One process per TP size: an engine's GPU memory is only fully returned when its
        # process exits (a TP=1 engine after a TP=2 one in the same process ran out of memory).
        for tp in sizes:
            part = out / f"tp{tp}"
            argv = [a for a in sys.argv[1:]]
            for flag, value in (("--tp", str(tp)), ("--out", str(part))):
                if flag in argv:
                    argv[argv.index(flag) + 1] = value
                else:
                    argv += [flag, value]
            rc = subprocess.call([sys.executable, str(Path(__file__).resolve()), *argv])
            found = part / "tp_profile.json"
            if rc != 0 or not found.is_file():
                log.error("TP=%d profile failed (exit %d)", tp, rc)
                results["runs"].append({"tp": tp, "error": f"exit {rc}"})
            else:
                results["runs"].extend(json.loads(found.read_text())["runs"])
            (out / "tp_profile.json").write_text(json.dumps(results, indent=1))
    (out / "tp_profile.json").write_text(json.dumps(results, indent=1))
    for r in results["runs"]:
        print(f"TP={r['tp']}: " + ", ".join(
            f"{k} {r[k]['ms_per_step']:.1f} ms/step ({r[k]['tokens_per_step']:.0f} tok, "
            f"enqueue {r[k]['enqueue_ms']:.1f} ms, forward {r[k]['forward_ms']:.1f} ms)"
            for k in ("base", "lora", "lora_split") if k in r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
