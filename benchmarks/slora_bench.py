"""S-LoRA-style throughput benchmark against the in-process engine (dummy weights, GPU).

    python benchmarks/slora_bench.py --model dummy:llama-7b --setting S2 --n 5,100,1000 \\
        --rate 12 --duration 60 --out benchmarks/results

One engine, adapters registered once (the largest n); the same trace seed for every run;
each run starts with no adapter on the GPU. Runs in order: the base model alone (the
no-LoRA ceiling: the same trace with every adapter dropped), then each n. Writes
`<out>/slora_<setting>.json` with every report and the ratios to the ceiling.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import pstats
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.workload import RequestTiming, WorkloadSpec, make_trace, summarize  # noqa: E402
from slora_backend.checkpoint import MODULES  # noqa: E402
from slora_backend.config import EngineConfig  # noqa: E402
from slora_backend.dummy import dummy_spec, register_dummy_adapters  # noqa: E402
from slora_backend.engine import Engine  # noqa: E402
from slora_backend.request import SamplingParams  # noqa: E402

log = logging.getLogger("slora_bench")
SETTINGS = {"S1": (8,), "S2": (64, 32, 16, 8), "S4": (64, 32, 16)}


def run_counters(before: dict, after: dict) -> dict:
    """What the engine did during one run (Engine.stats before and after): loads, preemptions,
    steps, where the time went by step kind, and Triton compiles that stalled serving."""
    out = {"adapter_loads": after["adapters"]["loads"] - before["adapters"]["loads"],
           "preemptions": after["requests"]["preemptions"] - before["requests"]["preemptions"],
           "steps": after["steps"] - before["steps"],
           "mixed_steps": after["mixed_steps"] - before["mixed_steps"],
           "admission_deferred_steps": (after["requests"]["admission_deferred_steps"]
                                        - before["requests"]["admission_deferred_steps"]),
           "kernel_compiles": after["kernel_compiles_while_serving"] - before["kernel_compiles_while_serving"],
           # steps launched before the last one's tokens were read (Engine overlap), and
           # the host's time blocked on the GPU: near the run's length = device-bound
           "overlapped_steps": after["overlapped_steps"] - before["overlapped_steps"],
           "gpu_wait_s": round(after["gpu_wait_s"] - before["gpu_wait_s"], 3),
           # the engine thread's own time by phase (Engine.host_s)
           "host_s": {k: round(v - before["host_s"][k], 3) for k, v in after["host_s"].items()},
           # Variants this process holds: > 0 on a GPU shows the compile counter sees Triton's caches.
           "kernel_variants": after["kernel_variants"]}
    for kind, now in after["step_time"].items():
        was = before["step_time"][kind]
        steps = now["steps"] - was["steps"]
        seconds = now["seconds"] - was["seconds"]
        out[f"{kind}_steps"] = steps
        out[f"{kind}_seconds"] = round(seconds, 3)
        out[f"{kind}_tokens_per_step"] = round((now["tokens"] - was["tokens"]) / steps, 1) if steps else 0
        out[f"{kind}_ms_per_step"] = round(1e3 * seconds / steps, 2) if steps else 0
    return out


# The A/B twins of the default runs: (label suffix, the flag that asks for them, whether the
# base model runs too and the twins get their own ceiling). Each run's settings follow its
# label (main); the flags are in main's argument parser.
TWINS = (("_nomix", "ab_mix", True), ("_gmm", "ab_gmv", False), ("_admit1", "ab_admit", True),
         ("_sync", "ab_overlap", True), ("_nofence", "ab_fence", False), ("_gather", "ab_gather", True),
         ("_prof", "profile", True))


def twin_runs(args) -> list[tuple[str, Callable[[str], bool], bool]]:
    """(suffix, which default run labels get a twin, own ceiling) of the twins args ask for."""
    out = []
    for suffix, flag, own_ceiling in TWINS:
        if suffix == "_prof":  # --profile names the runs to repeat under cProfile
            wanted = set(filter(None, args.profile.split(",")))
            out.append((suffix, wanted.__contains__, own_ceiling))
        elif getattr(args, flag):
            out.append((suffix, lambda label: True, own_ceiling))
    return out


def write_profile(prof: cProfile.Profile, path: Path, top: int = 45) -> None:
    """The engine thread's profile: functions by own time, then by cumulative time."""
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    path.write_text(buf.getvalue())


