"""Adapter upload inside a request (command=upload_adapter): validated like an adapter on disk,
persisted atomically under the adapter directory, served by name, refused with a clear error
otherwise; in process and through the real tritonserver."""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import time

import numpy as np
import pytest
import requests
import torch
from engine_utils import greedy, run_batch, tokens_of
from safetensors.torch import load_file, save_file
from server_utils import TritonServer, metric_value, write_model_repository
from tiny_model import ALL_MODULES, build_adapter, build_tiny_model, hf_peft_greedy

from client import cli
from client.triton_client import GenerationError, generate, upload_adapter
from slora_backend import triton_io
from slora_backend.config import EngineConfig
from slora_backend.engine import Engine
from slora_backend.request import RequestError

PROMPT = [11, 42, 7, 99, 5]
MAX_TOKENS = 6
LIMIT_MB = 0.1  # the small adapters fit, the rank-64 all-modules one (~0.5 MiB) does not


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("upload")
    model = build_tiny_model(root / "model")
    src = root / "sources"
    build_adapter(model, src / "qv4", rank=4, targets=["q_proj", "v_proj"], alpha=8, seed=21)
    build_adapter(model, src / "mlp8", rank=8, targets=["gate_proj", "up_proj", "down_proj"], alpha=16, seed=22)
    build_adapter(model, src / "big", rank=64, targets=ALL_MODULES, alpha=16, seed=23)
    build_adapter(model, root / "adapters" / "existing", rank=2, targets=["k_proj", "o_proj"], alpha=4, seed=24)
    return {"root": root, "model": model, "src": src, "adapters": root / "adapters"}


@pytest.fixture(scope="module")
def engine(assets):
    eng = Engine(EngineConfig(model_dir=str(assets["model"]), adapter_dir=str(assets["adapters"]),
                              kernel_backend="torch", pool_pages=2000, max_upload_mb=LIMIT_MB))
    yield eng
    eng.shutdown()


def files_of(path) -> tuple[bytes, bytes]:
    return (path / "adapter_config.json").read_bytes(), (path / "adapter_model.safetensors").read_bytes()


def tree(path) -> list[str]:
    """Every entry under path (hidden ones too), to show that nothing else was written."""
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, dirs, fs in os.walk(path) for f in dirs + fs)


def served(engine, adapter: str) -> list[int]:
    outs = run_batch(engine, [dict(prompt_ids=PROMPT, adapter=adapter, params=greedy(MAX_TOKENS))])[0]
    assert outs[-1].error is None, outs[-1].error
    return tokens_of(outs)


# -- in process ---------------------------------------------------------------------------------


def test_upload_is_persisted_and_served_like_hf_peft(assets, engine, tmp_path):
    result = engine.upload_adapter("up-qv4", *files_of(assets["src"] / "qv4"))
    assert result["uploaded"] and not result["replaced"]
    assert result["rank"] == 4 and result["target_modules"] == ["q_proj", "v_proj"] and result["tier"] == "host"
    assert files_of(assets["adapters"] / "up-qv4") == files_of(assets["src"] / "qv4")
    assert not [n for n in os.listdir(assets["adapters"]) if n.startswith(".")], "staging left behind"
    want = hf_peft_greedy(assets["model"], assets["src"] / "qv4", PROMPT, MAX_TOKENS)
    assert served(engine, "up-qv4") == want
    # A model reload (or a restart after a crash) serves it from the adapter directory.
    again = Engine(EngineConfig(model_dir=str(assets["model"]), adapter_dir=str(assets["adapters"]),
                                kernel_backend="torch", pool_pages=500))
    try:
        assert served(again, "up-qv4") == want
    finally:
        again.shutdown()


def _edit_config(edit):
    def apply(cfg: bytes, weights: bytes, tmp_path) -> tuple[bytes, bytes]:
        c = json.loads(cfg)
        edit(c)
        return json.dumps(c).encode(), weights
    return apply


def _edit_tensors(edit):
    def apply(cfg: bytes, weights: bytes, tmp_path) -> tuple[bytes, bytes]:
        (tmp_path / "w.safetensors").write_bytes(weights)
        t = load_file(str(tmp_path / "w.safetensors"))
        edit(t)
        save_file(t, str(tmp_path / "w.safetensors"))
        return cfg, (tmp_path / "w.safetensors").read_bytes()
    return apply


def _widen_q(t):
    for k in list(t):
        if "q_proj.lora_A" in k:
            t[k] = torch.randn(4, 72)


