"""End to end: the real tritonserver serving a tiny random Llama with PEFT adapters.

Concurrent gRPC streams and HTTP server-sent-event streams for several adapters and the base
model must produce exactly the token ids of HF Transformers + PEFT greedy decoding.
"""

from __future__ import annotations

import json
import queue
import random
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from server_utils import (
    REPO_ROOT,
    TritonServer,
    free_port,
    metric_value,
    stop_process_group,
    wait_ready,
    write_model_repository,
)
from tiny_model import build_adapter, build_tiny_model, hf_peft_greedy

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

MODEL = "slora"
MAX_TOKENS = 10
# name -> (rank, target modules, alpha, rsLoRA)
ADAPTERS = {
    "qv8": (8, ["q_proj", "v_proj"], 16, False),
    "all4": (4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             8, True),
    "mlp16": (16, ["gate_proj", "up_proj", "down_proj"], 32, False),
    "ko2": (2, ["k_proj", "o_proj"], 4, False),
}
TARGETS = [None, "qv8", "all4", "mlp16"]  # ko2 is kept for the cancellation test


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model_dir = build_tiny_model(root / "base", seed=0)
    for i, (name, (rank, targets, alpha, rslora)) in enumerate(ADAPTERS.items()):
        build_adapter(model_dir, root / "adapters" / name, rank=rank, targets=targets,
                      alpha=alpha, use_rslora=rslora, seed=100 + i)
    return {"root": root, "model": model_dir, "adapters": root / "adapters"}


@pytest.fixture(scope="module")
def server(assets):
    repo = write_model_repository(assets["root"] / "repo", {
        "model_dir": str(assets["model"]),
        "adapter_dir": str(assets["adapters"]),
        "dtype": "float32",
        "pool_pages": "4096",
    })
    srv = TritonServer(repo, assets["root"] / "tritonserver.log")
    srv.start()
    yield srv
    srv.stop()


_refs: dict = {}


def reference(assets, adapter: str | None, prompt_ids: list[int], n: int = MAX_TOKENS) -> list[int]:
    key = (adapter, tuple(prompt_ids), n)
    if key not in _refs:
        adapter_dir = None if adapter is None else assets["adapters"] / adapter
        _refs[key] = hf_peft_greedy(assets["model"], adapter_dir, prompt_ids, n)
    return _refs[key]


def prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 300) for _ in range(rng.randrange(3, 24))] for _ in range(count)]


# -- clients -------------------------------------------------------------------------------


def grpc_inputs(fields: dict) -> list:
    """InferInputs with the batch dimension 1 (the model is configured with max_batch_size > 0)."""
    dtypes = {"input_ids": ("INT32", np.int32), "max_tokens": ("INT32", np.int32),
              "top_k": ("INT32", np.int32), "seed": ("INT64", np.int64),
              "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32),
              "ignore_eos": ("BOOL", np.bool_), "stream": ("BOOL", np.bool_),
              "chat": ("BOOL", np.bool_), "exclude_input_in_output": ("BOOL", np.bool_)}
    out = []
    for name, value in fields.items():
        triton_type, np_type = dtypes.get(name, ("BYTES", np.object_))
        values = value if isinstance(value, list) else [value]
        if np_type is np.object_:
            values = [v.encode() if isinstance(v, str) else v for v in values]
        arr = np.array([values], dtype=np_type)
        inp = tritonclient_grpc.InferInput(name, list(arr.shape), triton_type)
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def grpc_generate(url: str, fields: dict, timeout: float = 120.0) -> list[dict]:
    """One request on its own gRPC stream; every response as a dict (error responses too)."""
    client = tritonclient_grpc.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(MODEL, grpc_inputs(fields))
        got = []
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                got.append({"error": str(error), "final": True})
                return got
            resp = result.get_response()
            item = {"final": resp.parameters["triton_final_response"].bool_param}
            names = {o.name for o in resp.outputs}
            if "text_output" in names:
                item["text"] = result.as_numpy("text_output").reshape(-1)[0].decode()
                item["token_ids"] = result.as_numpy("token_ids").reshape(-1).tolist()
            if "finish_reason" in names:
                item["finish_reason"] = result.as_numpy("finish_reason").reshape(-1)[0].decode()
            got.append(item)
            if item["final"]:
                return got
    finally:
        client.stop_stream()
        client.close()


