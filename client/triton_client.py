"""Request building and streaming for the `slora` model on tritonserver (gRPC and HTTP).

The pure parts (`build_inputs`, `build_http_body`, `parse_sse_lines`, `parse_sse_event`) need
only numpy; `stream_generate` talks to a server:

    from client.triton_client import stream_generate
    for text, token_ids, finish_reason in stream_generate(
            "localhost:8001", "grpc", text_input="Hi", chat=True, adapter_id="uppercase"):
        print(text, end="", flush=True)

Each yielded item is a `Chunk(text, token_ids, finish_reason)`; `finish_reason` is None on
all but the last one. A server-side error raises `GenerationError`.
"""

from __future__ import annotations

import base64
import http.client
import json
import queue
import threading
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

MODEL_NAME = "slora"
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}

# name -> (Triton datatype, numpy dtype, variable length ([-1]) or one element ([1]))
INPUTS: dict[str, tuple[str, Any, bool]] = {
    "text_input": ("BYTES", np.object_, False),
    "input_ids": ("INT32", np.int32, True),
    "adapter_id": ("BYTES", np.object_, False),
    "max_tokens": ("INT32", np.int32, False),
    "temperature": ("FP32", np.float32, False),
    "top_p": ("FP32", np.float32, False),
    "top_k": ("INT32", np.int32, False),
    "seed": ("INT64", np.int64, False),
    "stop": ("BYTES", np.object_, True),
    "ignore_eos": ("BOOL", np.bool_, False),
    "stream": ("BOOL", np.bool_, False),
    "chat": ("BOOL", np.bool_, False),
    "command": ("BYTES", np.object_, False),  # list/load/unload/upload_adapter
    "adapter_config": ("BYTES", np.object_, False),  # upload_adapter: adapter_config.json text
    "adapter_weights": ("BYTES", np.object_, False),  # upload_adapter: safetensors file bytes
}
OUTPUTS = ("text_output", "token_ids", "finish_reason")


class GenerationError(RuntimeError):
    """The server answered a request with an error (or the connection failed)."""


class Chunk(NamedTuple):
    text: str
    token_ids: list[int]
    finish_reason: str | None


def _to_bytes(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode("utf-8")


def build_inputs(**values: Any) -> list[tuple[str, str, np.ndarray]]:
    """Tensors for the given model inputs, as (name, datatype, array); None values are left out.

    Scalars become shape [1]; `input_ids` and `stop` accept a sequence (shape [n]); a single
    string for `stop` is one stop string. Unknown names raise ValueError. `text_input` and
    `input_ids` may not both be given.
    """
    unknown = sorted(set(values) - set(INPUTS))
    if unknown:
        raise ValueError(f"unknown model inputs {unknown}; known: {sorted(INPUTS)}")
    if values.get("text_input") is not None and values.get("input_ids") is not None:
        raise ValueError("give text_input or input_ids, not both")
    out = []
    for name, (datatype, np_dtype, variable) in INPUTS.items():
        value = values.get(name)
        if value is None:
            continue
        if variable:
            if isinstance(value, (str, bytes)):
                value = [value]
            items = list(value)
            if name == "input_ids" and not items:
                raise ValueError("input_ids is empty")
        else:
            if isinstance(value, (list, tuple, np.ndarray)):
                raise ValueError(f"{name} takes one value, got {value!r}")
            items = [value]
        if datatype == "BYTES":
            arr = np.array([_to_bytes(v) for v in items], dtype=np.object_)
        else:
            if datatype in ("INT32", "INT64"):
                info = np.iinfo(np_dtype)
                if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                           and info.min <= int(v) <= info.max for v in items):
                    raise ValueError(f"{name} must hold {datatype} integers: {value!r}")
            arr = np.asarray(items, dtype=np_dtype).reshape(len(items))
        out.append((name, datatype, arr))
    return out


def build_http_body(**values: Any) -> dict[str, Any]:
    """JSON body for `POST /v2/models/<m>/generate[_stream]` (keys = input names)."""
    body: dict[str, Any] = {}
    for name, datatype, arr in build_inputs(**values):
        if name == "adapter_weights":  # binary: JSON carries it as base64 (the model decodes it)
            items = ["base64:" + base64.b64encode(b).decode("ascii") for b in arr]
        elif datatype == "BYTES":
            items = [b.decode("utf-8") for b in arr]
        else:
            items = arr.tolist()
        body[name] = items if INPUTS[name][2] else items[0]
    return body