def gmv_vs_gmm(runs: dict) -> dict:
    """--ab-gmv: each adapter run beside its *_gmm twin (decode rows of mixed steps on MBGMM)."""
    out = {}
    for label, gmv in runs.items():
        gmm = runs.get(f"{label}_gmm")
        if gmm is None:
            continue
        out[label] = {"throughput_req_s": [gmv["throughput_req_s"], gmm["throughput_req_s"]],
                      "throughput_ratio": gmv["throughput_req_s"] / gmm["throughput_req_s"],
                      "latency_avg": [gmv["latency_avg"], gmm["latency_avg"]],
                      "first_token_avg": [gmv["first_token_avg"], gmm["first_token_avg"]],
                      "prefill_ms_per_step": [gmv["extra"]["prefill_ms_per_step"], gmm["extra"]["prefill_ms_per_step"]],
                      "mixed_steps": [gmv["extra"]["mixed_steps"], gmm["extra"]["mixed_steps"]],
                      "kernel_compiles": [gmv["extra"]["kernel_compiles"], gmm["extra"]["kernel_compiles"]]}
    return out


def register_adapters(engine: Engine, n: int, ranks: tuple[int, ...], targets: str) -> float:
    """Register n random adapters; returns host bytes / weight bytes over all of them."""
    t0 = time.monotonic()
    register_dummy_adapters(engine, f"{n}:{','.join(map(str, ranks))}:{targets}")
    host = weights = 0
    for ad in engine.adapters.host.values():
        host += ad.nbytes
        weights += sum(r * sum(engine.spec.module_shape(m)) for r, m in zip(ad.ranks, MODULES, strict=True)
                       ) * engine.spec.layers * ad.pages.element_size()
    log.info("registered %d adapters in %.1fs (%.1f GB host)", n, time.monotonic() - t0, host / 1e9)
    return host / max(weights, 1)


def warm_up(engine: Engine, n_adapters: int, rate: float, seconds: float, max_len: int, deadline: float) -> float:
    """Replay `seconds` of short requests (8-16 output tokens) on `n_adapters` adapters, so that
    a measured run pays for no first-time work (allocator growth, library heuristics for new
    shapes, NCCL set-up): on the H200 the first run of a process (no LoRA, mixed steps) had a
    first-token p99 of 4-5 s against 0.07 s later in the same process. Returns its seconds."""
    spec = WorkloadSpec(n_adapters=n_adapters, rate=rate, duration=seconds, input_range=(8, max_len),
                        output_range=(8, 16), vocab=engine.spec.vocab, seed=99)
    t0 = time.monotonic()
    replay(engine, make_trace(spec), drop_adapters=False, deadline=deadline)
    return time.monotonic() - t0


