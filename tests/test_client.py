"""Unit tests for the client's pure parts: request building, SSE parsing, perf_analyzer data.

No server needed (the end-to-end tests against tritonserver live elsewhere).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from client import cli
from client.perf_data import make_perf_data, parse_adapters, write_perf_data
from client.triton_client import (
    INPUTS,
    Chunk,
    GenerationError,
    build_http_body,
    build_inputs,
    chunk_from_outputs,
    parse_sse_event,
    parse_sse_lines,
    stream_generate,
)

# -- request building ---------------------------------------------------------------------


def test_input_names_and_types_match_the_model_interface():
    expected = {
        "text_input": "BYTES", "input_ids": "INT32", "adapter_id": "BYTES",
        "max_tokens": "INT32", "temperature": "FP32", "top_p": "FP32", "top_k": "INT32",
        "seed": "INT64", "stop": "BYTES", "ignore_eos": "BOOL", "stream": "BOOL",
        "chat": "BOOL", "command": "BYTES", "adapter_config": "BYTES", "adapter_weights": "BYTES",
    }
    assert {k: v[0] for k, v in INPUTS.items()} == expected


def test_build_inputs_all_fields():
    got = build_inputs(
        text_input="Hi é", adapter_id="upper", max_tokens=7, temperature=0.5, top_p=0.9,
        top_k=40, seed=2**40, stop=["a", "b c"], ignore_eos=True, stream=False, chat=True,
    )
    by = {name: (dt, arr) for name, dt, arr in got}
    assert set(by) == set(INPUTS) - {"input_ids", "command", "adapter_config", "adapter_weights"}
    dt, arr = by["text_input"]
    assert dt == "BYTES" and arr.dtype == np.object_ and arr.tolist() == ["Hi é".encode()]
    assert by["adapter_id"][1].tolist() == [b"upper"]
    assert by["max_tokens"][1].dtype == np.int32 and by["max_tokens"][1].tolist() == [7]
    assert by["temperature"][1].dtype == np.float32 and by["temperature"][1].shape == (1,)
    assert by["top_k"][1].tolist() == [40]
    assert by["seed"][1].dtype == np.int64 and by["seed"][1].tolist() == [2**40]
    assert by["stop"][1].tolist() == [b"a", b"b c"]
    assert by["ignore_eos"][1].dtype == np.bool_ and by["ignore_eos"][1].tolist() == [True]
    assert by["stream"][1].tolist() == [False]
    assert by["chat"][1].tolist() == [True]


def test_build_inputs_leaves_out_none_and_keeps_order():
    got = build_inputs(input_ids=[1, 2, 3], max_tokens=4, adapter_id=None, stop=None)
    assert [n for n, _, _ in got] == ["input_ids", "max_tokens"]
    ids = got[0][2]
    assert ids.dtype == np.int32 and ids.shape == (3,) and ids.tolist() == [1, 2, 3]


def test_build_inputs_single_stop_string_and_numpy_ids():
    got = dict((n, a) for n, _, a in build_inputs(input_ids=np.arange(5), stop="END"))
    assert got["stop"].tolist() == [b"END"]
    assert got["input_ids"].dtype == np.int32 and got["input_ids"].tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bogus": 1},
        {"text_input": "a", "input_ids": [1]},
        {"input_ids": []},
        {"max_tokens": [1, 2]},
        {"input_ids": [2**40]},
        {"input_ids": [1.5]},
    ],
)
def test_build_inputs_rejects(kwargs):
    with pytest.raises(ValueError):
        build_inputs(**kwargs)


def test_http_body_is_json_with_scalars_and_lists():
    body = build_http_body(text_input="Hi", adapter_id="a", max_tokens=3, temperature=0.0,
                           stop=["x"], ignore_eos=False, chat=True)
    assert body == {"text_input": "Hi", "adapter_id": "a", "max_tokens": 3,
                    "temperature": 0.0, "stop": ["x"], "ignore_eos": False, "chat": True}
    assert json.loads(json.dumps(body)) == body
    body = build_http_body(input_ids=[5, 6], seed=9)
    assert body == {"input_ids": [5, 6], "seed": 9}


def test_build_grpc_inputs():
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from client.triton_client import build_grpc_inputs

    inputs = build_grpc_inputs(text_input="Hi", input_ids=None, max_tokens=2, stop=["a", "b"])
    assert all(isinstance(i, grpcclient.InferInput) for i in inputs)
    assert [(i.name(), i.datatype(), i.shape()) for i in inputs] == [
        ("text_input", "BYTES", [1]), ("max_tokens", "INT32", [1]), ("stop", "BYTES", [2]),
    ]
    # a model with max_batch_size > 0 takes a leading batch dimension over gRPC
    inputs = build_grpc_inputs(batch_dim=True, input_ids=[4, 5, 6], chat=True)
    assert [(i.name(), i.shape()) for i in inputs] == [("input_ids", [1, 3]), ("chat", [1, 1])]


# -- responses ------------------------------------------------------------------------------


def test_chunk_from_grpc_style_outputs():
    c = chunk_from_outputs({
        "text_output": np.array([b"Hel", b"lo"], dtype=np.object_),
        "token_ids": np.array([1, 2], dtype=np.int32),
    })
    assert c == Chunk("Hello", [1, 2], None)
    c = chunk_from_outputs({"text_output": np.array([b""], dtype=np.object_),
                            "token_ids": np.zeros(0, np.int32),
                            "finish_reason": np.array([b"length"], dtype=np.object_)})
    assert c == Chunk("", [], "length")


def test_chunk_from_json_outputs():
    assert chunk_from_outputs({"text_output": "é", "token_ids": [7], "finish_reason": "stop"}) \
        == Chunk("é", [7], "stop")
    assert chunk_from_outputs({"text_output": ["a", "b"], "token_ids": 3}) == Chunk("ab", [3], None)


def test_parse_sse_lines():
    raw = (
        b'data: {"model_name":"slora","text_output":"Hel","token_ids":[1]}\n\n'
        b": a comment\n\n"
        b'data: {"text_output":"lo","token_ids":[2,3],"finish_reason":"length"}\r\n\r\n'
        b'data: {"text_output":"!",\n'
        b'data: "token_ids":[]}\n'
    )
    events = list(parse_sse_lines(raw.splitlines(keepends=True)))
    assert [parse_sse_event(e) for e in events] == [
        Chunk("Hel", [1], None), Chunk("lo", [2, 3], "length"), Chunk("!", [], None),
    ]


def test_sse_error_event_raises():
    (event,) = parse_sse_lines(['data: {"error":"unknown adapter \'x\'"}\n', "\n"])
    with pytest.raises(GenerationError, match="unknown adapter"):
        parse_sse_event(event)


def test_stream_generate_argument_checks():
    with pytest.raises(ValueError, match="protocol"):
        stream_generate("x:1", "udp", text_input="hi")
    with pytest.raises(ValueError, match="text_input or input_ids"):
        stream_generate("x:1", "http", max_tokens=3)


def test_unreachable_server_is_a_generation_error():
    # port 9 (discard) on loopback: nothing listens there in the test environment
    with pytest.raises(GenerationError):
        list(stream_generate("127.0.0.1:9", "http", text_input="hi", timeout=5))


# -- perf_analyzer data ---------------------------------------------------------------------


def test_perf_data_shape_and_lengths():
    doc = make_perf_data(["a", "b", ""], input_len=32, output_len=16, count=7, seed=3)
    assert list(doc) == ["data"] and len(doc["data"]) == 7
    for i, entry in enumerate(doc["data"]):
        assert set(entry) == {"input_ids", "max_tokens", "ignore_eos", "adapter_id"}
        ids = entry["input_ids"]
        assert ids["shape"] == [32] and len(ids["content"]) == 32
        assert all(isinstance(t, int) and 32 <= t < 49152 for t in ids["content"])
        assert entry["max_tokens"] == [16]
        assert entry["ignore_eos"] == [True]
        assert entry["adapter_id"] == [["a", "b", ""][i % 3]]


def test_perf_data_is_deterministic_and_seeded():
    a = make_perf_data(["x"], 8, 4, 5, seed=1)
    assert a == make_perf_data(["x"], 8, 4, 5, seed=1)
    assert a != make_perf_data(["x"], 8, 4, 5, seed=2)


def test_perf_data_vocab_bounds_and_stream_flag():
    doc = make_perf_data([], 50, 2, 3, vocab_size=40, min_token_id=10, stream=True)
    for entry in doc["data"]:
        assert all(10 <= t < 40 for t in entry["input_ids"]["content"])
        assert entry["stream"] == [True] and entry["adapter_id"] == [""]


@pytest.mark.parametrize("args", [(0, 1, 1), (1, 0, 1), (1, 1, 0)])
def test_perf_data_rejects_bad_sizes(args):
    with pytest.raises(ValueError):
        make_perf_data(["a"], *args)


def test_parse_adapters():
    assert parse_adapters("a,b") == ["a", "b"]
    assert parse_adapters(",a, base ,b") == ["", "a", "", "b"]
    assert parse_adapters("") == [""]


def test_perf_data_cli_writes_json(tmp_path):
    out = tmp_path / "sub" / "in.json"
    rc = cli.main(["perf-data", "--adapters", "u,base,r4", "--input-len", "12",
                   "--output-len", "5", "--count", "6", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert len(doc["data"]) == 6
    assert [e["adapter_id"][0] for e in doc["data"]] == ["u", "", "r4", "u", "", "r4"]
    assert {len(e["input_ids"]["content"]) for e in doc["data"]} == {12}
    assert {e["max_tokens"][0] for e in doc["data"]} == {5}


def test_write_perf_data_roundtrip(tmp_path):
    doc = make_perf_data(["a"], 4, 2, 2)
    path = write_perf_data(tmp_path / "x.json", doc)
    assert json.loads(path.read_text()) == doc


# -- command line ---------------------------------------------------------------------------


def test_generate_parser_defaults_and_flags():
    args = cli.build_parser().parse_args(["generate", "--prompt", "hi"])
    assert (args.protocol, args.url, args.model, args.max_tokens) == ("grpc", None, "slora", 128)
    assert not args.chat and not args.no_stream and args.adapter is None
    args = cli.build_parser().parse_args(
        ["generate", "--input-ids", "1,2 3", "-a", "up", "--chat", "-i", "http", "--no-stream",
         "--stop", "x", "--stop", "y", "-t", "0.7", "--top-k", "5", "--seed", "1"])
    assert args.input_ids == [1, 2, 3] and args.adapter == "up" and args.protocol == "http"
    assert args.stop == ["x", "y"] and args.temperature == 0.7 and args.no_stream


def test_generate_requires_a_prompt():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate"])


def test_generate_cli_streams_to_stdout(monkeypatch, capsys):
    seen = {}

    def fake_stream(url, protocol, **kwargs):
        seen.update(kwargs, url=url, protocol=protocol)
        yield Chunk("Hel", [1], None)
        yield Chunk("lo", [2], "stop")

    monkeypatch.setattr(cli, "stream_generate", fake_stream)
    rc = cli.main(["generate", "-p", "hi", "-a", "up", "--chat", "-n", "5", "-q"])
    assert rc == 0
    assert capsys.readouterr().out == "Hello\n"
    assert seen["text_input"] == "hi" and seen["adapter_id"] == "up" and seen["chat"] is True
    assert seen["max_tokens"] == 5 and seen["stream"] is None and seen["model"] == "slora"


def test_generate_cli_reports_errors(monkeypatch, capsys):
    def failing(url, protocol, **kwargs):
        raise GenerationError("unknown adapter 'nope'")
        yield  # pragma: no cover

    monkeypatch.setattr(cli, "stream_generate", failing)
    assert cli.main(["generate", "-p", "hi", "-a", "nope"]) == 1
    assert capsys.readouterr().out == ""
