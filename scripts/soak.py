#!/usr/bin/env python3
"""Bounded soak of the real tritonserver on loopback: nothing lost, no page leaked.

    .venv/bin/python scripts/soak.py [--duration 180] [--workers 8] [--seed 0] [--json OUT]

Builds a tiny random Llama with PEFT adapters (tests/tiny_model.py; nothing downloaded), serves
it with tritonserver on free loopback ports (small engine limits, so that busy answers and
preemptions happen), and runs --workers client threads for --duration seconds. Each picks:

* a checked generation (fixed prompt and adapter, greedy): tokens must equal HF + PEFT's;
* a random generation: gRPC or HTTP, streamed or not, ids or text, base model or an adapter,
  sampled or greedy, and in a share of them the client cancels (gRPC) or drops the connection
  (HTTP) after a few responses;
* a bad input (wrong dtype or shape, invalid UTF-8, out-of-range values, bad adapter names,
  unservable adapters): exactly one error expected;
* a lifecycle command: list, stats, or load/unload of the two "churn" adapters, which other
  workers keep using (so "is unloaded" answers are expected for them).

Every request ends as completed (or, for a command, answered), cancelled (by us), an expected
error (a bad input refused, "busy", a churn adapter unloaded), an unexpected error (anything
else, or wrong tokens) or lost (no final answer within --request-timeout). At the end the
engine must be idle with no KV page held, and after unloading every adapter its pool must be
as free as at the start. Prints progress every 10 s and a summary (requests, pool pages, RSS of
tritonserver and stub); exits 1 if anything was lost, a page leaked or an unexpected error
happened.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from server_utils import (  # noqa: E402
    TritonServer,
    engine_stats,
    http_json,
    rss_bytes,
    server_pids,
    write_model_repository,
)

from client.triton_client import GenerationError, generate, stream_generate  # noqa: E402

MODEL = "slora"
# name -> (rank, target modules); churn-* are loaded and unloaded while in use.
ADAPTERS = {
    "r1-qv": (1, ["q_proj", "v_proj"]),
    "r8-all": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "r16-mlp": (16, ["gate_proj", "up_proj", "down_proj"]),
    "r4-ko": (4, ["k_proj", "o_proj"]),
    "churn-1": (8, ["q_proj", "v_proj"]),
    "churn-2": (2, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}
STABLE = [None, "r1-qv", "r8-all", "r16-mlp", "r4-ko"]
CHURN = ["churn-1", "churn-2"]
# Small limits on purpose: 10 workers against 6 running + 2 waiting requests meet "busy" now and
# then, and 6 long requests outgrow the pool (preemption).
ENGINE = {"dtype": "float32", "pool_pages": "1536", "max_batch_size": "6", "max_queue": "2",
          "max_rank": "16"}
CHECK_TOKENS = 12
TEXTS = ["The quick brown fox", "What is the capital of France?", "Hello world! 0123",
         "ünïcödé ☃ 東京", "Serving many LoRA adapters"]


# -- set-up ----------------------------------------------------------------------------------


def build_assets(root: Path) -> dict:
    from tiny_model import build_adapter, build_tiny_model

    model = build_tiny_model(root / "base", seed=0)
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        build_adapter(model, root / "adapters" / name, rank=rank, targets=targets,
                      alpha=2 * rank, seed=200 + i)
    bad = root / "adapters" / "dora"  # on disk, refused at first use with its reason
    shutil.copytree(root / "adapters" / "r1-qv", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    return {"model": model, "adapters": root / "adapters"}


def references(assets: dict, rng: random.Random) -> list[tuple[list[int], str | None, list[int]]]:
    from tiny_model import hf_peft_greedy

    out = []
    for adapter in STABLE:
        ids = [rng.randrange(1, 380) for _ in range(rng.randrange(3, 20))]
        adapter_dir = None if adapter is None else assets["adapters"] / adapter
        out.append((ids, adapter, hf_peft_greedy(assets["model"], adapter_dir, ids, CHECK_TOKENS)))
    return out


# -- the requests ----------------------------------------------------------------------------


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.unexpected: list[str] = []

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.counts[outcome] += 1
            if outcome in ("unexpected", "lost") and len(self.unexpected) < 50:
                self.unexpected.append(f"{outcome}: {detail[:300]}")




def run_generation(url: dict, rng: random.Random, args, refs, tally: Tally) -> None:
    protocol = rng.choice(["grpc", "http"])
    if rng.random() < 0.3:  # checked: exact tokens
        ids, adapter, want = rng.choice(refs)
        inputs = dict(input_ids=ids, adapter_id=adapter, max_tokens=CHECK_TOKENS, ignore_eos=True,
                      stream=rng.random() < 0.7)
        cancel_after = None
    else:
        want = None
        adapter = rng.choice(STABLE + CHURN)
        inputs = dict(adapter_id=adapter, max_tokens=rng.randrange(1, 96),
                      ignore_eos=rng.random() < 0.5, stream=rng.random() < 0.8)
        if rng.random() < 0.5:
            inputs["text_input"] = rng.choice(TEXTS)
            inputs["chat"] = rng.random() < 0.3
        else:
            inputs["input_ids"] = [rng.randrange(1, 380) for _ in range(rng.randrange(1, 60))]
        if rng.random() < 0.5:
            inputs.update(temperature=rng.uniform(0.2, 1.5), top_p=rng.uniform(0.3, 1.0),
                          top_k=rng.randrange(0, 50), seed=rng.randrange(1 << 30))
        cancel_after = rng.randrange(1, 6) if inputs["stream"] and rng.random() < 0.3 else None
    t0 = time.monotonic()
    tokens: list[int] = []
    reason = None
    try:
        gen = stream_generate(url[protocol], protocol, timeout=args.request_timeout, **inputs)
        for n, chunk in enumerate(gen, 1):
            tokens += chunk.token_ids
            reason = chunk.finish_reason or reason
            if cancel_after is not None and n >= cancel_after and reason is None:
                gen.close()  # gRPC: cancel the stream; HTTP: drop the connection
                tally.add("cancelled")
                return
    except GenerationError as e:
        msg = str(e)
        if time.monotonic() - t0 >= args.request_timeout or "no response within" in msg:
            tally.add("lost", f"{protocol} {inputs}: {msg}")
        elif "busy" in msg:
            tally.add("error_busy")
            time.sleep(rng.uniform(0.1, 0.5))  # as a client should before it retries
        elif adapter in CHURN and "is unloaded" in msg:
            tally.add("error_unloaded")
        else:
            tally.add("unexpected", f"{protocol} {inputs}: {msg}")
        return
    if reason not in ("stop", "length"):
        tally.add("unexpected", f"{protocol} {inputs}: finish_reason {reason!r}")
    elif want is not None and tokens != want:
        tally.add("unexpected", f"{protocol} {inputs}: tokens {tokens} != HF+PEFT {want}")
    else:
        tally.add("completed")
        if want is not None:
            tally.add("checked_exact")  # a tag, not an outcome: counted in completed


def _grpc_raw(url: str, inputs: list[tuple[str, np.ndarray, str]], timeout: float) -> list:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        tensors = []
        for name, arr, datatype in inputs:
            t = grpcclient.InferInput(name, list(arr.shape), datatype)
            t.set_data_from_numpy(arr)
            tensors.append(t)
        client.async_stream_infer(MODEL, tensors)
        out = []
        while True:
            try:
                result, error = got.get(timeout=timeout)
            except queue.Empty:
                return out + ["timeout"]
            out.append("error" if error is not None else "response")
            if error is not None or result.get_response().parameters[
                    "triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


def _t(s: bytes):
    return ("text_input", np.array([[s]], dtype=np.object_), "BYTES")


def _i32(name, *v):
    return (name, np.array([list(v)], dtype=np.int32), "INT32")


BAD_GRPC = [
    [_t(b"hi"), ("max_tokens", np.array([[4.0]], np.float32), "FP32")],
    [("input_ids", np.array([[1, 2]], np.int64), "INT64")],
    [_t(b"hi"), _i32("max_tokens", 4, 5)],
    [_t(b"\xff\xfe\xfd")],
    [_i32("input_ids", 1, 10**6)],
    [_i32("input_ids", *([3] * 300))],
    [_t(b"hi"), _i32("max_tokens", 0)],
    [_t(b"hi"), _i32("max_tokens", 2**31 - 1)],
    [_t(b"hi"), _i32("top_k", -1)],
    [_t(b"hi"), ("top_p", np.array([[1.5]], np.float32), "FP32")],
    [_t(b"hi"), ("temperature", np.array([[-1.0]], np.float32), "FP32")],
    [_t(b"hi"), ("adapter_id", np.array([[b"../../etc"]], np.object_), "BYTES")],
    [_t(b"hi"), ("adapter_id", np.array([[b"/abs/path"]], np.object_), "BYTES")],
    [_t(b"hi"), ("adapter_id", np.array([[b"a\x00b"]], np.object_), "BYTES")],
    [_t(b"hi"), ("adapter_id", np.array([[b"x" * 4000]], np.object_), "BYTES")],
    [_t(b"hi"), ("adapter_id", np.array([[b"dora"]], np.object_), "BYTES")],
    [_t(b"hi"), ("adapter_id", np.array([[b"no-such-adapter"]], np.object_), "BYTES")],
    [_t(b"hi"), ("command", np.array([[b"explode"]], np.object_), "BYTES")],
]
BAD_HTTP = [
    {"max_tokens": 4},
    {"text_input": "hi", "max_tokens": -1},
    {"text_input": "hi", "top_p": 0},
    {"text_input": "hi", "sampling_parameters": "{oops"},
    {"text_input": "hi", "frequency_penalty": 0.5},
    {"text_input": 5},
    {"text_input": "hi", "adapter_id": "../x"},
]


def run_bad_input(url: dict, rng: random.Random, args, tally: Tally) -> None:
    if rng.random() < 0.6:
        got = _grpc_raw(url["grpc"], rng.choice(BAD_GRPC), args.request_timeout)
        if got == ["error"]:
            tally.add("error_bad_input")
        elif got and got[-1] == "timeout":
            tally.add("lost", f"bad gRPC input: {got}")
        else:
            tally.add("unexpected", f"bad gRPC input answered {got}")
        return
    body = rng.choice(BAD_HTTP)
    status, answer = http_json(url["http"], f"/v2/models/{MODEL}/generate", body,
                               timeout=args.request_timeout)
    if status in (400, 500) and isinstance(answer, dict) and "error" in answer:
        tally.add("error_bad_input")
    elif status == 0:
        tally.add("lost", f"bad HTTP input {body}: {answer}")
    else:
        tally.add("unexpected", f"bad HTTP input {body}: HTTP {status} {answer}")


def run_lifecycle(url: dict, rng: random.Random, args, tally: Tally) -> None:
    command = rng.choice(["list_adapters", "stats", "load_adapter", "unload_adapter",
                          "unload_adapter", "load_adapter"])
    inputs = {"command": command}
    if command in ("load_adapter", "unload_adapter"):
        inputs["adapter_id"] = rng.choice(CHURN)
    try:
        got = generate(url["grpc"], "grpc", timeout=args.request_timeout, **inputs)
        json.loads(got.text)
        tally.add("command")
    except GenerationError as e:
        tally.add("unexpected", f"{inputs}: {e}")


def worker(url: dict, seed: int, args, refs, tally: Tally, deadline: float) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        tally.add("sent")
        r = rng.random()
        try:
            if r < 0.75:
                run_generation(url, rng, args, refs, tally)
            elif r < 0.9:
                run_bad_input(url, rng, args, tally)
            else:
                run_lifecycle(url, rng, args, tally)
        except Exception as e:  # noqa: BLE001 - a client-side surprise is a finding too
            tally.add("unexpected", f"client exception {e!r}")


# -- the run ---------------------------------------------------------------------------------


def rss_split(server_pid: int) -> dict[str, int]:
    """Resident bytes of tritonserver and of its Python-backend stub(s)."""
    pids = server_pids(server_pid)
    stubs = [p for p in pids if p != server_pid]
    return {"tritonserver": rss_bytes([server_pid]), "stub": rss_bytes(stubs)}


def _mib(rss: dict[str, int]) -> str:
    return " + ".join(f"{k} {v / 2**20:.0f}" for k, v in rss.items()) + " MiB"


def _expected(c: Counter) -> int:
    return c["error_bad_input"] + c["error_busy"] + c["error_unloaded"]


def wait_idle(http: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = engine_stats(http)
        if (stats["requests"]["waiting"] == 0 and stats["requests"]["running"] == 0
                and stats["pool"]["pages_kv"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=180.0, help="seconds of traffic")
    p.add_argument("--workers", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=120.0,
                   help="a request without a final answer by then is lost")
    p.add_argument("--json", type=Path, help="write the summary here as JSON")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (logs)")
    args = p.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="slora-soak-"))
    t_setup = time.monotonic()
    assets = build_assets(scratch)
    refs = references(assets, random.Random(args.seed))
    repo = write_model_repository(scratch / "repo", {
        "model_dir": str(assets["model"]), "adapter_dir": str(assets["adapters"]), **ENGINE})
    server = TritonServer(repo, scratch / "tritonserver.log")
    server.start()
    print(f"soak: tritonserver up on {server.http_url} / {server.grpc_url} after "
          f"{time.monotonic() - t_setup:.0f} s of set-up; {args.workers} workers for "
          f"{args.duration:.0f} s", flush=True)
    url = {"grpc": server.grpc_url, "http": server.http_url}
    ok = False
    try:
        start_stats = engine_stats(server.http_url)
        pids = server_pids(server.proc.pid)
        tally = Tally()
        # Warm-up (first-use allocations, adapter loads) before the memory baseline.
        for adapter in STABLE:
            generate(url["grpc"], "grpc", input_ids=[1, 2, 3], adapter_id=adapter, max_tokens=4)
        rss_start = rss_split(server.proc.pid)
        rss_peak = sum(rss_start.values())
        t0 = time.monotonic()
        deadline = t0 + args.duration
        threads = [threading.Thread(target=worker, args=(url, args.seed * 1000 + i, args, refs,
                                                         tally, deadline), daemon=True)
                   for i in range(args.workers)]
        for t in threads:
            t.start()
        next_report = t0 + 10
        while any(t.is_alive() for t in threads):
            time.sleep(1.0)
            rss_now = rss_split(server.proc.pid)
            rss_peak = max(rss_peak, sum(rss_now.values()))
            elapsed = time.monotonic() - t0
            if time.monotonic() >= next_report or not any(t.is_alive() for t in threads):
                next_report += 10
                stats = engine_stats(server.http_url)
                c = tally.counts
                print(f"[{elapsed:5.0f} s] sent {c['sent']} completed {c['completed']} commands "
                      f"{c['command']} cancelled "
                      f"{c['cancelled']} expected errors {_expected(c)} unexpected "
                      f"{c['unexpected']} lost {c['lost']} | pages kv {stats['pool']['pages_kv']} "
                      f"adapter {stats['pool']['pages_adapter']} free {stats['pool']['pages_free']}"
                      f" | preemptions {stats['requests']['preemptions']} | RSS "
                      f"{_mib(rss_now)}", flush=True)
            if elapsed > args.duration + 2 * args.request_timeout:
                break
        for t in threads:
            t.join(1.0)
        traffic_s = time.monotonic() - t0
        idle = wait_idle(server.http_url, 30.0)
        rss_end = rss_split(server.proc.pid)
        # Unload every adapter: then the pool must be exactly as free as before any traffic.
        for name in ADAPTERS:
            http_json(server.http_url, f"/v2/models/{MODEL}/generate",
                      {"command": "unload_adapter", "adapter_id": name}, timeout=60)
        end_stats = wait_idle(server.http_url, 10.0)
        c = tally.counts
        finished = (c["completed"] + c["command"] + c["cancelled"] + _expected(c) + c["unexpected"]
                    + c["lost"])
        lost = c["lost"] + (c["sent"] - finished)  # requests without any outcome are lost too
        leaked = (idle["pool"]["pages_kv"] != 0
                  or end_stats["pool"]["pages_free"] != start_stats["pool"]["pages_free"])
        summary = {
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} CPUs", "duration_s": round(traffic_s, 1),
            "workers": args.workers, "seed": args.seed, "engine": ENGINE,
            "sent": c["sent"], "completed": c["completed"], "checked_exact": c["checked_exact"],
            "commands": c["command"], "cancelled": c["cancelled"],
            "expected_errors": {"bad_input": c["error_bad_input"], "busy": c["error_busy"],
                                "churn_adapter_unloaded": c["error_unloaded"]},
            "unexpected_errors": c["unexpected"],
            "lost": lost, "preemptions": idle["requests"]["preemptions"],
            "generated_tokens": idle["generated_tokens"],
            "pool_start": start_stats["pool"], "pool_idle_end": idle["pool"],
            "pool_end_after_unloading_adapters": end_stats["pool"],
            "rss_mib": {"start": {k: round(v / 2**20, 1) for k, v in rss_start.items()},
                        "end": {k: round(v / 2**20, 1) for k, v in rss_end.items()},
                        "peak_total": round(rss_peak / 2**20, 1),
                        "growth_total": round((sum(rss_end.values()) - sum(rss_start.values()))
                                              / 2**20, 1)},
            "processes": len(pids), "unexpected_examples": tally.unexpected[:10],
        }
        print(json.dumps(summary, indent=2))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2) + "\n")
        ok = lost == 0 and not leaked and c["unexpected"] == 0
        print(f"soak: {'PASS' if ok else 'FAIL'}: {lost} lost, "
              f"{'pages leaked' if leaked else 'no page leaked'}, {c['unexpected']} unexpected")
    finally:
        server.stop()
        if args.keep or not ok:
            print(f"soak: logs in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
