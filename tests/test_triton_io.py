"""Request parsing and response building of the Triton model, without a server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slora_backend import triton_io
from slora_backend.request import FinishReason, RequestError, RequestOutput


def tensors(**fields):
    """Inputs as the Python backend hands them over: numpy arrays with batch dimension 1."""
    arrays = {}
    for name, value in fields.items():
        values = value if isinstance(value, list) else [value]
        if values and isinstance(values[0], str):
            values = [v.encode() for v in values]
            arrays[name] = np.array([values], dtype=np.object_)
        else:
            arrays[name] = np.array([values])
    return arrays.get


def parse(params: dict | None = None, **fields):
    return triton_io.parse_request(tensors(**fields), json.dumps(params or {}))


def test_defaults():
    r = parse(text_input="hello")
    assert r.prompt == "hello" and r.prompt_ids is None and r.adapter is None
    assert r.stream is True and r.chat is False
    assert r.params.max_tokens == 128 and r.params.temperature == 0.0 and r.params.stop == []


def test_tensor_inputs():
    r = parse(input_ids=[3, 4, 5], adapter_id="a", max_tokens=7, temperature=0.5, top_p=0.9,
              top_k=4, seed=11, stop=["x", "yz"], ignore_eos=True, stream=False, chat=False)
    assert r.prompt is None and r.prompt_ids == [3, 4, 5] and r.adapter == "a"
    p = r.params
    assert (p.max_tokens, p.top_k, p.seed, p.stop, p.ignore_eos) == (7, 4, 11, ["x", "yz"], True)
    assert p.temperature == pytest.approx(0.5) and p.top_p == pytest.approx(0.9)
    assert r.stream is False
    assert all(isinstance(t, int) for t in r.prompt_ids)


def test_request_parameters_as_from_generate_endpoint():
    r = parse({"max_tokens": 5, "adapter_id": "b", "stream": "false", "chat": True,
               "stop": "END", "triton_enable_empty_final_response": True}, text_input="hi")
    assert r.params.max_tokens == 5 and r.adapter == "b" and r.stream is False and r.chat
    assert r.params.stop == ["END"]


def test_vllm_sampling_parameters_and_lora_name_alias():
    sp = json.dumps({"max_tokens": "9", "min_tokens": 2, "temperature": 0.7, "top_p": 0.5,
                     "top_k": 3, "seed": 1, "stop": ["\n"], "ignore_eos": "true",
                     "lora_name": "up", "n": 1, "presence_penalty": 0.0})
    r = parse(text_input="q", sampling_parameters=sp, exclude_input_in_output=True)
    p = r.params
    assert (p.max_tokens, p.min_tokens, p.top_k, p.seed, p.stop, p.ignore_eos) == (
        9, 2, 3, 1, ["\n"], True)
    assert r.adapter == "up" and r.exclude_input_in_output


def test_precedence_tensor_over_parameter_over_sampling_parameters():
    sp = json.dumps({"max_tokens": 1, "temperature": 0.1, "top_k": 2})
    r = parse({"max_tokens": 2, "temperature": 0.2}, text_input="q", sampling_parameters=sp,
              max_tokens=3)
    assert r.params.max_tokens == 3
    assert r.params.temperature == pytest.approx(0.2)
    assert r.params.top_k == 2


def test_sampling_parameters_as_request_parameter():
    r = parse({"sampling_parameters": json.dumps({"max_tokens": 4})}, text_input="q")
    assert r.params.max_tokens == 4


def test_empty_adapter_is_base_model():
    assert parse(text_input="q", adapter_id="").adapter is None


def test_submit_kwargs_match_engine_submit():
    r = parse(text_input="q", adapter_id="a", chat=True)
    assert set(r.submit_kwargs()) == {"prompt", "prompt_ids", "adapter", "params", "chat"}


@pytest.mark.parametrize("params, fields, message", [
    ({}, {}, "empty prompt"),
    ({}, {"text_input": ""}, "empty prompt"),
    ({}, {"text_input": "a", "input_ids": [1]}, "not both"),
    ({}, {"text_input": "a", "max_tokens": 1.5}, "integer"),
    ({"max_tokens": "lots"}, {"text_input": "a"}, "integer"),
    ({"temperature": "hot"}, {"text_input": "a"}, "number"),
    ({"temperature": float("nan")}, {"text_input": "a"}, "finite"),
    ({"stream": "maybe"}, {"text_input": "a"}, "boolean"),
    ({"max_token": 3}, {"text_input": "a"}, "unknown request parameter"),
    ({"n": 2}, {"text_input": "a"}, "not supported"),
    ({"adapter_id": "x", "lora_name": "y"}, {"text_input": "a"}, "disagree"),
    ({}, {"text_input": "a", "sampling_parameters": "[1]"}, "JSON object"),
    ({}, {"text_input": "a", "sampling_parameters": "{"}, "not valid JSON"),
    ({}, {"text_input": "a", "sampling_parameters": '{"bogus": 1}'}, "unknown sampling"),
])
def test_invalid_requests(params, fields, message):
    with pytest.raises(RequestError, match=message):
        parse(params, **fields)


def test_invalid_utf8_and_batch_of_two():
    with pytest.raises(RequestError, match="UTF-8"):
        triton_io.parse_request({"text_input": np.array([[b"\xff\xfe"]], dtype=np.object_)}.get,
                                "{}")
    batch2 = {"text_input": np.array([[b"a"], [b"b"]], dtype=np.object_)}
    with pytest.raises(RequestError, match="batch size 2"):
        triton_io.parse_request(batch2.get, "{}")


def test_inputs_without_batch_dimension_also_parse():
    arrays = {"text_input": np.array([b"hi"], dtype=np.object_),
              "input_ids": None, "max_tokens": np.array([4], dtype=np.int32)}
    r = triton_io.parse_request(arrays.get, None)
    assert r.prompt == "hi" and r.params.max_tokens == 4


def test_output_arrays():
    out = triton_io.output_arrays("héllo", [1, 2], FinishReason.LENGTH)
    assert out["text_output"].shape == (1, 1) and out["text_output"][0, 0] == "héllo".encode()
    assert out["token_ids"].dtype == np.int32 and out["token_ids"].tolist() == [[1, 2]]
    assert out["finish_reason"][0, 0] == b"length"
    empty = triton_io.output_arrays("", [])
    assert empty["token_ids"].shape == (1, 0) and "finish_reason" not in empty


def test_completion_accumulates_pieces():
    c = triton_io.Completion()
    c.add(RequestOutput(1, "ab", [5, 6]))
    c.add(RequestOutput(1, "c", [7], finished=True, finish_reason=FinishReason.STOP))
    arrays = c.arrays("stop")
    assert arrays["text_output"][0, 0] == b"abc" and arrays["token_ids"].tolist() == [[5, 6, 7]]


def test_coalesce_merges_each_requests_queued_pieces():
    a, b = object(), object()

    def piece(rid, text, ids, **kw):
        return RequestOutput(request_id=rid, text=text, token_ids=ids, **kw)

    items = [(a, piece(1, "he", [5])), (b, piece(2, "x", [7])), (a, piece(1, "llo", [6, 9], generated_tokens=3)),
             (b, piece(2, "y", [8], finished=True, finish_reason=FinishReason.LENGTH, generated_tokens=2)),
             (a, piece(1, "!", [4], finished=True, finish_reason=FinishReason.STOP, generated_tokens=4))]
    got = triton_io.coalesce_outputs(items)
    assert [key for key, _ in got] == [a, b]  # one response per request, in first-seen order
    first, second = got[0][1], got[1][1]
    assert (first.text, first.token_ids, first.finished, first.finish_reason, first.generated_tokens) == (
        "hello!", [5, 6, 9, 4], True, FinishReason.STOP, 4)
    assert (second.text, second.token_ids, second.finished, second.finish_reason) == (
        "xy", [7, 8], True, FinishReason.LENGTH)
    # Nothing to merge: the pieces come back as they were.
    single = [(a, piece(1, "a", [1])), (b, piece(2, "b", [2]))]
    assert triton_io.coalesce_outputs(single) == single


def test_coalesce_keeps_finished_and_error_pieces_apart():
    a = object()
    items = [(a, RequestOutput(request_id=1, text="ok", token_ids=[3])),
             (a, RequestOutput(request_id=1, text="", token_ids=[], finished=True, error="engine failed"))]
    got = triton_io.coalesce_outputs(items)
    # The tokens before an error are still sent, then the error on its own.
    assert [(o.token_ids, o.error) for _, o in got] == [([3], None), ([], "engine failed")]
    done = RequestOutput(request_id=1, text="z", token_ids=[2], finished=True)
    late = RequestOutput(request_id=1, text="?", token_ids=[9])
    assert [o for _, o in triton_io.coalesce_outputs([(a, done), (a, late)])] == [done, late]


def test_adapter_labels_are_bounded():
    labels = triton_io.AdapterLabels(limit=2)
    assert labels(None) == labels("") == triton_io.BASE_LABEL
    assert labels("a") == "a" and labels("b") == "b"
    assert labels("c") == triton_io.OTHER_LABEL and labels("a") == "a"
    assert triton_io.AdapterLabels()("../x y") == triton_io.OTHER_LABEL


def test_engine_parameters(tmp_path):
    config = {"parameters": {
        "model_dir": {"string_value": "models/m"},
        "pool_pages": {"string_value": "64"},
        "EXECUTION_ENV_PATH": {"string_value": "/env"},
    }}
    params = triton_io.engine_parameters(config, tmp_path, environ={})
    assert params["model_dir"] == str(tmp_path / "models" / "m")
    assert params["adapter_dir"] == str(tmp_path / "demo_adapters")
    assert params["pool_pages"] == "64" and "EXECUTION_ENV_PATH" not in params
    env = {"SLORA_MODEL_DIR": "/abs/model", "SLORA_ADAPTER_DIR": "rel"}
    params = triton_io.engine_parameters(config, tmp_path, environ=env)
    assert params["model_dir"] == "/abs/model" and params["adapter_dir"] == str(tmp_path / "rel")
    params = triton_io.engine_parameters({"parameters": {"adapter_dir": {"string_value": ""}}},
                                         tmp_path, environ={})
    assert "adapter_dir" not in params


def test_engine_parameters_build_an_engine_config(tmp_path):
    from slora_backend.config import EngineConfig

    text = Path(__file__).parent.parent / "model_repository" / "slora" / "config.pbtxt"
    params = {}
    for line in text.read_text().splitlines():
        if line.startswith("parameters:"):
            key = line.split('key: "')[1].split('"')[0]
            value = line.split('string_value: "')[1].split('"')[0]
            params[key] = {"string_value": value}
    config = EngineConfig.from_parameters(
        triton_io.engine_parameters({"parameters": params}, tmp_path, environ={}))
    assert config.model_dir == str(tmp_path / "models" / "SmolLM2-135M-Instruct")
    assert config.max_rank == 64 and config.pool_pages == 0