@pytest.mark.parametrize("variant, reason", [
    (_edit_config(lambda c: c.update(use_dora=True)), "DoRA"),
    (_edit_config(lambda c: c.update(modules_to_save=["lm_head"])), "modules_to_save"),
    (_edit_config(lambda c: c.update(bias="lora_only")), "bias"),
    (_edit_config(lambda c: c.update(r=128)), "exceeds the configured maximum"),
    (_edit_tensors(_widen_q), "does not fit the base model"),
    (_edit_tensors(lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.randn(4, 64)})),
     "unsupported tensor"),
    (lambda c, w, p: (c, w[: len(w) // 2]), "cannot read adapter_model.safetensors"),
    (lambda c, w, p: (c, b""), "cannot read adapter_model.safetensors"),
    (lambda c, w, p: (b"{not json", w), "not valid JSON"),
])
def test_bad_uploads_are_refused_and_leave_nothing(assets, engine, tmp_path, variant, reason):
    cfg, weights = variant(*files_of(assets["src"] / "qv4"), tmp_path)
    before = tree(assets["adapters"])
    with pytest.raises(RequestError, match=reason):
        engine.upload_adapter("bad-one", cfg, weights)
    assert tree(assets["adapters"]) == before
    assert "bad-one" not in {a["name"] for a in engine.list_adapters()}


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "/tmp/evil", ".hidden", "x" * 200, "", "a\x00b"])
def test_upload_names_never_escape_the_adapter_directory(assets, engine, name):
    parent_before, before = tree(assets["root"]), tree(assets["adapters"])
    with pytest.raises(RequestError, match="invalid adapter name"):
        engine.upload_adapter(name, *files_of(assets["src"] / "qv4"))
    assert tree(assets["root"]) == parent_before and tree(assets["adapters"]) == before
    assert not os.path.exists("/tmp/evil")


def test_upload_over_the_size_limit_is_refused(assets, engine):
    with pytest.raises(RequestError, match="exceeds the limit"):
        engine.upload_adapter("too-big", *files_of(assets["src"] / "big"))
    assert not (assets["adapters"] / "too-big").exists()


def test_existing_names_are_replaced_only_after_unload(assets, engine):
    before = files_of(assets["adapters"] / "existing")
    with pytest.raises(RequestError, match="already exists"):
        engine.upload_adapter("existing", *files_of(assets["src"] / "mlp8"))
    assert files_of(assets["adapters"] / "existing") == before
    old = served(engine, "existing")

    # Unloaded while a request still runs on it: the old version stays until that one finishes.
    q: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(prompt_ids=PROMPT, adapter="existing", params=greedy(60), on_output=q.put)
    assert not q.get(timeout=60).finished
    engine.unload_adapter("existing")
    with pytest.raises(RequestError, match="running requests"):
        engine.upload_adapter("existing", *files_of(assets["src"] / "mlp8"))
    while not (out := q.get(timeout=120)).finished:
        pass
    assert out.error is None and out.generated_tokens == 60

    result = engine.upload_adapter("existing", *files_of(assets["src"] / "mlp8"))
    assert result["replaced"] and result["rank"] == 8 and not result["unloaded"]
    assert files_of(assets["adapters"] / "existing") == files_of(assets["src"] / "mlp8")
    new = served(engine, "existing")
    assert new == hf_peft_greedy(assets["model"], assets["src"] / "mlp8", PROMPT, MAX_TOKENS) and new != old
    assert not [n for n in os.listdir(assets["adapters"]) if n.startswith(".")]


def test_parse_upload_inputs():
    cfg, weights = b'{"r": 4}', b"\x08\x00\x00\x00\x00\x00\x00\x00{}      \x00"

    def inputs(**values):
        return lambda name: (None if name not in values
                             else np.array([[values[name]]], dtype=np.object_))

    assert triton_io.parse_upload(inputs(adapter_config=cfg, adapter_weights=weights)) == (cfg, weights)
    b64 = b"base64:" + base64.b64encode(weights)
    assert triton_io.parse_upload(inputs(adapter_config=cfg, adapter_weights=b64)) == (cfg, weights)
    with pytest.raises(RequestError, match="not valid base64"):
        triton_io.parse_upload(inputs(adapter_config=cfg, adapter_weights=b"base64:@@@"))
    with pytest.raises(RequestError, match="needs the input adapter_weights"):
        triton_io.parse_upload(inputs(adapter_config=cfg))
    assert triton_io.parse_command(inputs(command=b"upload_adapter", adapter_id=b"x"), None) == (
        "upload_adapter", "x")
    with pytest.raises(RequestError, match="upload_adapter only"):
        triton_io.parse_command(inputs(text_input=b"hi", adapter_weights=weights), None)


# -- through the real tritonserver ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(assets):
    root = assets["root"] / "served"
    shutil.copytree(assets["adapters"] / "existing", root / "adapters" / "existing")
    repo = write_model_repository(root / "repo", {
        "model_dir": str(assets["model"]), "adapter_dir": str(root / "adapters"), "dtype": "float32",
        "pool_pages": "2000", "max_upload_mb": str(LIMIT_MB),
    })
    with TritonServer(repo, root / "tritonserver.log") as srv:
        srv.adapters = root / "adapters"
        yield srv