def http_generate_stream(url: str, body: dict, timeout: float = 120.0) -> list[dict]:
    """POST generate_stream; the server-sent events as dicts."""
    with requests.Session() as s:
        s.trust_env = False
        r = s.post(f"http://{url}/v2/models/{MODEL}/generate_stream", json=body, stream=True,
                   timeout=timeout, headers={"Connection": "close"})
        events = []
        for line in r.iter_lines():
            if line.startswith(b"data: "):
                events.append(json.loads(line[len(b"data: "):]))
        r.close()
    return events


def ids_of(item) -> list[int]:
    ids = item.get("token_ids", [])
    return ids if isinstance(ids, list) else [ids]  # generate JSON gives one id as a scalar


# -- tests ---------------------------------------------------------------------------------


def test_concurrent_streams_match_hf_peft(assets, server):
    """gRPC and HTTP streams for the base model and three adapters, all at once."""
    jobs = []
    for i, ids in enumerate(prompts(8, seed=1)):
        jobs.append(("grpc", TARGETS[i % len(TARGETS)], ids))
    for i, ids in enumerate(prompts(4, seed=2)):
        jobs.append(("http", TARGETS[i % len(TARGETS)], ids))
    expected = [reference(assets, adapter, ids) for _, adapter, ids in jobs]

    def run(job):
        kind, adapter, ids = job
        fields = {"input_ids": ids, "max_tokens": MAX_TOKENS, "ignore_eos": True}
        if adapter:
            fields["adapter_id"] = adapter
        if kind == "grpc":
            return grpc_generate(server.grpc_url, fields)
        return http_generate_stream(server.http_url, fields)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(run, jobs))

    for (kind, adapter, ids), want, got in zip(jobs, expected, results, strict=True):
        assert all("error" not in r for r in got), (kind, adapter, got)
        tokens = [t for r in got for t in ids_of(r)]
        assert tokens == want, f"{kind} adapter={adapter} prompt={ids}"
        assert len(got) > 1, "expected a streamed sequence of responses"
        assert all("text_output" in r or "text" in r for r in got)
        assert got[-1].get("finish_reason") == "length"
        assert all("finish_reason" not in r for r in got[:-1])
        if kind == "grpc":
            assert got[-1]["final"] and not any(r["final"] for r in got[:-1])
    # The adapters do change the output (so the comparison above means something).
    ids = jobs[0][2]
    assert len({tuple(reference(assets, a, ids)) for a in TARGETS}) > 1


def test_stream_false_sends_one_response(assets, server):
    ids = prompts(1, seed=3)[0]
    want = reference(assets, "all4", ids)
    got = grpc_generate(server.grpc_url, {"input_ids": ids, "adapter_id": "all4",
                                          "max_tokens": MAX_TOKENS, "ignore_eos": True,
                                          "stream": False})
    assert len(got) == 1 and got[0]["final"]
    assert got[0]["token_ids"] == want and got[0]["finish_reason"] == "length"
    # HTTP /generate accepts exactly one response per request.
    with requests.Session() as s:
        s.trust_env = False
        r = s.post(f"http://{server.http_url}/v2/models/{MODEL}/generate", timeout=60,
                   json={"input_ids": ids, "adapter_id": "all4", "max_tokens": MAX_TOKENS,
                         "ignore_eos": True, "stream": False})
    assert r.status_code == 200, r.text
    body = r.json()
    assert ids_of(body) == want and body["finish_reason"] == "length"


def test_text_prompt_chat_and_vllm_style_inputs(assets, server):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets["model"]))
    prompt = "The quick brown fox"
    want = reference(assets, "mlp16", tok(prompt)["input_ids"], 6)
    # Triton vllm_backend style: sampling_parameters JSON with lora_name, exclude_input_in_output.
    sampling = json.dumps({"max_tokens": 6, "ignore_eos": True, "temperature": 0,
                           "lora_name": "mlp16", "n": 1})
    got = grpc_generate(server.grpc_url, {"text_input": prompt, "sampling_parameters": sampling,
                                          "exclude_input_in_output": True, "stream": False})
    assert "error" not in got[0], got
    assert got[0]["token_ids"] == want
    assert got[0]["text"] == tok.decode(want)

    chat_ids = tok(tok.apply_chat_template([{"role": "user", "content": "Hello world"}],
                                           tokenize=False, add_generation_prompt=True),
                   add_special_tokens=False)["input_ids"]
    want = reference(assets, None, chat_ids, 5)
    events = http_generate_stream(server.http_url, {"text_input": "Hello world", "chat": True,
                                                    "max_tokens": 5, "ignore_eos": True})
    assert [t for e in events for t in ids_of(e)] == want, events


