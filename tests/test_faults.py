"""Faults and load through the real tritonserver: bad inputs of every kind, a flood of cancelled
streams, overload beyond the queue limit, pool exhaustion.

Each bad input must get exactly one error response (the FINAL one) naming the problem, and
the server must serve correctly right after; at the end of every test the engine holds no KV
pages (read through the model's `stats` command).
"""

from __future__ import annotations

import json
import queue
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from server_utils import TritonServer, engine_stats, write_model_repository
from tiny_model import build_adapter, build_tiny_model, hf_peft_greedy

from client.triton_client import GenerationError, generate, stream_generate

grpcclient = pytest.importorskip("tritonclient.grpc")

MODEL = "slora"
MAX_BATCH, MAX_QUEUE, POOL_PAGES = 4, 16, 1024
LIMIT = MAX_BATCH + MAX_QUEUE  # requests the engine takes at once; one more is "busy"
PROMPT = [7, 3, 19, 42, 5]
GOOD = {"qv8": dict(rank=8, targets=["q_proj", "v_proj"], alpha=16),
        "all4": dict(rank=4, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                      "up_proj", "down_proj"], alpha=8)}


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    model = build_tiny_model(root / "base", seed=0)
    adapters = root / "adapters"
    for i, (name, kw) in enumerate(GOOD.items()):
        build_adapter(model, adapters / name, seed=30 + i, **kw)
    # Adapters the server must refuse, each with its reason (as found on disk under the root).
    for name, edit in [("dora", dict(use_dora=True)), ("bias", dict(bias="all")),
                       ("saves-head", dict(modules_to_save=["lm_head"])), ("rank128", dict(r=128))]:
        shutil.copytree(adapters / "qv8", adapters / name)
        _edit_config(adapters / name, **edit)
    other = build_tiny_model(root / "other-base", head_dim=32, seed=1)  # q/k/v/o widths differ
    build_adapter(other, adapters / "other-base", rank=4, targets=["q_proj", "v_proj"], alpha=8,
                  seed=40)
    (adapters / "pickled").mkdir()
    shutil.copy(adapters / "qv8" / "adapter_config.json", adapters / "pickled")
    (adapters / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04 never unpickled")
    shutil.copytree(adapters / "qv8", adapters / "truncated")
    weights = adapters / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"root": root, "model": model, "adapters": adapters}


@pytest.fixture(scope="module")
def server(assets):
    repo = write_model_repository(assets["root"] / "repo", {
        "model_dir": str(assets["model"]), "adapter_dir": str(assets["adapters"]),
        "dtype": "float32", "pool_pages": str(POOL_PAGES), "max_rank": "64",
        "max_batch_size": str(MAX_BATCH), "max_queue": str(MAX_QUEUE),
    })
    with TritonServer(repo, assets["root"] / "tritonserver.log") as srv:
        yield srv


_refs: dict = {}


def reference(assets, adapter: str | None, n: int, prompt=PROMPT) -> list[int]:
    key = (adapter, tuple(prompt), n)
    if key not in _refs:
        _refs[key] = hf_peft_greedy(assets["model"], adapter and assets["adapters"] / adapter,
                                    list(prompt), n)
    return _refs[key]