def http_events(server, body: dict) -> list[dict]:
    """generate_stream's events; the stream ends only after the response with the FINAL flag."""
    with requests.Session() as s:
        s.trust_env = False
        r = s.post(f"http://{server.http_url}/v2/models/slora/generate_stream", json=body, stream=True,
                   timeout=120)
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: ")]


def test_upload_through_triton_then_generate_matches_hf_peft(assets, server, capsys):
    rc = cli.main(["adapters", "upload", "srv-qv4", str(assets["src"] / "qv4"), "-u", server.grpc_url])
    answer = json.loads(capsys.readouterr().out)
    assert rc == 0 and answer["uploaded"] and answer["rank"] == 4
    assert files_of(server.adapters / "srv-qv4") == files_of(assets["src"] / "qv4")
    done = generate(server.grpc_url, "grpc", input_ids=PROMPT, adapter_id="srv-qv4", max_tokens=MAX_TOKENS,
                    ignore_eos=True)
    assert done.token_ids == hf_peft_greedy(assets["model"], assets["src"] / "qv4", PROMPT, MAX_TOKENS)
    listed = {a["name"]: a for a in json.loads(generate(server.grpc_url, "grpc", command="list_adapters").text)}
    assert listed["srv-qv4"]["tier"] in ("host", "gpu") and listed["srv-qv4"]["requests_served"] == 1
    # Over HTTP the safetensors bytes travel as base64 (the client does it).
    answer = upload_adapter("srv-mlp8", assets["src"] / "mlp8", server.http_url, "http")
    assert answer["uploaded"] and answer["target_modules"] == ["gate_proj", "up_proj", "down_proj"]
    done = generate(server.http_url, "http", input_ids=PROMPT, adapter_id="srv-mlp8", max_tokens=MAX_TOKENS,
                    ignore_eos=True)
    assert done.token_ids == hf_peft_greedy(assets["model"], assets["src"] / "mlp8", PROMPT, MAX_TOKENS)
    # Load latency per tier on the metrics port (refreshed every STATS_POLL_S by the model).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = server.metrics()
        if metric_value(text, "slora_adapter_stage_loads_total", stage="host_to_gpu") >= 2:
            break
        time.sleep(0.2)
    assert metric_value(text, "slora_adapter_stage_loads_total", stage="host_to_gpu") >= 2
    assert metric_value(text, "slora_adapter_load_seconds_total", stage="host_to_gpu") > 0
    assert metric_value(text, "slora_adapter_host_bytes", kind="budget") > 0


def _upload_body(name: str, path) -> dict:
    cfg, weights = files_of(path)
    return {"command": "upload_adapter", "adapter_id": name, "adapter_config": cfg.decode(),
            "adapter_weights": "base64:" + base64.b64encode(weights).decode()}


def test_upload_too_large_is_an_error_and_the_server_keeps_serving(assets, server):
    events = http_events(server, _upload_body("srv-big", assets["src"] / "big"))
    assert len(events) == 1 and "exceeds the limit" in events[0].get("error", ""), events
    assert not (server.adapters / "srv-big").exists()
    with pytest.raises(GenerationError, match="exceeds the limit"):
        upload_adapter("srv-big", assets["src"] / "big", server.grpc_url)
    done = generate(server.grpc_url, "grpc", input_ids=PROMPT, adapter_id="existing", max_tokens=MAX_TOKENS,
                    ignore_eos=True)
    assert done.token_ids == hf_peft_greedy(assets["model"], server.adapters / "existing", PROMPT, MAX_TOKENS)


def test_bad_upload_through_triton_is_a_clear_error(assets, server, tmp_path):
    bad = tmp_path / "dora"
    shutil.copytree(assets["src"] / "qv4", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(GenerationError, match="DoRA"):
        upload_adapter("srv-dora", bad, server.grpc_url)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    events = http_events(server, _upload_body("srv-corrupt", bad))
    assert len(events) == 1 and "cannot read adapter_model.safetensors" in events[0].get("error", ""), events
    with pytest.raises(GenerationError, match="already exists"):
        upload_adapter("existing", assets["src"] / "qv4", server.grpc_url)
    assert sorted(os.listdir(server.adapters)) == sorted(n for n in os.listdir(server.adapters)
                                                         if not n.startswith("."))
    assert not (server.adapters / "srv-dora").exists() and not (server.adapters / "srv-corrupt").exists()


def test_upload_with_a_traversal_name_writes_nothing(assets, server):
    parent = server.adapters.parent
    before = tree(parent)
    for name in ("../evil", "../../evil", "sub/evil", ".."):
        events = http_events(server, _upload_body(name, assets["src"] / "qv4"))
        assert len(events) == 1 and "invalid adapter name" in events[0].get("error", ""), (name, events)
    assert tree(parent) == before
    done = generate(server.grpc_url, "grpc", input_ids=PROMPT, max_tokens=2, ignore_eos=True)
    assert len(done.token_ids) == 2
