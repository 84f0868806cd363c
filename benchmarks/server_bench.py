"""The same S-LoRA trace through the real tritonserver and against the in-process engine.

    python benchmarks/server_bench.py --model dummy:llama-7b --setting S2 --n 100 --rate 8 --duration 30

The server runs this repository's model (dummy weights, `dummy_adapters` registered at
start) on free loopback ports; requests go over gRPC streaming (tritonclient, one stream per
client process carrying its requests by request id; the default) or HTTP `generate_stream`
(server-sent events, one thread per request, standard library only: the GPU image has no
tritonclient), from --client-procs processes. Then the server is stopped and the in-process
engine replays the identical trace. Writes `<out>/server_vs_inprocess.json` with both reports,
both engines' stats and their throughput ratio.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from server_utils import MODEL_NAME as MODEL  # noqa: E402
from server_utils import TritonServer, write_model_repository  # noqa: E402

from benchmarks.slora_bench import SETTINGS, replay  # noqa: E402
from client.workload import RequestTiming, WorkloadSpec, make_trace, summarize  # noqa: E402
from slora_backend.dummy import dummy_spec  # noqa: E402

log = logging.getLogger("server_bench")


def stream_one(port: int, body: dict, timing: RequestTiming, start: float, timeout: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v2/models/slora/generate_stream", json.dumps(body),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            timing.error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
            return
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                timing.error = str(event["error"])
                return
            ids = event.get("token_ids", [])
            n = len(ids) if isinstance(ids, list) else 1
            if n and timing.first_token is None:
                timing.first_token = time.monotonic() - start - timing.arrival
            timing.output_tokens += n
            if event.get("finish_reason"):
                timing.latency = time.monotonic() - start - timing.arrival
                return
        timing.error = "stream ended without finish_reason"
    except Exception as e:  # a benchmark records failures instead of stopping
        timing.error = repr(e)
    finally:
        conn.close()


def _on_time(trace, timings: list[RequestTiming], start: float):
    """(index, request inputs) of each trace request at its arrival time (sleeping until
    then), its actual send time recorded in timings."""
    for i, r in enumerate(trace):
        delay = r.arrival - (time.monotonic() - start)
        if delay > 0:
            time.sleep(delay)
        timings[i].arrival = time.monotonic() - start
        values = {"input_ids": r.prompt_ids, "max_tokens": r.output_len, "ignore_eos": True}
        if r.adapter is not None:
            values["adapter_id"] = r.adapter
        yield i, values


def replay_http(port: int, trace, timeout: float, start: float | None = None) -> list[RequestTiming]:
    """Send `trace` (arrival times relative to `start`, a time.monotonic() value: now by
    default), one thread per request; the timings of each."""
    timings = [RequestTiming(arrival=r.arrival) for r in trace]
    start = time.monotonic() if start is None else start
    threads = []
    for i, body in _on_time(trace, timings, start):
        t = threading.Thread(target=stream_one, args=(port, body, timings[i], start, timeout), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout)
    return timings


def print_run(kind: str, results: dict) -> None:
    stats, r = results[f"{kind}_engine_stats"], results[kind]
    print(f"{kind:>9} engine: steps {stats.get('steps')} step_time {stats.get('step_time')} "
          f"host_s {stats.get('host_s')} gpu_wait_s {stats.get('gpu_wait_s')}")
    print(f"{kind:>9}: {r['throughput_req_s']:.2f} req/s {r['throughput_tok_s']:.0f} tok/s "
          f"lat {r['latency_avg']:.2f}s ftl {r['first_token_avg']:.2f}s finished {r['finished']}/{r['requests']} "
          f"errors {r['errors']}")


def engine_stats(port: int) -> dict:
    """The served engine's Engine.stats() (the `command=stats` probe): its step times and host
    time, to set beside the in-process engine's."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v2/models/slora/generate", json.dumps({"command": "stats"}),
                     {"Content-Type": "application/json"})
        return json.loads(json.loads(conn.getresponse().read())["text_output"])
    except Exception as e:  # a benchmark records failures instead of stopping
        return {"error": repr(e)}
    finally:
        conn.close()


def replay_grpc(url: str, trace, timeout: float, start: float | None = None) -> list[RequestTiming]:
    """Send `trace` over one gRPC stream (tritonclient), as the issue's harness asks: request i
    has request id i, each response is matched to its request by that id."""
    import tritonclient.grpc as grpcclient

    from client.triton_client import build_grpc_inputs

    timings = [RequestTiming(arrival=r.arrival) for r in trace]
    start = time.monotonic() if start is None else start
    done = threading.Semaphore(0)
    errors: list[str] = []

    def on_response(result, error) -> None:
        now = time.monotonic() - start
        if error is not None:  # tritonclient does not say which request an error belongs to
            errors.append(str(error))
            done.release()
            return
        response = result.get_response()
        t = timings[int(response.id)]
        if any(o.name == "token_ids" for o in response.outputs):
            n = result.as_numpy("token_ids").size
            if n and t.first_token is None:
                t.first_token = now - t.arrival
            t.output_tokens += n
        params = response.parameters
        if "triton_final_response" in params and params["triton_final_response"].bool_param:
            t.latency = now - t.arrival
            done.release()

    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=on_response)
    try:
        for i, values in _on_time(trace, timings, start):
            client.async_stream_infer(MODEL, build_grpc_inputs(batch_dim=True, **values), request_id=str(i),
                                      enable_empty_final_response=True)
        deadline = time.monotonic() + timeout
        for _ in trace:
            if not done.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    for t in timings:
        if t.latency is None and t.error is None:
            t.error = errors.pop() if errors else "no final response"
    return timings