def build_grpc_inputs(batch_dim: bool = False, **values: Any) -> list:
    """`tritonclient.grpc.InferInput` objects for the given values (see build_inputs).

    `batch_dim=True` prepends a batch dimension of 1 (shape [1, n]), as a model with
    `max_batch_size > 0` expects; the HTTP generate endpoints add it themselves.
    """
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, datatype, arr in build_inputs(**values):
        if batch_dim:
            arr = arr.reshape(1, -1)
        inp = grpcclient.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def _decode_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, np.ndarray):
        return "".join(_decode_text(v) for v in value.reshape(-1).tolist())
    if isinstance(value, (list, tuple)):
        return "".join(_decode_text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _token_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return [int(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def chunk_from_outputs(outputs: dict[str, Any]) -> Chunk:
    """A Chunk from a response's outputs (numpy arrays from gRPC or JSON values from HTTP)."""
    reason = outputs.get("finish_reason")
    reason_text = _decode_text(reason) if reason is not None else ""
    return Chunk(
        _decode_text(outputs.get("text_output")),
        _token_list(outputs.get("token_ids")),
        reason_text or None,
    )


def parse_sse_lines(lines: Iterable[bytes | str]) -> Iterator[dict[str, Any]]:
    """Events of a server-sent-event stream: each `data:` payload parsed as JSON."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield json.loads("\n".join(data))
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield json.loads("\n".join(data))


def parse_sse_event(event: dict[str, Any]) -> Chunk:
    """A Chunk from one generate_stream event; an `error` event raises GenerationError."""
    if "error" in event:
        raise GenerationError(str(event["error"]))
    return chunk_from_outputs(event)


def _error_detail(body: str) -> str:
    """The message of an error body: JSON `{"error": ...}`, possibly as an SSE `data:` line."""
    text = body.strip()
    if text.startswith("data:"):
        text = text[5:].strip()
    try:
        return str(json.loads(text).get("error", body.strip()))
    except (ValueError, AttributeError):
        return body.strip()


def _http_base(url: str) -> str:
    return url.rstrip("/") if "://" in url else f"http://{url.rstrip('/')}"


def _stream_http(url: str, model: str, values: dict, stream: bool, timeout: float | None):
    endpoint = "generate_stream" if stream else "generate"
    body = json.dumps(build_http_body(**values)).encode("utf-8")
    req = urllib.request.Request(
        f"{_http_base(url)}/v2/models/{model}/{endpoint}", data=body, method="POST",
        headers={"Content-Type": "application/json",
                 "Accept": "text/event-stream" if stream else "application/json"},
    )
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        detail = _error_detail(e.read().decode("utf-8", errors="replace"))
        raise GenerationError(f"HTTP {e.code}: {detail}") from None
    except urllib.error.URLError as e:
        raise GenerationError(f"cannot reach {url}: {e.reason}") from None
    with resp:
        # A server that dies (or a stub that is restarted) cuts the stream: that is an error
        # for the caller too, never a silently short answer.
        try:
            if not stream:
                yield parse_sse_event(json.loads(resp.read()))
                return
            final = False
            for event in parse_sse_lines(resp):
                chunk = parse_sse_event(event)
                final = chunk.finish_reason is not None
                yield chunk
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise GenerationError(f"connection to {url} lost: {e!r}") from None
        if not final:
            raise GenerationError(f"the stream from {url} ended before its final response")


def _is_final(result) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


_BATCHING: dict[tuple[str, str], bool] = {}  # (url, model) -> max_batch_size > 0


def _model_batches(client, url: str, model: str) -> bool:
    """Whether the model's config has max_batch_size > 0 (asked once per url and model)."""
    from tritonclient.utils import InferenceServerException

    key = (url, model)
    if key not in _BATCHING:
        try:
            cfg = client.get_model_config(model, as_json=True)
        except InferenceServerException as e:
            raise GenerationError(f"{url}: {e.message()}") from None
        cfg = cfg.get("config", cfg)
        _BATCHING[key] = int(cfg.get("max_batch_size", 0) or 0) > 0
    return _BATCHING[key]


def _stream_grpc(url: str, model: str, values: dict, timeout: float | None,
                 batch_dim: bool | None):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    outputs = [grpcclient.InferRequestedOutput(n) for n in OUTPUTS]
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        if batch_dim is None:
            batch_dim = _model_batches(client, url, model)
        inputs = build_grpc_inputs(batch_dim=batch_dim, **values)
        try:
            client.start_stream(callback=lambda result, error: q.put((result, error)),
                                stream_timeout=timeout)
            client.async_stream_infer(model, inputs, outputs=outputs, request_id="1",
                                      enable_empty_final_response=True)
        except InferenceServerException as e:
            try:  # the stream's own error (e.g. connection refused) is in the callback's queue
                _, error = q.get(timeout=1.0)
            except queue.Empty:
                error = None
            detail = error.message() if isinstance(error, InferenceServerException) else e.message()
            raise GenerationError(f"{url}: {detail}") from None
        while True:
            try:
                result, error = q.get(timeout=timeout)
            except queue.Empty:
                raise GenerationError(f"no response within {timeout} s") from None
            if error is not None:
                msg = error.message() if isinstance(error, InferenceServerException) else error
                raise GenerationError(str(msg))
            final = _is_final(result)
            response = result.get_response()
            names = {o.name for o in response.outputs}
            if names:
                chunk = chunk_from_outputs({n: result.as_numpy(n) for n in names})
                if chunk.text or chunk.token_ids or chunk.finish_reason or not final:
                    yield chunk
            if final:
                return
    finally:
        try:
            client.stop_stream(cancel_requests=True)
        except Exception:  # noqa: BLE001 - closing a broken stream must not mask the error
            pass
        client.close()


def stream_generate(
    url: str | None = None,
    protocol: str = "grpc",
    model: str = MODEL_NAME,
    timeout: float | None = 600.0,
    batch_dim: bool | None = None,
    **inputs: Any,
) -> Iterator[Chunk]:
    """Send one request; yield `Chunk(text, token_ids, finish_reason)` as responses arrive.

    `inputs` are the model's inputs by name (text_input or input_ids, adapter_id, max_tokens,
    temperature, top_p, top_k, seed, stop, ignore_eos, stream, chat). With `stream=False` the
    server sends the whole completion in one response (HTTP uses `/generate` then).
    `batch_dim` (gRPC only): send inputs with a leading batch dimension of 1; None = ask the
    server whether the model batches (max_batch_size > 0), once per url and model.
    """
    if protocol not in DEFAULT_URLS:
        raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
    url = url or DEFAULT_URLS[protocol]
    if inputs.get("text_input") is None and inputs.get("input_ids") is None and not inputs.get("command"):
        raise ValueError("give text_input or input_ids")
    if protocol == "http":
        return _stream_http(url, model, inputs, inputs.get("stream", True) is not False, timeout)
    return _stream_grpc(url, model, inputs, timeout, batch_dim)


def upload_adapter(name: str, adapter_dir: str | Path, url: str | None = None, protocol: str = "grpc",
                   model: str = MODEL_NAME, timeout: float | None = 600.0) -> dict[str, Any]:
    """Send the PEFT adapter in `adapter_dir` (adapter_config.json + adapter_model.safetensors)
    to the server under `name`; returns the server's JSON answer (its `adapters list` entry)."""
    src = Path(adapter_dir)
    config_path, weights_path = src / "adapter_config.json", src / "adapter_model.safetensors"
    if not config_path.is_file():
        raise GenerationError(f"{src} has no adapter_config.json")
    if not weights_path.is_file():
        raise GenerationError(f"{src} has no adapter_model.safetensors (pickled .bin files are not accepted)")
    done = generate(url, protocol, model=model, timeout=timeout, stream=False, command="upload_adapter",
                    adapter_id=name, adapter_config=config_path.read_bytes(),
                    adapter_weights=weights_path.read_bytes())
    return json.loads(done.text)


class Completion(NamedTuple):
    text: str
    token_ids: list[int]
    finish_reason: str | None
    chunks: int


def generate(url: str | None = None, protocol: str = "grpc", **kwargs: Any) -> Completion:
    """Run `stream_generate` to the end and join the pieces."""
    texts: list[str] = []
    ids: list[int] = []
    reason = None
    n = 0
    for chunk in stream_generate(url, protocol, **kwargs):
        texts.append(chunk.text)
        ids.extend(chunk.token_ids)
        reason = chunk.finish_reason or reason
        n += 1
    return Completion("".join(texts), ids, reason, n)


def generate_many(
    requests: Sequence[dict[str, Any]], url: str | None = None, protocol: str = "grpc",
) -> list[Completion | BaseException]:
    """Run several requests concurrently (one thread each); results in order, errors returned."""
    results: list[Completion | BaseException | None] = [None] * len(requests)

    def run(i: int) -> None:
        try:
            results[i] = generate(url, protocol, **requests[i])
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results  # type: ignore[return-value]