def wait_idle(server, timeout: float = 30.0) -> dict:
    """The engine's stats once nothing waits or runs (and no KV page is held)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine_stats(server.http_url)
        req = stats["requests"]
        if req["waiting"] == 0 and req["running"] == 0 and stats["pool"]["pages_kv"] == 0:
            return stats
        assert time.monotonic() < deadline, f"engine not idle: {stats}"
        time.sleep(0.2)


def assert_serves(assets, server, adapter="qv8"):
    got = generate(server.grpc_url, "grpc", input_ids=PROMPT, adapter_id=adapter, max_tokens=4,
                   ignore_eos=True, timeout=60)
    assert got.token_ids == reference(assets, adapter, 4) and got.finish_reason == "length"


# -- bad inputs ------------------------------------------------------------------------------


def grpc_raw(url: str, inputs: list[tuple[str, np.ndarray, str]], settle: float = 0.5) -> list:
    """Send one request on its own stream with exactly these (name, array, datatype) inputs;
    everything that comes back: ("error", message) / ("response", final flag)."""
    client = grpcclient.InferenceServerClient(url)
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    tensors = []
    for name, arr, datatype in inputs:
        t = grpcclient.InferInput(name, list(arr.shape), datatype)
        t.set_data_from_numpy(arr)
        tensors.append(t)
    try:
        client.async_stream_infer(MODEL, tensors)
        out = []
        while True:
            try:  # after the first answer, wait a little longer for anything stray
                result, error = got.get(timeout=settle if out else 60)
            except queue.Empty:
                return out
            if error is not None:
                out.append(("error", str(error)))
            else:
                out.append(("response",
                            result.get_response().parameters["triton_final_response"].bool_param))
    finally:
        client.stop_stream()
        client.close()


def i32(*v):
    return np.array([list(v)], dtype=np.int32)


def text(s: bytes):
    return np.array([[s]], dtype=np.object_)


@pytest.mark.parametrize("inputs, message", [
    # Wrong dtypes and shapes: Triton's own checks against config.pbtxt, or the model's.
    ([("text_input", text(b"hi"), "BYTES"), ("max_tokens", np.array([[4.0]], np.float32), "FP32")],
     "max_tokens"),
    ([("input_ids", np.array([[1, 2]], np.int64), "INT64")], "input_ids"),
    ([("text_input", i32(5), "INT32")], "text_input"),
    ([("text_input", text(b"hi"), "BYTES"), ("max_tokens", i32(4, 5), "INT32")], "max_tokens"),
    ([("text_input", text(b"hi"), "BYTES"), ("no_such_input", i32(1), "INT32")], "no_such_input"),
    ([("input_ids", np.zeros((1, 0), np.int32), "INT32")], "empty prompt"),
    ([("text_input", text(b"\xff\xfe bad"), "BYTES")], "UTF-8"),
    # Values out of range.
    ([("input_ids", i32(1, 10**6), "INT32")], "out of range"),
    ([("input_ids", i32(*([3] * 300)), "INT32")], "does not fit the context"),
    ([("text_input", text(b"hi"), "BYTES"), ("max_tokens", i32(-5), "INT32")], "max_tokens"),
    ([("text_input", text(b"hi"), "BYTES"), ("max_tokens", i32(2**31 - 1), "INT32")], "max_tokens"),
    ([("text_input", text(b"hi"), "BYTES"), ("top_k", i32(-1), "INT32")], "top_k"),
    ([("text_input", text(b"hi"), "BYTES"), ("top_p", np.array([[0.0]], np.float32), "FP32")],
     "top_p"),
    ([("text_input", text(b"hi"), "BYTES"), ("top_p", np.array([[1.5]], np.float32), "FP32")],
     "top_p"),
    ([("text_input", text(b"hi"), "BYTES"),
      ("temperature", np.array([[np.nan]], np.float32), "FP32")], "temperature"),
    # Adapter names that must never reach the file system.
    ([("text_input", text(b"hi"), "BYTES"), ("adapter_id", text(b"/etc/passwd"), "BYTES")],
     "adapter"),
    ([("text_input", text(b"hi"), "BYTES"), ("adapter_id", text(b"../../etc"), "BYTES")],
     "adapter"),
    ([("text_input", text(b"hi"), "BYTES"), ("adapter_id", text(b"qv8\x00x"), "BYTES")],
     "adapter"),
    ([("text_input", text(b"hi"), "BYTES"), ("adapter_id", text(b"x" * 5000), "BYTES")],
     "adapter"),
    ([("text_input", text(b"hi"), "BYTES"), ("command", text(b"reboot"), "BYTES")],
     "unknown command"),
], ids=lambda v: None if isinstance(v, str) else "-".join(n for n, _, _ in v))
def test_bad_grpc_input_gets_one_error_and_the_server_serves(assets, server, inputs, message):
    got = grpc_raw(server.grpc_url, inputs)
    assert len(got) == 1 and got[0][0] == "error", got
    assert message in got[0][1], got
    assert_serves(assets, server)


@pytest.mark.parametrize("body, message", [
    ({"text_input": "hi", "max_tokens": 10**12}, "max_tokens"),  # beyond INT32
    ({"text_input": "hi", "max_tokens": 10**6}, "max_tokens"),  # beyond max_tokens_limit
    ({"text_input": "hi", "top_k": -3}, "top_k"),
    ({"text_input": "hi", "top_p": 1.01}, "top_p"),
    # Triton's HTTP front end refuses these itself (HTTP 500, "Unable to parse ...").
    ({"text_input": 5}, "Unable to parse"),
    ({"input_ids": ["a", "b"]}, "Unable to parse"),
    ({"text_input": "hi", "adapter_id": "a" * 300}, "adapter"),
])
def test_bad_http_input_gets_one_error_and_the_server_serves(assets, server, body, message):
    r = requests.post(f"http://{server.http_url}/v2/models/{MODEL}/generate_stream", json=body,
                      timeout=60)
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    if events:  # the model's answer: one SSE event holding the error
        assert len(events) == 1 and message in events[0].get("error", ""), r.text
    else:  # refused by Triton's HTTP front end before the model
        assert r.status_code in (400, 500) and message in r.json()["error"], r.text
    assert_serves(assets, server)


def test_invalid_json_body_is_refused(assets, server):
    r = requests.post(f"http://{server.http_url}/v2/models/{MODEL}/generate_stream",
                      data=b'{"text_input": "hi", ', timeout=30)
    assert r.status_code in (400, 500) and "parse" in r.json()["error"], r.text
    assert_serves(assets, server)


@pytest.mark.parametrize("adapter, reason", [
    ("dora", "DoRA"), ("bias", "bias"), ("saves-head", "modules_to_save"),
    ("rank128", "exceeds the configured maximum"), ("other-base", "does not fit the base model"),
    ("pickled", "never loaded"), ("truncated", "cannot read"), ("missing", "unknown adapter"),
])
def test_unservable_adapter_on_disk_is_a_clear_error(assets, server, adapter, reason):
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        with pytest.raises(GenerationError, match=reason):
            generate(url, protocol, input_ids=PROMPT, adapter_id=adapter, max_tokens=4, timeout=60)
    assert_serves(assets, server, adapter="all4")
    assert wait_idle(server)["pool"]["pages_kv"] == 0


# -- cancellation, overload, pool exhaustion -------------------------------------------------


def test_cancelled_flood_returns_the_pool_to_baseline(assets, server):
    """16 streams of 200 tokens, 4x the engine's batch: each is cancelled (gRPC) or dropped
    (HTTP) at its first token, while the rest wait in the queue or run."""
    for adapter in GOOD:  # make both adapters resident first: the baseline includes them
        assert_serves(assets, server, adapter)
    base = wait_idle(server)
    n_grpc, n_http = 10, 6

    def one(i: int) -> int:
        protocol = "grpc" if i < n_grpc else "http"
        url = server.grpc_url if protocol == "grpc" else server.http_url
        gen = stream_generate(url, protocol, input_ids=PROMPT, adapter_id=list(GOOD)[i % 2],
                              max_tokens=200, ignore_eos=True, timeout=120)
        first = next(gen)
        gen.close()  # gRPC: stop_stream(cancel_requests=True); HTTP: the socket is closed
        return len(first.token_ids)

    with ThreadPoolExecutor(n_grpc + n_http) as pool:
        assert all(n >= 1 for n in pool.map(one, range(n_grpc + n_http)))
    after = wait_idle(server, timeout=30)  # every request stopped, every KV page back
    assert after["pool"] == base["pool"], (base["pool"], after["pool"])
    generated = after["generated_tokens"] - base["generated_tokens"]
    print(f"\ncancelled flood: {n_grpc + n_http} streams stopped after {generated} tokens in all "
          f"(of {(n_grpc + n_http) * 200} asked)")
    assert generated < (n_grpc + n_http) * 200 // 4, "cancellation did not stop generation early"
    assert_serves(assets, server)


def _run(server, max_tokens: int, i: int) -> tuple[str, float, str]:
    t0 = time.monotonic()
    try:
        got = generate(server.grpc_url, "grpc", input_ids=PROMPT, adapter_id=list(GOOD)[i % 2],
                       max_tokens=max_tokens, ignore_eos=True, timeout=300)
        ok = len(got.token_ids) == max_tokens and got.finish_reason == "length"
        return ("ok" if ok else "short"), time.monotonic() - t0, ""
    except GenerationError as e:
        return "error", time.monotonic() - t0, str(e)


def test_overload_beyond_the_queue_is_busy_below_it_all_complete(assets, server):
    wait_idle(server)
    n = 3 * LIMIT
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: _run(server, 48, i), range(n)))
    busy = [r for r in results if r[0] == "error"]
    done = [r for r in results if r[0] == "ok"]
    assert all("busy" in r[2] for r in busy), busy[:3]
    assert len(done) + len(busy) == n, results
    assert len(busy) >= n - 2 * LIMIT, f"only {len(busy)} of {n} were refused"
    # "immediate": a refusal never waits behind the accepted work. Against the median
    # completion, not the fastest: on a loaded 2-core CI machine one accepted request can
    # finish (0.62 s) before the last refusal is delivered (0.67 s), and that race says
    # nothing about queueing; a refusal queued behind the work would come after half of it.
    assert max(r[1] for r in busy) < statistics.median(r[1] for r in done), (busy, done)
    print(f"\noverload: {len(busy)} of {n} refused busy within {max(r[1] for r in busy):.2f} s; "
          f"{len(done)} completed in up to {max(r[1] for r in done):.1f} s")
    wait_idle(server)
    with ThreadPoolExecutor(LIMIT) as pool:  # at the limit: everyone is served
        results = list(pool.map(lambda i: _run(server, 48, i), range(LIMIT)))
    assert all(r[0] == "ok" for r in results), results
    assert wait_idle(server)["pool"]["pages_kv"] == 0


def test_pool_exhaustion_preempts_and_outputs_stay_exact(assets, server):
    """8 requests whose KV outgrows the 1024-page pool while they decode: preempted and
    recomputed, never a crash, tokens still exactly HF + PEFT's."""
    before = wait_idle(server)
    adapters = [None, "qv8", "all4", "qv8"] * 2
    with ThreadPoolExecutor(len(adapters)) as pool:
        results = list(pool.map(lambda a: generate(
            server.grpc_url, "grpc", input_ids=PROMPT, adapter_id=a, max_tokens=200,
            ignore_eos=True, timeout=600), adapters))
    for adapter, got in zip(adapters, results, strict=True):
        assert got.token_ids == reference(assets, adapter, 200), adapter
    after = wait_idle(server)
    assert after["requests"]["preemptions"] > before["requests"]["preemptions"]
    assert after["pool"]["pages_kv"] == 0