def _replay_shard(job) -> list[RequestTiming]:
    protocol, address, shard, timeout, start = job
    replay = replay_grpc if protocol == "grpc" else replay_http
    return replay(address, shard, timeout, start)


def replay_procs(protocol: str, address, trace, timeout: float, procs: int) -> list[RequestTiming]:
    """The trace from `procs` client processes, request i from process i % procs, all on one
    clock (time.monotonic() is system-wide). One Python process parsing every streamed token
    of a saturated server is itself a bottleneck (the GIL): the client must not be what is
    measured."""
    if procs <= 1:
        return _replay_shard((protocol, address, trace, timeout, None))
    start = time.monotonic() + 2.0  # the workers' start-up is not part of the trace
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        parts = pool.map(_replay_shard, [(protocol, address, trace[i::procs], timeout, start)
                                         for i in range(procs)])
    timings: list = [None] * len(trace)
    for i, part in enumerate(parts):
        timings[i::procs] = part
    return timings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama-7b")
    ap.add_argument("--setting", default="S2", choices=sorted(SETTINGS))
    ap.add_argument("--targets", default="qkvo", choices=["qkvo", "all"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--client-procs", type=int, default=4, help="client processes sending the trace")
    ap.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                    help="gRPC streaming (tritonclient) or HTTP generate_stream (standard library only: "
                         "for a machine without tritonclient, such as the GPU image)")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment of tritonserver (model.py's benchmark knobs); repeatable")
    ap.add_argument("--no-inprocess", action="store_true", help="the server run only (A/B of server settings)")
    ap.add_argument("--label", default="", help="suffix of the result file's name")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ranks = ",".join(map(str, SETTINGS[args.setting]))
    engine_params = {"model_dir": args.model, "dummy_adapters": f"{args.n}:{ranks}:{args.targets}",
                     "max_model_len": "2048", "max_batch_size": "256", "max_prefill_tokens": "8192",
                     "adapter_dir": "none"}
    spec = WorkloadSpec(n_adapters=args.n, rate=args.rate, duration=args.duration, input_range=(8, args.max_len),
                        output_range=(8, args.max_len), vocab=dummy_spec(args.model).vocab, seed=7)
    trace = make_trace(spec)
    results = {"args": vars(args), "requests": len(trace)}
    work = Path(tempfile.mkdtemp(prefix="server_bench_"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repo = write_model_repository(work / "repo", engine_params)
    server_env = dict(kv.split("=", 1) for kv in args.server_env)
    with TritonServer(repo, out / f"server_bench_server{args.label}.log", env=server_env,
                      start_timeout=900) as server:
        log.info("server up on http :%d; sending %d requests", server.http_port, len(trace))
        address = server.grpc_url if args.protocol == "grpc" else server.http_port
        timings = replay_procs(args.protocol, address, trace, args.duration * 6 + 120, args.client_procs)
        results["server"] = summarize(timings).as_dict()
        results["server_engine_stats"] = engine_stats(server.http_port)
        results["server_metrics_excerpt"] = [ln for ln in server.metrics().splitlines()
                                             if ln.startswith(("slora_pool_pages", "nv_gpu_utilization"))][:8]
    log.info("server: %s", {k: results["server"][k] for k in ("throughput_req_s", "finished", "errors")})

    if args.no_inprocess:
        (out / f"server_only{args.label}.json").write_text(json.dumps(results, indent=2))
        print_run("server", results)
        return 0

    import torch

    from slora_backend.config import EngineConfig
    from slora_backend.engine import Engine

    deadline = time.monotonic() + 120  # the stopped server's stub frees its GPU memory asynchronously
    while torch.cuda.is_available() and time.monotonic() < deadline:
        free, total = torch.cuda.mem_get_info()
        if free > 0.9 * total:
            break
        time.sleep(1)
    cfg = EngineConfig.from_parameters({k: v for k, v in engine_params.items() if k != "adapter_dir"})
    engine = Engine(cfg)
    timings = replay(engine, trace, drop_adapters=False, deadline=args.duration * 6)
    results["inprocess"] = summarize(timings).as_dict()
    results["inprocess_engine_stats"] = engine.stats()
    engine.shutdown()
    results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results["server_over_inprocess"] = (results["server"]["throughput_req_s"]
                                        / results["inprocess"]["throughput_req_s"])
    (out / f"server_vs_inprocess{args.label}.json").write_text(json.dumps(results, indent=2))
    for k in ("server", "inprocess"):
        print_run(k, results)
    print(f"server/in-process: {results['server_over_inprocess']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
