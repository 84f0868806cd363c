"""The server benchmark's clients (benchmarks/server_bench.py) against the real tritonserver:
every request of a trace finishes with all its tokens, over gRPC streaming and over HTTP, from
one process and from several."""

from __future__ import annotations

import pytest
from server_utils import TritonServer, write_model_repository
from tiny_model import build_tiny_model

from benchmarks.server_bench import replay_procs
from client.workload import WorkloadSpec, make_trace, summarize


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server_bench")
    model = build_tiny_model(root / "base", seed=0)
    repo = write_model_repository(root / "repo", {"model_dir": str(model), "adapter_dir": "none",
                                                   "dtype": "float32", "pool_pages": "4096"})
    with TritonServer(repo, root / "tritonserver.log") as srv:
        yield srv


@pytest.mark.parametrize("protocol,procs", [("grpc", 1), ("grpc", 3), ("http", 2)])
def test_every_request_finishes_with_its_tokens(server, protocol, procs):
    trace = make_trace(WorkloadSpec(n_adapters=0, rate=20, duration=1.0, input_range=(4, 12),
                                    output_range=(2, 24), vocab=200, seed=procs))
    address = server.grpc_url if protocol == "grpc" else server.http_port
    timings = replay_procs(protocol, address, trace, 120, procs)
    assert len(timings) == len(trace) > 5
    for request, timing in zip(trace, timings, strict=True):
        assert timing.error is None
        # ignore_eos: exactly max_tokens tokens, the first one before the last.
        assert timing.output_tokens == request.output_len
        assert 0 <= timing.first_token <= timing.latency
    report = summarize(timings)
    assert report.finished == len(trace) and report.errors == 0