def test_unknown_adapter_is_an_error_then_server_serves(assets, server):
    got = grpc_generate(server.grpc_url, {"text_input": "hi", "adapter_id": "no-such-adapter"})
    assert len(got) == 1 and "unknown adapter" in got[0]["error"]
    events = http_generate_stream(server.http_url, {"text_input": "hi", "adapter_id": "../etc"})
    assert len(events) == 1 and "error" in events[0]
    ids = prompts(1, seed=4)[0]
    got = grpc_generate(server.grpc_url, {"input_ids": ids, "adapter_id": "qv8",
                                          "max_tokens": MAX_TOKENS, "ignore_eos": True})
    assert [t for r in got for t in r["token_ids"]] == reference(assets, "qv8", ids)


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 4}, "empty prompt"),
    ({"text_input": "a", "input_ids": [1, 2]}, "not both"),
    ({"text_input": "a", "max_tokens": 0}, "max_tokens"),
    ({"text_input": "a", "temperature": -1.0}, "temperature"),
    ({"text_input": "a", "frequency_penalty": 0.5}, "not supported"),
    ({"text_input": "a", "max_token": 3}, "unknown request parameter"),
    ({"text_input": "a", "sampling_parameters": "{oops"}, "sampling_parameters"),
])
def test_invalid_requests_get_one_error_response(server, body, message):
    events = http_generate_stream(server.http_url, body)
    assert len(events) == 1 and message in events[0].get("error", ""), events


def test_batch_of_two_in_one_request_is_refused(server):
    client = tritonclient_grpc.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inp = tritonclient_grpc.InferInput("text_input", [2, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[b"a"], [b"b"]], dtype=np.object_))
    client.async_stream_infer(MODEL, [inp])
    result, error = responses.get(timeout=60)
    client.stop_stream()
    assert error is not None and "batch size 2" in str(error)


def test_cancelled_stream_stops_generation(assets, server):
    before = server.metrics()
    client = tritonclient_grpc.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(MODEL, grpc_inputs({"input_ids": [5, 6, 7], "adapter_id": "ko2",
                                                  "max_tokens": 240, "ignore_eos": True}))
    result, error = responses.get(timeout=60)
    assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()
    # Wait until generation has stopped: the token counter holds still and nothing runs.
    last, deadline = -1.0, time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.6)  # longer than the gauges' refresh period
        text = server.metrics()
        count = metric_value(text, "slora_generated_tokens_total", adapter="ko2")
        if count == last and metric_value(text, "slora_requests", state="running") == 0:
            break
        last = count
    generated = count - metric_value(before, "slora_generated_tokens_total", adapter="ko2")
    assert 1 <= generated < 240
    # ...and the server goes on serving.
    ids = prompts(1, seed=5)[0]
    got = grpc_generate(server.grpc_url, {"input_ids": ids, "max_tokens": 4, "ignore_eos": True})
    assert [t for r in got for t in r["token_ids"]] == reference(assets, None, ids, 4)


def test_metrics_move_per_adapter(assets, server):
    before = server.metrics()
    ids = prompts(1, seed=6)[0]
    for adapter in ("qv8", "mlp16"):
        got = grpc_generate(server.grpc_url, {"input_ids": ids, "adapter_id": adapter,
                                              "max_tokens": 3, "ignore_eos": True})
        assert "error" not in got[-1]
    grpc_generate(server.grpc_url, {"text_input": "x", "adapter_id": "missing"})
    time.sleep(0.8)  # gauges follow engine.stats() every 0.5 s
    after = server.metrics()

    def delta(name, **labels):
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    for adapter in ("qv8", "mlp16"):
        assert delta("slora_requests_total", adapter=adapter) == 1
        assert delta("slora_generated_tokens_total", adapter=adapter) == 3
        assert delta("slora_first_token_latency_seconds_count", adapter=adapter) == 1
        assert delta("slora_request_errors_total", adapter=adapter) == 0
    assert delta("slora_request_errors_total", adapter="missing") == 1
    assert metric_value(after, "slora_pool_capacity_pages") == 4096
    assert metric_value(after, "slora_pool_pages", use="adapter") > 0
    assert metric_value(after, "slora_adapters", state="resident") >= 1
    assert metric_value(after, "slora_adapter_loads_total") >= 2
    # Two requests of 3 tokens: at least one prefill and two decode steps, timed.
    assert delta("slora_steps_total", kind="prefill") >= 1 and delta("slora_steps_total", kind="decode") >= 2
    assert delta("slora_step_seconds_total", kind="decode") > 0
    assert "# TYPE slora_kernel_compiles_total counter" in after
    # Triton's own counters see the same model.
    assert metric_value(after, "nv_inference_request_success", model=MODEL) > 0