def replay(engine: Engine, trace, drop_adapters: bool, deadline: float) -> list[RequestTiming]:
    timings = [RequestTiming(arrival=r.arrival) for r in trace]
    done = threading.Semaphore(0)
    start = time.monotonic()

    def callback_for(i):
        def on_output(out):
            t = timings[i]
            now = time.monotonic() - start
            if out.token_ids and t.first_token is None:
                t.first_token = now - t.arrival
            t.output_tokens = out.generated_tokens
            if out.finished:
                t.latency = now - t.arrival
                t.error = out.error
                done.release()
        return on_output

    ids = []
    last_log = 0.0
    for i, r in enumerate(trace):
        delay = r.arrival - (time.monotonic() - start)
        if delay > 0:
            time.sleep(delay)
        timings[i].arrival = time.monotonic() - start
        ids.append(engine.submit(prompt_ids=r.prompt_ids, adapter=None if drop_adapters else r.adapter,
                                 params=SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                                 on_output=callback_for(i)))
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            log.info("sent %d/%d  %s", i + 1, len(trace), engine.stats()["requests"])
    finished = 0
    while finished < len(trace):
        if not done.acquire(timeout=10):
            elapsed = time.monotonic() - start
            log.info("finished %d/%d at %.0fs  %s", finished, len(trace), elapsed, engine.stats()["requests"])
            if elapsed > deadline:
                for rid in ids:
                    engine.cancel(rid)
                deadline = float("inf")
            continue
        finished += 1
    return timings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama-7b")
    ap.add_argument("--setting", default="S2", choices=sorted(SETTINGS))
    ap.add_argument("--targets", default="qkvo", choices=["qkvo", "all"])
    ap.add_argument("--n", default="5,100", help="comma-separated adapter counts")
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--cv", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--max-len", type=int, default=512, help="upper end of input/output lengths")
    ap.add_argument("--no-base", action="store_true", help="skip the no-LoRA ceiling run")
    ap.add_argument("--warmup", type=float, default=3.0,
                    help="seconds of short warm-up requests before the measured runs (0: none)")
    ap.add_argument("--pool-gb", type=float, default=0.0,
                    help="fix the pool size (GB) instead of filling the GPU: small pools reach "
                         "preemption quickly, which measures pool use at the first preemption")
    ap.add_argument("--no-mix", action="store_true",
                    help="separate prefill and decode steps (mix_decode_in_prefill=false): A/B of the mixing")
    ap.add_argument("--ab-mix", action="store_true",
                    help="run everything twice, the second time with separate prefill and decode steps "
                         "(labels *_nomix, ratios against base_nomix): the mixing's A/B in one engine")
    ap.add_argument("--no-gmv", action="store_true",
                    help="decode rows of mixed steps in MBGMM segments with the prompts (lora_decode_rows_gmv=false)")
    ap.add_argument("--ab-gmv", action="store_true",
                    help="run the adapter runs twice, the second time with lora_decode_rows_gmv off (labels *_gmm, "
                         "ratios against base; gmv_vs_gmm side by side): the MBGMV decode rows' A/B in one engine")
    ap.add_argument("--gmv-min-segments", type=int, default=EngineConfig.lora_decode_gmv_min_segments,
                    help="decode rows of a mixed step go to the MBGMV kernels from this many adapter segments on "
                         "(lora_decode_gmv_min_segments; 1 = whenever one has an adapter)")
    ap.add_argument("--admit-min", type=int, default=EngineConfig.admit_min_batch,
                    help="with the batch full, admit once this many slots are free (admit_min_batch; "
                         "1 = as soon as one frees)")
    ap.add_argument("--ab-admit", action="store_true",
                    help="run everything twice, the second time with admit_min_batch=1 (labels *_admit1, "
                         "ratios against base_admit1): the admission batching's A/B in one engine")
    ap.add_argument("--ab-overlap", action="store_true",
                    help="run everything twice, the second time with overlap_decode off (labels *_sync, ratios "
                         "against base_sync): the decode overlap's A/B in one engine")
    ap.add_argument("--ab-fence", action="store_true",
                    help="run the adapter runs again with adapter copies waiting for the whole compute stream "
                         "(labels *_nofence) instead of the steps that freed their pages (StepFences)")
    ap.add_argument("--gather", type=int, default=EngineConfig.admit_gather_steps,
                    help="below a full batch, newcomers wait up to this many steps to be admitted together "
                         "(admit_gather_steps)")
    ap.add_argument("--ab-gather", type=int, default=0, metavar="STEPS",
                    help="run everything again with admit_gather_steps=STEPS (labels *_gather, ratios against "
                         "base_gather)")
    ap.add_argument("--profile", default="",
                    help="comma-separated run labels to run once more at the end under cProfile on the engine "
                         "thread (labels *_prof; it inflates Python-heavy calls: compare runs, not seconds); "
                         "writes profile_<label>.txt")
    ap.add_argument("--suffix", default="", help="appended to the result file's name")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ns = [int(x) for x in args.n.split(",")]
    config = EngineConfig(model_dir=args.model, max_model_len=2048, max_batch_size=512,
                          max_prefill_tokens=8192, mix_decode_in_prefill=not args.no_mix,
                          admit_min_batch=args.admit_min,
                          lora_decode_rows_gmv=not args.no_gmv, lora_decode_gmv_min_segments=args.gmv_min_segments)
    if args.pool_gb > 0:
        spec = dummy_spec(args.model, config.max_model_len)
        config.pool_pages = int(args.pool_gb * 1e9) // (spec.layers * spec.page_width * 2)
    engine = Engine(config)
    host_ratio = register_adapters(engine, max(ns), SETTINGS[args.setting], args.targets)
    free, total = torch.cuda.mem_get_info() if engine.device.type == "cuda" else (0, 1)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "date": time.strftime("%Y-%m-%d"), "args": vars(args), "runs": {},
               "host_bytes_over_weight_bytes": host_ratio,
               "gpu_memory_used_fraction": 1 - free / total, "pool": engine.stats()["pool"]}
    first = ([] if args.no_base else [("base", 0)]) + [(f"n{n}", n) for n in ns]
    runs = list(first)
    for suffix, wanted, own_ceiling in twin_runs(args):
        # Twins with their own ceiling repeat the base run too; the others (gmm, nofence:
        # nothing changes without adapters) only the adapter runs.
        runs += [(f"{label}{suffix}", n) for label, n in first if wanted(label) and (n or own_ceiling)]
    fences = engine.adapters.fences
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"slora_{args.setting}_{args.targets}{args.suffix}.json"
    if args.warmup > 0:
        results["warmup_s"] = warm_up(engine, max(ns), args.rate, args.warmup, args.max_len, deadline=120)
        log.info("warm-up done in %.1fs", results["warmup_s"])
    for label, n in runs:
        engine.scheduler.mix_decode = not (args.no_mix or label.endswith("_nomix"))
        engine.scheduler.admit_min_batch = 1 if label.endswith("_admit1") else args.admit_min
        engine.config.overlap_decode = not label.endswith("_sync")
        # Both LoRA paths of mixed steps were compiled at start-up (warm_up_eager) when the flag was on.
        engine.runner.lora_decode_rows_gmv = not (args.no_gmv or label.endswith("_gmm"))
        engine.adapters.fences = None if label.endswith("_nofence") else fences
        engine.scheduler.admit_gather_steps = args.ab_gather if label.endswith("_gather") else args.gather
        spec = WorkloadSpec(n_adapters=max(n, 1), rate=args.rate, duration=args.duration, cv=args.cv,
                            alpha=args.alpha, input_range=(8, args.max_len), output_range=(8, args.max_len),
                            vocab=engine.spec.vocab, seed=7)
        trace = make_trace(spec)
        engine.evict_idle_adapters()
        before = engine.stats()
        split_before = engine.runner.decode_part_steps
        log.info("run %s: %d requests over %.0fs", label, len(trace), args.duration)
        prof = cProfile.Profile() if label.endswith("_prof") else None
        if prof is not None:
            engine.call_in_engine(prof.enable)  # cProfile follows the thread that enables it
        timings = replay(engine, trace, drop_adapters=(n == 0), deadline=args.duration * 4)
        if prof is not None:
            engine.call_in_engine(prof.disable)
            write_profile(prof, out / f"profile_{label.removesuffix('_prof')}{args.suffix}.txt")
        report = summarize(timings).as_dict()
        after = engine.stats()
        report["extra"] = run_counters(before, after)
        report["extra"]["lora_decode_rows_gmv"] = engine.runner.lora_decode_rows_gmv
        report["extra"]["lora_decode_gmv_min_segments"] = engine.runner.gmv_min_segments
        report["extra"]["decode_part_steps"] = engine.runner.decode_part_steps - split_before
        report["extra"]["admit_min_batch"] = engine.scheduler.admit_min_batch
        report["extra"]["admit_gather_steps"] = engine.scheduler.admit_gather_steps
        report["extra"]["overlap_decode"] = engine.config.overlap_decode
        results["runs"][label] = report
        log.info("%s: %.2f req/s, %.0f tok/s, avg latency %.2fs, first token avg %.2fs, SLO %.2f", label,
                 report["throughput_req_s"], report["throughput_tok_s"], report["latency_avg"],
                 report["first_token_avg"], report["slo_attainment"])
        path.write_text(json.dumps(results, indent=2))  # what is done survives a run cut short
    results["pool_pages_used_at_first_preemption"] = engine.stats()["requests"]["pool_used_at_first_preemption"]
    # Throughput over the ceiling of the same configuration: base for the default runs (and the
    # twins without a ceiling of their own), base<suffix> for the others.
    own = tuple(suffix for suffix, _, own_ceiling in TWINS if own_ceiling)
    ratios = [("over_base", "base", lambda k: not k.endswith(own))]
    ratios += [(f"over_base{suffix}", f"base{suffix}", lambda k, s=suffix: k.endswith(s)) for suffix in own
               if suffix != "_prof"]
    for key, base_label, keep in ratios:
        if base_label in results["runs"]:
            base = results["runs"][base_label]["throughput_req_s"]
            results[key] = {k: v["throughput_req_s"] / base for k, v in results["runs"].items() if keep(k)}
    if args.ab_gmv:
        results["gmv_vs_gmm"] = gmv_vs_gmm(results["runs"])
    engine.shutdown()
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k == "device" or k.startswith("over_base")
                      or k == "gmv_vs_gmm"},
                     indent=1))
    for label, r in results["runs"].items():
        print(f"{label:>7}: {r['throughput_req_s']:.2f} req/s {r['throughput_tok_s']:.0f} tok/s "
              f"lat {r['latency_avg']:.2f}s ftl {r['first_token_avg']:.2f}s slo {r['slo_attainment']:.2f} "
              f"{r['extra']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
