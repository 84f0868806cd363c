"""Tensor-parallel decode step by part, against its byte floor (dummy weights; GPU or CPU).

    python benchmarks/tp_decode_step.py --budget 540    # TP=2 and TP=1, dummy Llama-13B, S4 ranks

The tensor-parallel twin of decode_step.py. For each batch size B, B running requests with `ctx`
tokens of KV are set up directly in the pool (no scheduler), each on its own adapter (S4 ranks
on q,k,v,o), and the engine's own step path is timed: rank 0's `runner.prepare`,
`runner.forward` (which hands the step to the workers and replays the decode graph) and the
sampler. Hooks on that path's methods (not a copy of it) split one step into, per step (median
of --iters after --warmup):

  prepare   runner.prepare: the step's tables on rank 0 (host)
  share     TPLeader.send_step (host): pack_step, the pipe message to the workers, the broadcast
  stage     the decode graph's static buffers filled from the step's inputs (host)
  launch    the graph replay, or the eager layers, being launched (host)
  gpu_pre   rank 0's GPU from the forward's start to the replay: packing, broadcast, staging
  gpu_fwd   rank 0's GPU for the replay or the eager layers, collectives included (CUDA events)
  sample    argmax and the tokens' copy to the host: waits for the GPU
  wall      the whole step on the host, as the engine thread runs it

  sync=presync  rank 0 waits for the broadcast and sleeps --presync-ms before staging: the workers
                are then already waiting in the first collective, so gpu_fwd holds no skew between
                ranks; its difference to sync=none is what rank 0's GPU loses to late ranks
                (gpu_pre and wall then include the sleep).
  modes         base (no adapters), lora, lora_nocoll (tp_skip_lora_collectives: wrong outputs,
                timing only). Prefill rows: one prefill step of P prompts of --prefill-len tokens
                (always eager); under load the engine alternates such steps with decode steps.
  profiles      one step under torch.profiler on rank 0: kernels by kind (collectives, LoRA
                shrink / expand, GEMM, attention, ...) with count and average duration per step,
                and the top kernels. On CPU: torch ops by self time.
  floor         (rank 0's weight shard + its KV shard of the batch + the distinct adapters'
                shards) / measured copy bandwidth, for decode rows.

Runs, each in its own process (tp_bench.PhaseRunner: a crash or a hang costs one run, NCCL and
GPU memory start clean), most useful first so that a short --budget (seconds) keeps them:
  graphs       TP=N with CUDA graphs, as the engine decodes: lora, base; prefill rows
  nccl         the step's collectives alone between N bare processes (the LoRA all-gathers and
               all-reduces, the base all-reduce, the step broadcast), eagerly and replayed from
               a CUDA graph: what one call costs without the model around it
  graphs_skip  TP=N with CUDA graphs, lora_nocoll
  tp1          TP=1: lora, base, with and without graphs (what the TP rows compare with)
  eager        TP=N without CUDA graphs: lora, base
  eager_skip   TP=N without CUDA graphs: lora_nocoll
Rows that no longer fit a run's share of the budget are skipped. A batch whose KV and adapters
do not fit the pool is run at the largest context that fits (its `ctx` says so).

NVLink multicast stays off (NCCL_NVLS_ENABLE=0) unless the environment sets it. NCCL's INIT log
of the graphs and nccl runs goes to --work, and the transports it chose into the report.
Results: <out>/tp_decode_step.json, everything in one file (each run also writes its own into
--work as it goes), and a table on stdout.

Without GPUs the same runs use gloo and the torch kernels (the graph runs go through the static
decode buffers, uncaptured), e.g.
    python benchmarks/tp_decode_step.py --model dummy:tiny --batch 1,4 --ctx 16 --tp 2 --out /tmp/x
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.tp_bench import SETTINGS, PhaseRunner, device_info, watchdog  # noqa: E402  (sets NCCL's env)

log = logging.getLogger("tp_decode_step")


@dataclasses.dataclass(frozen=True)
class Run:
    tp1: bool  # one GPU instead of --tp
    graphs: bool  # CUDA graphs (TP=1 runs both ways in one engine)
    skip: bool  # tp_skip_lora_collectives
    min_s: float  # seconds of budget below which the run is not started (GPU)


RUNS = {
    "graphs": Run(tp1=False, graphs=True, skip=False, min_s=90),
    "nccl": Run(tp1=False, graphs=True, skip=False, min_s=25),
    "graphs_skip": Run(tp1=False, graphs=True, skip=True, min_s=60),
    "tp1": Run(tp1=True, graphs=True, skip=False, min_s=60),
    "eager": Run(tp1=False, graphs=False, skip=False, min_s=45),
    "eager_skip": Run(tp1=False, graphs=False, skip=True, min_s=35),
}
NCCL_LOG_RUNS = ("graphs", "nccl")
# Kernel (GPU) or op (CPU) name fragments -> kind, first match wins.
KINDS = (("collective", ("nccl", "gloo", "c10d::")), ("lora_shrink", ("lora_shrink",)),
         ("lora_expand", ("lora_expand",)), ("lora_other", ("lora",)), ("attention", ("attn", "attention")),
         ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm")),
         ("copy", ("memcpy", "memset", "copy", "aten::cat", "aten::index")))
_MISSING = object()


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# -- one step, timed by hooks on the engine's own methods ------------------------------------------
class StepProbe:
    """Runs one step exactly as Engine._run_step does and times its parts.

    Hooks wrap (for the duration of `hooked()`) TPGroup._send_step and TPLeader.send (the step
    sent to the workers), the decode graphs' replay and ModelRunner.run_layers (the compute);
    they record host timestamps and CUDA events, and nothing else.
    """

    def __init__(self, engine, graph: bool, presync_s: float = 0.0):
        import torch

        self.torch, self.engine, self.graph, self.presync_s = torch, engine, graph, presync_s
        self.cuda = engine.device.type == "cuda"
        self.host: dict[str, float] = {}
        self.dev: dict[str, object] = {}
        self.paths: list[str] = []

    def _mark(self, key: str) -> None:
        self.host[key] = time.perf_counter()

    def _record(self, key: str) -> None:
        if self.cuda:
            ev = self.torch.cuda.Event(enable_timing=True)
            ev.record()
            self.dev[key] = ev
        else:  # CPU ops are synchronous: host time is device time
            self.dev[key] = time.perf_counter()

    def _dev_s(self, a: str, b: str) -> float:
        if self.cuda:
            return self.dev[a].elapsed_time(self.dev[b]) / 1e3
        return self.dev[b] - self.dev[a]

    def _after_share(self) -> None:
        self._mark("share1")
        if self.presync_s > 0:  # the workers have received the step and go on to their replay
            if self.cuda:
                self.torch.cuda.synchronize()
            time.sleep(self.presync_s)
        self._mark("share_end")

    def _compute_start(self, path: str):
        def start() -> None:
            self.paths.append(path)
            if "compute0" not in self.host:  # the outer call (the CPU static path nests run_layers)
                self._mark("compute0")
                self._record("compute")
        return start

    @contextlib.contextmanager
    def hooked(self):
        e, saved = self.engine, []

        def wrap(obj, name: str, before, after) -> None:
            orig = getattr(obj, name)
            saved.append((obj, name, vars(obj).get(name, _MISSING)))

            def hook(*a, **kw):
                before()
                out = orig(*a, **kw)
                after()
                return out

            setattr(obj, name, hook)

        if e.tp is not None:
            wrap(e.tp.group, "_send_step", lambda: self._mark("share0"), self._after_share)
            wrap(e.tp, "send", lambda: self._mark("send0"), lambda: self._mark("send1"))
        graphs = e.graphs if e.tp is None else e.runner.tp_graphs
        if graphs is not None:
            wrap(graphs, "replay", self._compute_start("graph"), lambda: self._mark("compute1"))
        wrap(e.runner, "run_layers", self._compute_start("eager"), lambda: self._mark("compute1"))
        try:
            yield self
        finally:
            for obj, name, old in reversed(saved):
                if old is _MISSING:
                    delattr(obj, name)
                else:
                    setattr(obj, name, old)

    def step(self, step) -> dict:
        """One step (the hooks must be in place); its parts in seconds."""
        e, h = self.engine, self.host
        h.clear()
        self.dev.clear()
        self.paths.clear()
        t0 = time.perf_counter()
        if self.graph and e.tp is None and not step.prefill:  # Engine._run_step's one-GPU graph path
            t1 = t0
            self._record("start")
            logits = e.graphs.run(step, e.adapters)
        else:
            inp = e.runner.prepare(step, e.adapters)
            t1 = time.perf_counter()
            self._record("start")
            logits = e.runner.forward(inp)
        t2 = time.perf_counter()
        self._record("end")
        e.sampler.sample(logits, step.requests)
        t3 = time.perf_counter()
        out = {"prepare_s": t1 - t0, "stage_s": h["compute0"] - h.get("share_end", t1),
               "launch_s": h["compute1"] - h["compute0"], "forward_host_s": t2 - t1,
               "gpu_pre_s": self._dev_s("start", "compute"), "gpu_forward_s": self._dev_s("compute", "end"),
               "sample_s": t3 - t2, "wall_s": t3 - t0}
        if "share0" in h:
            out.update(share_s=h["share1"] - h["share0"], pack_s=h["send0"] - h["share0"],
                       pipe_s=h["send1"] - h["send0"], broadcast_s=h["share1"] - h["send1"])
        return out

    def measure(self, step, iters: int, warmup: int) -> tuple[dict, str]:
        """Medians over `iters` steps after `warmup`, and the path the compute took."""
        samples = []
        with self.hooked():
            for i in range(warmup + iters):
                if self.cuda:
                    self.torch.cuda.synchronize()
                t = self.step(step)
                if i >= warmup:
                    samples.append(t)
        med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
        med["wall_min_s"] = min(s["wall_s"] for s in samples)
        return med, self.paths[0]

    def profile(self, step, steps: int) -> dict:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        with self.hooked(), profile(activities=activities) as prof:
            for _ in range(steps):
                self.step(step)
            if self.cuda:
                self.torch.cuda.synchronize()
        return summarize_profile(prof, steps, self.cuda)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KINDS if any(p in low for p in parts)), "other")


def summarize_profile(prof, steps: int, cuda: bool, top: int = 15) -> dict:
    """Per step: count, total and average duration by kind, and the `top` names by total time.
    GPU: every kernel / copy on rank 0's device. CPU: torch ops by self time (nested
    collective records each count)."""
    from torch.autograd import DeviceType

    totals: dict[str, list] = {}  # name -> [count, microseconds]
    if cuda:
        for ev in prof.events():
            if ev.device_type == DeviceType.CUDA:
                acc = totals.setdefault(ev.name, [0, 0.0])
                acc[0] += 1
                acc[1] += ev.time_range.elapsed_us()
    else:
        for avg in prof.key_averages():
            if avg.self_cpu_time_total > 0:
                totals[avg.key] = [avg.count, avg.self_cpu_time_total]
    kinds: dict[str, dict] = {}
    for name, (count, us) in totals.items():
        k = kinds.setdefault(kind_of(name), {"count": 0, "total_us": 0.0})
        k["count"] += count / steps
        k["total_us"] += us / steps
    for k in kinds.values():
        k["avg_us"] = k["total_us"] / k["count"] if k["count"] else 0.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return {"source": "gpu kernels" if cuda else "cpu ops (self time)", "steps": steps,
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["total_us"])),
            "total_us": sum(k["total_us"] for k in kinds.values()),
            "top": [{"name": n[:140], "kind": kind_of(n), "count": c / steps, "total_us": us / steps,
                     "avg_us": us / c} for n, (c, us) in ranked]}


# -- set-up ------------------------------------------------------------------------------------------
def copy_bandwidth(cuda: bool) -> float:
    """Bytes read + written per second by a large copy on the device the engine will use."""
    import torch

    if cuda:
        from benchmarks.decode_step import copy_bandwidth as gpu_copy_bandwidth

        bw = gpu_copy_bandwidth()
        torch.cuda.empty_cache()  # the engine sizes its pool from the free memory
        return bw
    a = torch.ones(32 << 20, dtype=torch.uint8)
    b = torch.empty_like(a)
    b.copy_(a)
    t0 = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    return 2 * a.numel() * 5 / (time.perf_counter() - t0)


def register_adapters(engine, count: int, ranks: tuple[int, ...], targets: tuple[str, ...]) -> list[str]:
    """Adapters a00000.. with ranks cycling over `ranks`. Each is its own adapter (own pool pages
    once loaded) but those of one rank share a host page image: registering costs len(ranks)
    random adapters, not `count` (weight values do not change a step's time)."""
    from slora_backend.dummy import random_adapter, random_adapter_shard

    tp, pin = engine.tp, engine.device.type == "cuda"
    protos = {}
    for r in set(ranks):
        if tp is None:
            protos[r] = random_adapter("proto", engine.spec, r, targets, engine.dtype, seed=r, device=engine.device,
                                       pin=pin)
        else:  # rank 0's shard; a worker generates its own from the seed when the adapter is loaded
            shard = random_adapter_shard("proto", engine.spec, r, targets, engine.dtype, r, tp.size, 0, engine.device)
            host = shard.pages.cpu()
            protos[r] = dataclasses.replace(shard, pages=host.pin_memory() if pin else host)
    names = [f"a{i:05d}" for i in range(count)]
    for i, name in enumerate(names):
        r = ranks[i % len(ranks)]
        if tp is not None:
            engine.adapters.note_dummy(name, r, targets, r)
        engine.register_adapter(dataclasses.replace(protos[r], name=name))
    return names


def fit_ctx(engine, batch: int, ctx: int, names: list[str | None]) -> int:
    """`ctx`, or the largest multiple of 16 whose KV fits the free pool next to the adapters."""
    adapter_pages = sum(engine.adapters.info(n).n_pages for n in set(names) if n is not None)
    room = engine.pool.free - adapter_pages
    return ctx if room >= 2 * batch * ctx else max(room // (2 * batch) // 16 * 16, 0)


def weight_bytes(weights) -> int:
    """What a decode step reads of this rank's base weights: every layer and the LM head."""
    tensors = [t for lw in weights.layers for t in vars(lw).values()] + [weights.lm_head]
    return sum(t.numel() * t.element_size() for t in tensors)


# -- runs (child processes) --------------------------------------------------------------------------
def engine_run(args, name: str, result: dict, save) -> None:
    import torch

    from benchmarks.decode_step import make_requests, release
    from slora_backend.config import EngineConfig
    from slora_backend.dummy import TARGET_SETS
    from slora_backend.engine import Engine
    from slora_backend.scheduler import ScheduledStep
    from slora_backend.tp_graphs import EAGER_ENV

    run = RUNS[name]
    cuda = torch.cuda.is_available()
    tp = 1 if run.tp1 else args.tp
    ranks = SETTINGS[args.setting]
    batches = sorted(ints(args.batch), reverse=True)  # the largest first: the engine's case under load
    prefills = sorted(ints(args.prefill_batch), reverse=True) if name in ("graphs", "graphs_skip", "tp1") else []
    result["copy_bandwidth_Bps"] = copy_bandwidth(cuda)
    if run.graphs and not cuda and tp > 1:
        os.environ[EAGER_ENV] = "1"  # CPU: the graph path's static buffers, run eagerly on every rank
    cfg = EngineConfig(model_dir=args.model, tensor_parallel_size=tp, tp_skip_lora_collectives=run.skip,
                       cuda_graphs=run.graphs, max_batch_size=max(batches + prefills), max_rank=max(ranks),
                       max_model_len=max(2048, args.ctx, args.prefill_len) + 16, cpu_pool_mb=128,
                       max_prefill_tokens=max([4096] + [p * args.prefill_len for p in prefills]))
    timer = watchdog(args.startup_timeout, f"starting the TP={tp} engine")
    t0 = time.monotonic()
    engine = Engine(cfg)
    timer.cancel()
    graphs = engine.graphs if engine.tp is None else engine.runner.tp_graphs
    captured = graphs is not None and bool(graphs.graphs)
    result.update(tp=tp, skip_lora_collectives=run.skip, startup_s=time.monotonic() - t0, pool=engine.stats()["pool"],
                  graphs="captured" if captured else ("static buffers, uncaptured" if graphs else "off"),
                  layers=engine.spec.layers, hidden=engine.spec.hidden, local_page_width=engine.pool_tensor.shape[-1])
    log.info("TP=%d engine ready in %.1fs (graphs: %s, pool %d pages)", tp, result["startup_s"], result["graphs"],
             engine.pool.num_pages)
    try:
        names = register_adapters(engine, max(batches + prefills), ranks, TARGET_SETS[args.targets])
        rows = RowTimer(args, engine, result, save, name)
        modes = ["lora_nocoll"] if run.skip else ["lora", "base"]
        decode_graphs = ([True, False] if engine.graphs is not None else [False]) if run.tp1 else [graphs is not None]
        for kind, sizes in (("decode", batches), ("prefill", prefills)):
            want_ctx = args.ctx if kind == "decode" else args.prefill_len
            for b in sizes:
                ctx = fit_ctx(engine, b, want_ctx, names[:b])  # the same for every mode of this batch
                if ctx < 16:
                    result["skipped"].append(f"{kind} B={b}: the pool cannot hold its KV and adapters")
                    continue
                if ctx < want_ctx:
                    log.warning("%s B=%d: the pool cannot hold ctx %d, using ctx %d", kind, b, want_ctx, ctx)
                for mode in modes:
                    req_names = [None] * b if mode == "base" else names[:b]
                    reqs = make_requests(engine, b, ctx, req_names)
                    try:
                        step = ScheduledStep(prefill=kind == "prefill", requests=reqs)
                        for graph in decode_graphs if kind == "decode" else [False]:
                            rows.time(step, dict(kind=kind, mode=mode, batch=b, ctx=ctx), graph,
                                      profile_presync=b == sizes[0])
                    finally:
                        release(engine, reqs)
    finally:
        engine.shutdown()


class RowTimer:
    """Rows of one (step, graph path): a sync variant each (presync with TP), profiled on demand,
    saved as soon as measured; skipped once they no longer fit the run's deadline."""

    def __init__(self, args, engine, result: dict, save, run: str):
        self.args, self.engine, self.result, self.save, self.run = args, engine, result, save, run
        self.tp = 1 if engine.tp is None else engine.tp.size
        self.weight_bytes = weight_bytes(engine.runner.w)
        self.last_s = 5.0  # seconds the last row took, the estimate for the next

    def time(self, step, meta: dict, graph: bool, profile_presync: bool) -> None:
        args = self.args
        for sync in ["none", "presync"] if self.tp > 1 else ["none"]:
            what = f"{meta['kind']} {meta['mode']} B={meta['batch']} ctx={meta['ctx']} graph={graph} sync={sync}"
            if time.time() + 1.3 * self.last_s + 10 > args.deadline:
                self.result["skipped"].append(f"{what}: budget")
                continue
            start = time.monotonic()
            timer = watchdog(args.row_timeout, what)  # a hung collective ends the run, not the benchmark
            try:
                self._row(step, meta, graph, sync, what, profile=sync == "none" or profile_presync)
            finally:
                timer.cancel()
                self.last_s = time.monotonic() - start

    def _row(self, step, meta: dict, graph: bool, sync: str, what: str, profile: bool) -> None:
        args = self.args
        probe = StepProbe(self.engine, graph, args.presync_ms / 1e3 if sync == "presync" else 0.0)
        t, path = probe.measure(step, args.iters, args.warmup)
        distinct = len({r.adapter for r in step.requests if r.adapter is not None})
        row = dict(tp=self.tp, run=self.run, **meta, graphs_asked=graph, path=path, sync=sync,
                   distinct_adapters=distinct, **t)
        if meta["kind"] == "decode":
            row.update(self.bytes_floor(step, t["gpu_forward_s"]))
        self.result["rows"].append(row)
        self.save()
        log.info("%s: path %s, prepare %.2fms share %.2fms stage %.2fms gpu_fwd %.2fms wall %.2fms", what, path,
                 1e3 * t["prepare_s"], 1e3 * t.get("share_s", 0.0), 1e3 * t["stage_s"], 1e3 * t["gpu_forward_s"],
                 1e3 * t["wall_s"])
        if graph and path != "graph":
            log.warning("%s: the decode step fell back to the eager path", what)
        if args.profile_steps > 0 and profile:
            profile_row(probe, step, args.profile_steps, row, self.result, what)
            self.save()

    def bytes_floor(self, step, gpu_forward_s: float) -> dict:
        """What a decode step must read on rank 0, and that over the copy bandwidth."""
        e = self.engine
        kv = sum(r.seq_len for r in step.requests) * 2 * e.spec.layers * e.pool_tensor.shape[-1]
        kv *= e.pool_tensor.element_size()
        ad = sum(e.adapters.host[n].nbytes for n in {r.adapter for r in step.requests if r.adapter is not None})
        floor = (self.weight_bytes + kv + ad) / self.result["copy_bandwidth_Bps"]
        return dict(weight_bytes=self.weight_bytes, kv_bytes=kv, adapter_bytes=ad, floor_s=floor,
                    forward_over_floor=gpu_forward_s / floor)


def profile_row(probe: StepProbe, step, steps: int, row: dict, result: dict, what: str) -> None:
    """A row's step under the profiler; a profiler failure costs this profile only."""
    try:
        prof = probe.profile(step, steps)
    except Exception as e:
        log.exception("%s: profiling failed", what)
        result["skipped"].append(f"{what}: profile failed: {e!r}")
        return
    keys = ("tp", "run", "kind", "mode", "path", "sync", "batch", "ctx", "gpu_forward_s")
    result["profiles"].append({**{k: row[k] for k in keys}, **prof})
    log.info("%s: profile %s", what, ", ".join(f"{k} {v['count']:.0f} x {v['avg_us']:.1f}us"
                                                for k, v in prof["kinds"].items()))
    if probe.cuda and prof["total_us"] < 0.5e6 * row["gpu_forward_s"]:
        log.warning("%s: the profiler saw %.2fms of GPU work in a %.2fms step (kernels of graph replays "
                    "missing?)", what, prof["total_us"] / 1e3, 1e3 * row["gpu_forward_s"])


# -- the collectives alone ---------------------------------------------------------------------------
def _settle(cuda: bool) -> None:
    """Every rank idle and at the same point: what a timing starts from."""
    import torch
    import torch.distributed as dist

    if cuda:
        torch.cuda.synchronize()
        dist.barrier(device_ids=[torch.cuda.current_device()])
        torch.cuda.synchronize()
    else:
        dist.barrier()


def _time_calls(op, iters: int, cuda: bool) -> tuple[float, float]:
    """(device, host) seconds per call of `op` issued back to back from Python."""
    import torch

    for _ in range(3):
        op()
    _settle(cuda)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for _ in range(iters):
        op()
    host = time.perf_counter() - t0
    if not cuda:
        return host / iters, host / iters
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters, host / iters


def _time_graph(op, iters: int) -> float:
    """Seconds per call of `op` replayed from a CUDA graph (iters calls captured), as in the engine."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            op()
    graph.replay()
    _settle(True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def collective_rank(rank: int, n: int, init_method: str, cases: list, iters: int, out: str) -> None:
    """One of N processes timing the step's collectives (spawned by collectives_run)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from slora_backend.tensor_parallel import _all_gather
    from slora_backend.tp_worker import _watch_parent

    _watch_parent()  # exit with the run's process, even in the middle of a collective
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=n,
                            timeout=timedelta(seconds=120))
    rows = []
    for what, batch, shape, dtype in cases:
        x = torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
        if what.startswith("all_gather"):  # the function TPGroup.lora_column calls
            op = functools.partial(_all_gather, torch.empty((n * shape[0], *shape[1:]), dtype=x.dtype,
                                                            device=device), x)
        elif what.startswith("all_reduce"):
            op = functools.partial(dist.all_reduce, x)
        else:
            op = functools.partial(dist.broadcast, x, 0)
        row = dict(what=what, batch=batch, shape=list(shape), dtype=dtype, bytes=x.numel() * x.element_size())
        row["eager_device_s"], row["eager_host_s"] = _time_calls(op, iters, cuda)
        row["graph_s"] = _time_graph(op, iters) if cuda else None
        rows.append(row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    _settle(cuda)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip tearing down communicators used in CUDA graphs (pytorch#115388)


def collectives_run(args, result: dict, save) -> None:
    import torch
    import torch.multiprocessing as mp

    from slora_backend.dummy import dummy_spec
    from slora_backend.tp_worker import _free_port

    spec = dummy_spec(args.model)
    cuda = torch.cuda.is_available()
    r = max(SETTINGS[args.setting])
    local, n = -(-r // args.tp), args.tp
    model_dtype = "bfloat16" if cuda else "float32"
    cases = []
    for b in sorted(ints(args.batch), reverse=True):
        cases += [("all_gather LoRA q,k,v", b, (b, 3, local), "float32"),
                  ("all_gather LoRA gate,up", b, (b, 2, local), "float32"),
                  ("all_reduce LoRA o/down", b, (b, 1, r), "float32"),
                  ("all_reduce base o/down", b, (b, spec.hidden), model_dtype),
                  ("broadcast step inputs", b, (b * (2 * args.ctx + 40),), "int32")]
    out = Path(args.work) / "nccl_rows.tmp"
    timer = watchdog(max(60.0, args.deadline - time.time()), "the collectives")
    mp.start_processes(collective_rank, args=(n, f"tcp://127.0.0.1:{_free_port()}", cases, args.nccl_iters, str(out)),
                       nprocs=n, join=True, start_method="spawn")
    timer.cancel()
    result.update(tp=n, rows=json.loads(out.read_text()))
    out.unlink()
    for row in result["rows"]:
        log.info("%-24s B=%4d %8d bytes: eager %.1fus/call (host %.1fus)%s", row["what"], row["batch"], row["bytes"],
                 1e6 * row["eager_device_s"], 1e6 * row["eager_host_s"],
                 "" if row["graph_s"] is None else f", graph {1e6 * row['graph_s']:.1f}us/call")


def nccl_log(run_dir: Path, name: str) -> dict:
    """What NCCL's INIT log says about the links it chose (transports per channel, collapsed over
    channel numbers), its version and the settings it took from the environment."""
    import re

    lines: list[str] = []
    files = sorted(run_dir.glob(f"nccl_{name}.*.log"))
    for path in files:
        for line in path.read_text(errors="replace").splitlines():
            text = re.sub(r"Channel \d+(/\d+)?", "Channel *", line.split("NCCL INFO", 1)[-1].strip())
            keep = any(k in text for k in (" via ", "NCCL version", "NVLS", "set by environment"))
            if keep and text not in lines:
                lines.append(text)
    return {"files": [p.name for p in files], "lines": lines[:60]}


def child(args) -> int:
    name = args.run
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(name)s %(message)s")
    run_dir = Path(args.work)
    result: dict = {"run": name, **device_info(), "args": vars(args), "rows": [], "profiles": [], "skipped": []}
    path = run_dir / f"{name}.json"

    def save() -> None:  # after every row: a crash later keeps what was measured
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)

    cuda = result["cuda"]
    if not cuda:  # every rank is a process of its own: one thread each, not all cores each
        import torch

        os.environ.setdefault("OMP_NUM_THREADS", "1")  # the workers read it when they start
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if cuda and name in NCCL_LOG_RUNS and args.nccl_debug and "NCCL_DEBUG" not in os.environ:
        os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,ENV",
                          NCCL_DEBUG_FILE=str(run_dir / f"nccl_{name}.%h.%p.log"))
    result["nccl_env"] = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_NCCL"))}
    rc = 0
    try:
        if cuda:
            import torch

            version = torch.cuda.nccl.version()  # a tuple, an int in older releases
            result["nccl_version"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        if name == "nccl":
            collectives_run(args, result, save)
        else:
            engine_run(args, name, result, save)
    except Exception:
        log.exception("run %s failed", name)
        result["error"] = traceback.format_exc()
        rc = 1
    if cuda and name in NCCL_LOG_RUNS:
        result["nccl_log"] = nccl_log(run_dir, name)
    save()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # skip interpreter teardown: NCCL communicators used in CUDA graphs can hang it


# -- driver --------------------------------------------------------------------------------------------
def drive(args, argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s driver %(message)s")
    names = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in names if r not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; known: {list(RUNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Each run's file and NCCL's logs; the report gathers what they say.
    run_dir = Path(args.work or tempfile.mkdtemp(prefix="tp_decode_step_"))
    run_dir.mkdir(parents=True, exist_ok=True)
    runner = PhaseRunner(Path(__file__).resolve(), argv, args.budget)
    status: dict[str, str] = {}
    for i, name in enumerate(names):
        for stale in [run_dir / f"{name}.json", *run_dir.glob(f"nccl_{name}.*.log")]:
            stale.unlink(missing_ok=True)
        # The run's share: what is left minus what the runs after it need to start at all.
        later = sum(RUNS[m].min_s for m in names[i + 1 :]) * args.min_run_scale
        share = max(RUNS[name].min_s * args.min_run_scale, runner.left() - later)
        extra = ["--run", name, "--deadline", f"{time.time() + share:.1f}", "--work", str(run_dir)]
        status[name] = runner.launch(f"run {name}", extra, RUNS[name].min_s * args.min_run_scale)
    report = {"status": status, "wall_s": time.monotonic() - runner.t0, "args": vars(args), "work": str(run_dir),
              "runs": {}, "rows": [], "profiles": [], "collectives": []}
    for name in names:
        path = run_dir / f"{name}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        if name == "nccl":
            report["collectives"] = res.pop("rows")
        else:
            report["rows"] += res.pop("rows")
            report["profiles"] += res.pop("profiles")
        report["runs"][name] = res
    (out / "tp_decode_step.json").write_text(json.dumps(report, indent=1))
    print_report(report)
    return 0 if all(v == "ok" for v in status.values()) else 1


def _ms(value) -> str:
    return "-" if value is None else f"{1e3 * value:.2f}"


def print_report(report: dict) -> None:
    cols = {"prepare_s": "prep", "share_s": "share", "stage_s": "stage", "launch_s": "launch", "gpu_pre_s": "gpu_pre",
            "gpu_forward_s": "gpu_fwd", "sample_s": "sample", "wall_s": "wall", "floor_s": "floor"}
    print(f"{'run':<11} {'tp':>2} {'kind':<7} {'mode':<11} {'path':<5} {'sync':<7} {'B':>4} {'ctx':>4} "
          + " ".join(f"{c:>8}" for c in cols.values()) + f" {'fwd/floor':>9}   (milliseconds)")
    for r in report["rows"]:
        ratio = r.get("forward_over_floor")
        print(f"{r['run']:<11} {r['tp']:>2} {r['kind']:<7} {r['mode']:<11} {r['path']:<5} {r['sync']:<7} "
              f"{r['batch']:>4} {r['ctx']:>4} " + " ".join(f"{_ms(r.get(c)):>8}" for c in cols)
              + f" {'-' if ratio is None else f'{ratio:.2f}':>9}")
    largest = max((p["batch"] for p in report["profiles"] if p["kind"] == "decode"), default=0)
    for p in report["profiles"]:
        kinds = ", ".join(f"{k} {v['count']:.0f} x {v['avg_us']:.1f}us = {v['total_us'] / 1e3:.2f}ms"
                          for k, v in p["kinds"].items())
        print(f"profile {p['run']} tp={p['tp']} {p['kind']} {p['mode']} B={p['batch']} sync={p['sync']} "
              f"({p['source']}, per step): {kinds}")
        for t in p["top"][:6] if p["kind"] == "decode" and p["batch"] == largest else []:
            print(f"    {t['count']:6.0f} x {t['avg_us']:8.1f}us  {t['kind']:<11} {t['name'][:90]}")
    for c in report["collectives"]:
        graph = "-" if c["graph_s"] is None else f"{1e6 * c['graph_s']:.1f}"
        print(f"collective {c['what']:<24} B={c['batch']:>4} {c['bytes']:>9} bytes: "
              f"eager {1e6 * c['eager_device_s']:.1f}us (host {1e6 * c['eager_host_s']:.1f}us), "
              f"graph {graph}us per call")
    for name, res in report["runs"].items():
        if "error" in res:
            print(f"error in {name}: {res['error'].strip().splitlines()[-1]}")
        for line in res.get("skipped", []):
            print(f"skipped in {name}: {line}")
        for line in res.get("nccl_log", {}).get("lines", [])[:12]:
            print(f"nccl ({name}): {line}")
    print("status:", json.dumps(report["status"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results", help="folder of tp_decode_step.json")
    ap.add_argument("--work", default="", help="folder of each run's file and NCCL's logs (default: a new temp folder)")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size of the TP runs")
    ap.add_argument("--model", default="dummy:llama-13b")
    ap.add_argument("--setting", default="S4", choices=sorted(SETTINGS), help="adapter ranks (tp_bench.py)")
    ap.add_argument("--targets", default="qkvo", choices=["qkvo", "all"])
    ap.add_argument("--batch", default="1,64,256", help="decode batch sizes")
    ap.add_argument("--ctx", type=int, default=512, help="tokens in each request's KV")
    ap.add_argument("--prefill-batch", default="1,4", help="prompts per prefill step ('' = no prefill rows)")
    ap.add_argument("--prefill-len", type=int, default=256, help="tokens per prompt of the prefill rows")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--presync-ms", type=float, default=5.0, help="rank 0's head start for the workers (presync)")
    ap.add_argument("--profile-steps", type=int, default=1, help="steps per profile (0 = no profiles)")
    ap.add_argument("--nccl-iters", type=int, default=50, help="calls per timing in the nccl run")
    ap.add_argument("--nccl-debug", action=argparse.BooleanOptionalAction, default=True,
                    help="NCCL's INIT log for the graphs and nccl runs, unless NCCL_DEBUG is set")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for all runs together")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds an engine may take to start")
    ap.add_argument("--row-timeout", type=float, default=120.0, help="seconds one row may take (a hang ends its run)")
    ap.add_argument("--min-run-scale", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--run", choices=list(RUNS), help=argparse.SUPPRESS)  # internal: one run
    ap.add_argument("--deadline", type=float, default=0.0, help=argparse.SUPPRESS)  # internal: epoch seconds
    args = ap.parse_args()
    if args.run:
        return child(args)
    return drive(args, sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