def test_dynamic_batching_groups_concurrent_requests(server):
    """Several requests arriving together reach one execute() (Triton's batch statistics)."""
    def fire(_):
        return http_generate_stream(server.http_url, {"input_ids": [1, 2, 3], "max_tokens": 2,
                                                      "ignore_eos": True})

    with requests.Session() as s:
        s.trust_env = False
        stats0 = s.get(f"http://{server.http_url}/v2/models/{MODEL}/stats", timeout=10).json()
        for _ in range(5):  # arrival is racy; a few rounds make a grouped batch near certain
            with ThreadPoolExecutor(16) as pool:
                assert all(len(e) >= 1 for e in pool.map(fire, range(16)))
        stats1 = s.get(f"http://{server.http_url}/v2/models/{MODEL}/stats", timeout=10).json()

    def counts(stats):
        model = stats["model_stats"][0]
        return model["inference_count"], model["execution_count"]

    (inf0, exe0), (inf1, exe1) = counts(stats0), counts(stats1)
    assert inf1 - inf0 == 80
    assert exe1 - exe0 < inf1 - inf0, "no execute() call received more than one request"


def test_model_config_is_the_contract(server):
    with requests.Session() as s:
        s.trust_env = False
        config = s.get(f"http://{server.http_url}/v2/models/{MODEL}/config", timeout=10).json()
    inputs = {i["name"]: i for i in config["input"]}
    for name in ("text_input", "input_ids", "adapter_id", "max_tokens", "temperature", "top_p",
                 "top_k", "seed", "stop", "ignore_eos", "stream", "chat", "sampling_parameters",
                 "exclude_input_in_output"):
        assert inputs[name]["optional"], name
    assert {o["name"] for o in config["output"]} == {"text_output", "token_ids", "finish_reason"}
    assert config["model_transaction_policy"]["decoupled"]


def test_serve_script_serves_a_model_and_adapters(assets, tmp_path):
    """scripts/serve.sh: the user-facing command, with --model/--adapters and port flags."""
    ports = [free_port() for _ in range(3)]
    cmd = [str(REPO_ROOT / "scripts" / "serve.sh"), "--model", str(assets["model"]),
           "--adapters", str(assets["adapters"]), "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
           "--", "--exit-timeout-secs=5"]
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{ports[0]}", proc, 180, log_path.read_text)
        ids = prompts(1, seed=7)[0]
        got = grpc_generate(f"127.0.0.1:{ports[1]}", {"input_ids": ids, "adapter_id": "all4",
                                                      "max_tokens": 4, "ignore_eos": True})
        assert [t for r in got for t in r["token_ids"]] == reference(assets, "all4", ids, 4)
    finally:
        stop_process_group(proc)


def test_adapter_lifecycle_through_triton(assets, server):
    """list / unload / load through the `command` input, without a restart; the unloaded
    adapter is refused with an error response, and comes back exactly after load."""
    def command(body: dict) -> dict:
        events = http_generate_stream(server.http_url, body)
        assert len(events) == 1, events
        return events[0]

    listed = json.loads(command({"command": "list_adapters"})["text_output"])
    assert {"qv8", "all4", "mlp16"} <= {a["name"] for a in listed}
    assert all({"name", "rank", "target_modules", "tier", "bytes", "requests_served"} <= set(a) for a in listed)

    ids = prompts(1, seed=9)[0]
    body = {"input_ids": ids, "adapter_id": "mlp16", "max_tokens": MAX_TOKENS, "ignore_eos": True}
    assert json.loads(command({"command": "unload_adapter", "adapter_id": "mlp16"})["text_output"])["unloaded"]
    assert "unloaded" in command(body).get("error", "")
    loaded = json.loads(command({"command": "load_adapter", "adapter_id": "mlp16"})["text_output"])
    assert loaded["name"] == "mlp16" and loaded["rank"] == 16
    events = http_generate_stream(server.http_url, body)
    assert [t for e in events for t in ids_of(e)] == reference(assets, "mlp16", ids)
    assert "unknown command" in command({"command": "explode"}).get("error", "")
    assert "unknown adapter" in command({"command": "load_adapter", "adapter_id": "nope"}).get("error", "")
