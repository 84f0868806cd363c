"""Tensor parallelism on the GPUs of one host: bf16 parity and the S-LoRA workload.

    python benchmarks/tp_bench.py --out results_dir            # defaults: TP=2, Llama-13B, S4

Phases, each in its own process (a crash or hang costs that phase only; NCCL state and GPU
memory start clean), written to <out>/tp_<phase>.json and summed up in <out>/tp_bench.json:

  parity   a random GQA Llama (8 heads / 4 KV heads) with the five parity PEFT adapters (ranks
           1..64, odd ranks, all seven modules, rsLoRA) and base requests, greedy in bf16 with
           TP=1 and TP=N; per-step logits compared while the tokens agree (max relative error),
           and each against HF+PEFT fp32 teacher-forced logits: pass if TP=N loses no more
           than twice HF's own bf16 error (benchmarks/gpu_parity.py's criterion).
  tp       TP=N, dummy weights (each rank generates only its shard), S-LoRA trace: with LoRA,
           then the same trace as base-model requests.
  tp_skip  TP=N with the LoRA collectives left out (tp_skip_lora_collectives: wrong outputs,
           timing only): what the collectives cost.
  tp1      TP=1 on one GPU, same trace with LoRA: the 1 -> N scaling.

Each workload phase first replays a few seconds of short requests (kernel compilation and
NCCL set-up stay out of the measurement); every measured run replays the same trace (seed 7).
If the `tp` phase fails with CUDA graphs it is retried once eagerly (`tp_eager`), and the
skip phase then runs eagerly too. A time budget (--budget, seconds) skips what no longer
fits; a phase whose engine start or run hangs exits by itself. Progress goes to stdout.
NVLink multicast is left off (NCCL_NVLS_ENABLE=0 ...) unless the environment says otherwise.
On a machine without GPUs the same script runs on CPU (gloo, torch kernels, fp32), e.g. with
--model dummy:tiny --duration 3 --rate 4 --n 4 --max-len 16 --warmup 1 --min-phase-scale 0.1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def nvlink_multicast_off() -> None:
    """NVLink multicast stays off on the shared GPU hosts (the device notes) unless the
    environment says otherwise; child processes and the workers they spawn inherit it."""
    for key, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                       ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(key, value)


nvlink_multicast_off()
sys.path.insert(0, str(ROOT / "tests"))

log = logging.getLogger("tp_bench")
SETTINGS = {"S1": (8,), "S2": (64, 32, 16, 8), "S4": (64, 32, 16), "S5": (32,)}
PHASES = ("parity", "tp", "tp_skip", "tp1")
MIN_PHASE_S = {"parity": 60, "tp": 150, "tp_skip": 100, "tp1": 120}  # not worth starting with less left


def watchdog(seconds: float, what: str):
    """Exit the phase process if `what` takes longer than `seconds` (a hung collective must not
    eat the whole budget; workers exit with their parent). Returns the timer: cancel() it."""
    import threading

    def expire():
        log.error("%s took more than %.0fs: giving up on this phase", what, seconds)
        logging.shutdown()
        os._exit(4)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer


def device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


# -- parity ------------------------------------------------------------------------------------
def run_recorded(config, jobs) -> tuple[list[list[int]], list, dict]:
    """Greedy tokens of every job, the logits of each of its steps (rank 0's sampler), and the
    engine's step counts. The second half of the jobs arrives once the first has its first
    token, so that mixed steps (prompt rows beside decode rows) are part of the comparison."""
    import torch

    from slora_backend.engine import Engine

    engine = Engine(config)
    recorded: dict[int, list] = {}
    def record(logits, reqs):  # every step's logits, overlapped decode steps included
        for i, r in enumerate(reqs):
            recorded.setdefault(r.request_id, []).append(logits[i].float().cpu())

    engine.sampler.observe = record
    try:
        queues, ids, early = [], [], []
        half = (len(jobs) + 1) // 2
        for i, job in enumerate(jobs):
            if i == half:  # the rest arrive while the first half decodes
                early.append(queues[0].get(timeout=600))
            q: queue.SimpleQueue = queue.SimpleQueue()
            ids.append(engine.submit(on_output=q.put, **job))
            queues.append(q)
        tokens = []
        for i, q in enumerate(queues):
            outs = early if i == 0 else []
            while not outs or not (outs[-1].finished or outs[-1].error is not None):
                outs.append(q.get(timeout=600))
            if outs[-1].error is not None:
                raise RuntimeError(f"request failed: {outs[-1].error}")
            tokens.append([t for out in outs for t in out.token_ids])
        counts = {"steps": engine.steps, "mixed_steps": engine.mixed_steps,
                  "decode_part_steps": engine.runner.decode_part_steps}
    finally:
        engine.shutdown()
    return tokens, [torch.stack(recorded[i]) for i in ids], counts


def hf_logits(model_dir, adapter_dir, ids: list[int], start: int, dtype, device) -> object:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).to(dtype).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids], device=device)).logits[0, start:].float().cpu()


def phase_parity(args) -> dict:
    import torch
    from gpu_parity import parity_setup

    from slora_backend.config import EngineConfig

    cuda = torch.cuda.is_available()
    dtype_name, dtype = ("bfloat16", torch.bfloat16) if cuda else ("float32", torch.float32)
    # gpu_parity.py's model with 4 KV heads, so that TP=2 (and 4) divides them.
    model, adapter_dir, prompts, names, jobs = parity_setup(Path(tempfile.mkdtemp(prefix="tp_parity_")),
                                                            args.parity_tokens, kv_heads=4)
    runs = {}
    for tp in (1, args.tp):
        t0 = time.monotonic()
        timer = watchdog(args.startup_timeout, f"parity with TP={tp}")
        cfg = EngineConfig(model_dir=str(model), adapter_dir=str(adapter_dir), dtype=dtype_name,
                           pool_pages=20000, max_batch_size=16, tensor_parallel_size=tp,
                           cuda_graphs=not args.no_graphs,
                           # mixed steps' decode rows on MBGMV whenever they may (--tp-gmv under TP)
                           lora_decode_gmv_min_segments=1, tp_lora_decode_rows_gmv=args.tp_gmv)
        runs[tp] = run_recorded(cfg, jobs)
        timer.cancel()
        log.info("parity: TP=%d done in %.1fs", tp, time.monotonic() - t0)
    (tok1, log1, counts1), (tokn, logn, countsn) = runs[1], runs[args.tp]
    log.info("parity: step counts TP=1 %s, TP=%d %s", counts1, args.tp, countsn)
    device = "cuda" if cuda else "cpu"
    rows, ok, worst = [], True, 0.0
    for p, n, t1, tn, l1, ln in zip(prompts, names, tok1, tokn, log1, logn, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(t1, tn, strict=True)) if a != b), len(t1))
        upto = min(same + 1, len(t1))  # steps whose inputs were identical in both runs
        rel = ((ln[:upto] - l1[:upto]).abs().max() / l1[:upto].abs().max()).item()
        worst = max(worst, rel)
        ad = None if n is None else adapter_dir / n
        seq = p + tn[:-1]
        ref32 = hf_logits(model, ad, seq, len(p) - 1, torch.float32, device)
        ref_dt = hf_logits(model, ad, seq, len(p) - 1, dtype, device)
        scale = ref32.abs().max().item()
        tp_err = (ln - ref32).abs().max().item() / scale
        hf_err = (ref_dt - ref32).abs().max().item() / scale
        passed = tp_err <= 2 * hf_err + 1e-3
        ok &= passed
        rows.append(dict(adapter=n, prompt_len=len(p), tokens_equal_steps=same, tokens=len(t1),
                         rel_err_tp_vs_tp1=rel, rel_err_tp_vs_fp32=tp_err, rel_err_hf_vs_fp32=hf_err, passed=passed))
        log.info("parity %-16s len=%3d same tokens %2d/%d  TP%d vs TP1 %.2e  vs fp32 %.2e (HF %s %.2e) %s", n,
                 len(p), same, len(t1), args.tp, rel, tp_err, dtype_name, hf_err, "PASS" if passed else "FAIL")
    return {"dtype": dtype_name, "tp": args.tp, "max_rel_err_tp_vs_tp1": worst, "passed": ok, "requests": rows,
            "steps": {"tp1": counts1, f"tp{args.tp}": countsn}}


# -- workload -------------------------------------------------------------------------------------
def phase_workload(args, tp: int, skip: bool, runs: list[str]) -> dict:
    import torch

    from benchmarks.slora_bench import replay, run_counters, warm_up
    from client.workload import WorkloadSpec, make_trace, summarize
    from slora_backend.config import EngineConfig
    from slora_backend.engine import Engine

    ranks = ",".join(map(str, SETTINGS[args.setting]))
    cfg = EngineConfig(model_dir=args.model, tensor_parallel_size=tp, tp_skip_lora_collectives=skip,
                       max_model_len=2048, max_batch_size=args.max_batch, max_prefill_tokens=8192,
                       cuda_graphs=not args.no_graphs, dummy_adapters=f"{args.n}:{ranks}:{args.targets}",
                       admit_min_batch=args.admit_min, lora_decode_rows_gmv=not args.no_gmv,
                       tp_lora_decode_rows_gmv=args.tp_gmv)
    t0 = time.monotonic()
    timer = watchdog(args.startup_timeout, f"starting the TP={tp} engine")
    engine = Engine(cfg)
    timer.cancel()
    start_s = time.monotonic() - t0
    log.info("TP=%d engine (skip LoRA collectives: %s, graphs: %s) ready in %.1fs", tp, skip,
             engine.graphs is not None or engine.runner.tp_graphs is not None, start_s)
    out = {"tp": tp, "skip_lora_collectives": skip, "startup_s": start_s, "pool": engine.stats()["pool"],
           "graphs": engine.graphs is not None or engine.runner.tp_graphs is not None, "runs": {}}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)  # rank 0's GPU (querying others would open contexts there)
        out["gpu0_memory_used_fraction"] = 1 - free / total
    try:
        if args.warmup > 0:  # compile the prefill kernel variants and warm NCCL outside the measured runs
            timer = watchdog(args.startup_timeout, "the warm-up")
            out["warmup_s"] = warm_up(engine, args.n, args.rate, args.warmup, args.max_len, args.startup_timeout)
            timer.cancel()
            log.info("warm-up done in %.1fs", out["warmup_s"])
        if args.ab_overlap:
            runs = runs + [f"{label}_sync" for label in runs]
        for label in runs:
            engine.config.overlap_decode = not label.endswith("_sync")
            spec = WorkloadSpec(n_adapters=args.n, rate=args.rate, duration=args.duration, cv=1.0, alpha=1.0,
                                input_range=(8, args.max_len), output_range=(8, args.max_len),
                                vocab=engine.spec.vocab, seed=7)
            trace = make_trace(spec)
            engine.evict_idle_adapters()
            before = engine.stats()
            log.info("run %s: %d requests over %.0fs at %.1f req/s", label, len(trace), args.duration, args.rate)
            timer = watchdog(args.duration * args.deadline_factor + 120, f"run {label}")
            timings = replay(engine, trace, drop_adapters=label.startswith("base"),
                             deadline=args.duration * args.deadline_factor)
            timer.cancel()
            report = summarize(timings).as_dict()
            after = engine.stats()
            report["extra"] = run_counters(before, after)
            out["runs"][label] = report
            log.info("TP=%d %s: %.2f req/s, %.0f tok/s, latency %.2fs, first token %.2fs, SLO %.2f, errors %d",
                     tp, label, report["throughput_req_s"], report["throughput_tok_s"], report["latency_avg"],
                     report["first_token_avg"], report["slo_attainment"], report["errors"])
            if not engine.is_alive():
                raise RuntimeError("the engine stopped during the run")
    finally:
        engine.shutdown()
    return out


def run_phase(args) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.phase} %(name)s %(message)s")
    if args.phase == "parity":
        result = phase_parity(args)
    elif args.phase == "tp":
        result = phase_workload(args, args.tp, False, ["lora", "base"])
    elif args.phase == "tp_skip":
        result = phase_workload(args, args.tp, True, ["lora"])
    else:
        result = phase_workload(args, 1, False, ["lora", "base"] if args.tp1_base else ["lora"])
    result.update(device_info())
    result["args"] = vars(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"tp_{args.phase}{args.suffix}.json").write_text(json.dumps(result, indent=2))
    return 0 if result.get("passed", True) else 3


# -- driver -------------------------------------------------------------------------------------------
class PhaseRunner:
    """Runs a script's phases one after another, each in its own process, within one time budget
    (shared with benchmarks/tp_decode_step.py). A phase that crashes or hangs costs that phase only."""

    def __init__(self, script: Path, argv: list[str], budget: float):
        self.script, self.argv, self.budget = script, argv, budget
        self.t0 = time.monotonic()

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def launch(self, name: str, extra: list[str], min_s: float) -> str:
        """`script *argv *extra` in a child process, killed when the budget runs out; "ok",
        "failed (rc)", or "skipped (budget)" when less than min_s is left."""
        left = self.left()
        if left < min_s:
            log.info("skipping %s: %.0fs of the budget left", name, left)
            return "skipped (budget)"
        cmd = [sys.executable, str(self.script), *self.argv, *extra]
        log.info("%s: starting (%.0fs of the budget left)", name, left)
        start = time.monotonic()
        try:
            rc = subprocess.run(cmd, timeout=left, env=os.environ.copy()).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        log.info("%s: %s after %.0fs", name, "ok" if rc == 0 else f"failed ({rc})", time.monotonic() - start)
        return "ok" if rc == 0 else f"failed ({rc})"


def drive(args, argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s driver %(message)s")
    runner = PhaseRunner(Path(__file__).resolve(), argv, args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    status: dict[str, str] = {}
    no_graphs = args.no_graphs

    def launch(phase: str, suffix: str = "", eager: bool = False) -> str:
        extra = ["--phase", phase, "--suffix", suffix]
        if eager and "--no-graphs" not in argv:
            extra.append("--no-graphs")
        return runner.launch(f"phase {phase}{suffix}", extra, MIN_PHASE_S[phase] * args.min_phase_scale)

    for phase in phases:
        eager = no_graphs and phase != "tp1"
        status[phase] = launch(phase, eager=eager)
        if phase == "tp" and status[phase] != "ok" and not no_graphs and not status[phase].startswith("skipped"):
            log.info("retrying the TP phase without CUDA graphs")
            status["tp_eager"] = launch("tp", suffix="_eager", eager=True)
            no_graphs = status["tp_eager"] == "ok"  # then the skip phase runs eagerly too, comparably
    summary = summarize_results(out, status, args)
    summary["wall_s"] = time.monotonic() - runner.t0
    (out / "tp_bench.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "phases"}, indent=1))
    return 0 if all(v == "ok" for v in status.values()) else 1


def summarize_results(out: Path, status: dict, args) -> dict:
    phases = {}
    for path in sorted(out.glob("tp_*.json")):
        if path.name != "tp_bench.json":
            phases[path.stem[3:]] = json.loads(path.read_text())

    def thr(phase: str, run: str) -> float | None:
        r = phases.get(phase, {}).get("runs", {}).get(run)
        return None if r is None else r["throughput_req_s"]

    tp_key = "tp" if "tp" in phases else "tp_eager"
    lora, base, skip = thr(tp_key, "lora"), thr(tp_key, "base"), thr("tp_skip", "lora") or thr("tp_skip_eager", "lora")
    one = thr("tp1", "lora")
    summary = {"status": status, "tp": args.tp, "model": args.model, "setting": args.setting,
               "req_s": {f"tp{args.tp}_lora": lora, f"tp{args.tp}_lora_no_collectives": skip,
                         f"tp{args.tp}_base": base, "tp1_lora": one, "tp1_base": thr("tp1", "base")},
               "phases": phases}
    if lora and skip:
        summary["lora_collectives_cost"] = 1 - lora / skip  # target <= 0.10
    if lora and base:
        summary["lora_over_base"] = lora / base
    if lora and one:
        summary["scaling_1_to_n"] = lora / one  # target >= 1.7 for N = 2
    summary["cuda_graphs"] = {k: v.get("graphs") for k, v in phases.items() if "graphs" in v}
    if "parity" in phases:
        summary["parity"] = {k: phases["parity"][k] for k in ("dtype", "max_rel_err_tp_vs_tp1", "passed")}
    return summary


def main() -> int:
    from slora_backend.config import EngineConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size")
    ap.add_argument("--model", default="dummy:llama-13b")
    ap.add_argument("--setting", default="S4", choices=sorted(SETTINGS))
    ap.add_argument("--targets", default="qkvo", choices=["qkvo", "all"])
    ap.add_argument("--n", type=int, default=100, help="adapters")
    # The rate must saturate TP=N, or the 1 -> N scaling is capped at rate / TP=1 throughput: at
    # 20 req/s (the first default) TP=2 on 13B nearly kept up with the arrivals (first token 0.08 s
    # without LoRA, 1.3 s with) and the run's length was set by the trace, not the engine: 14.3
    # req/s against TP=1's 12.6, where 1.7x would need 21. 40 req/s over 15 s: about as many
    # requests as before, arriving twice as fast.
    ap.add_argument("--rate", type=float, default=40.0, help="request rate (must saturate TP=N)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per run")
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds of warm-up arrivals (short outputs)")
    ap.add_argument("--deadline-factor", type=float, default=3.5, help="cancel what is left after this x duration")
    ap.add_argument("--max-len", type=int, default=512, help="upper end of input/output lengths")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--no-gmv", action="store_true",
                    help="mixed steps' decode rows on MBGMM with the prompt rows (lora_decode_rows_gmv=false): A/B")
    ap.add_argument("--tp-gmv", action="store_true",
                    help="with tensor parallelism too, mixed steps' decode rows on MBGMV (tp_lora_decode_rows_gmv)")
    ap.add_argument("--admit-min", type=int, default=EngineConfig.admit_min_batch,
                    help="with the batch full, admit once this many slots are free (admit_min_batch; "
                         "1 = as soon as one frees)")
    ap.add_argument("--parity-tokens", type=int, default=24)
    ap.add_argument("--startup-timeout", type=float, default=240.0, help="seconds an engine may take to start")
    ap.add_argument("--no-graphs", action="store_true", help="eager decode everywhere")
    ap.add_argument("--tp1-base", action="store_true", help="also run the base model on one GPU")
    ap.add_argument("--ab-overlap", action="store_true",
                    help="each phase's runs again with overlap_decode off (labels *_sync), same engine")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for all phases together")
    ap.add_argument("--min-phase-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # internal: run one phase
    ap.add_argument("--suffix", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        return run_phase(args)
    return drive(args, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
