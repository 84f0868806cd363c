"""perf_analyzer (from the tritonclient wheel) drives the server in streaming gRPC mode."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import pytest
from server_utils import TritonServer, server_env, write_model_repository
from tiny_model import build_adapter, build_tiny_model

from client.perf_data import make_perf_data, write_perf_data
from slora_backend.triton_env import triton_env

ADAPTERS = ["r4", "r8", ""]  # "" = the base model


def _perf_analyzer() -> str:
    path = triton_env()["perf_analyzer"]
    if not Path(path).exists():
        pytest.skip(f"perf_analyzer not installed ({path}); run scripts/setup.sh")
    probe = subprocess.run([path, "--help"], capture_output=True, text=True,
                           env=server_env(), timeout=60)
    if "error while loading shared libraries" in probe.stderr:
        pytest.skip(f"perf_analyzer cannot start: {probe.stderr.strip()}")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("perf")
    model_dir = build_tiny_model(root / "base", seed=1)
    build_adapter(model_dir, root / "adapters" / "r4", rank=4, targets=["q_proj", "v_proj"],
                  alpha=8, seed=1)
    build_adapter(model_dir, root / "adapters" / "r8", rank=8,
                  targets=["o_proj", "gate_proj", "up_proj", "down_proj"], alpha=16, seed=2)
    repo = write_model_repository(root / "repo", {
        "model_dir": str(model_dir), "adapter_dir": str(root / "adapters"),
        "dtype": "float32", "pool_pages": "8192",
    })
    with TritonServer(repo, root / "tritonserver.log") as srv:
        yield srv


def vllm_style_data(count: int, output_len: int) -> dict:
    """Input data shaped like genai-perf's `--backend vllm` requests (Triton vllm_backend)."""
    sampling = json.dumps({"max_tokens": output_len, "ignore_eos": True})
    return {"data": [{"text_input": [f"request {i}: the quick brown fox jumps"],
                      "sampling_parameters": [sampling], "stream": [True],
                      "exclude_input_in_output": [True], "adapter_id": [ADAPTERS[i % 3]]}
                     for i in range(count)]}


@pytest.mark.parametrize("style", ["input_ids", "vllm"])
def test_perf_analyzer_streaming_grpc(server, tmp_path, style):
    binary = _perf_analyzer()
    if style == "vllm":
        doc = vllm_style_data(count=12, output_len=8)
    else:
        doc = make_perf_data(ADAPTERS, input_len=16, output_len=8, count=12, vocab_size=300,
                             min_token_id=1)
    data = write_perf_data(tmp_path / "input.json", doc)
    report = tmp_path / "report.csv"
    cmd = [
        binary, "-m", "slora", "-i", "grpc", "-u", server.grpc_url, "--streaming",
        "--input-data", str(data), "--concurrency-range", "4",
        "--measurement-interval", "1500", "--max-trials", "5", "--stability-percentage", "100",
        "-f", str(report),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=server_env(), timeout=240)
    out = proc.stdout + proc.stderr
    # An unstable measurement only fails the exit status; a failed request is reported as
    # "Thread [i] had error: ...".
    assert proc.returncode == 0 or "stable measurement" in out, out[-4000:]
    assert "had error" not in out and "Failed to" not in out, out[-4000:]

    m = re.search(r"Concurrency: 4, throughput: ([\d.]+) infer/sec", out)
    assert m and float(m.group(1)) > 0, out[-4000:]
    with open(report) as f:
        rows = list(csv.DictReader(f))
    assert rows and float(rows[0]["Inferences/Second"]) > 0, rows
    # Each request streams one response per token (8): responses outnumber requests.
    requests_s = float(re.search(r"\n\s+Throughput: ([\d.]+) infer/sec", out).group(1))
    responses_s = float(re.search(r"Response Throughput: ([\d.]+) infer/sec", out).group(1))
    assert responses_s > 4 * requests_s, out[-4000:]
    # Server-side statistics agree that every request succeeded.
    count = int(re.search(r"Inference count: (\d+)", out).group(1))
    success = int(re.search(r"Successful request count: (\d+)", out).group(1))
    assert count > 0 and success == count, out[-4000:]
