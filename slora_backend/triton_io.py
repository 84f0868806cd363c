"""Triton request parsing and response building, free of `triton_python_backend_utils`.

`model_repository/slora/1/model.py` hands each request's input tensors and its request
parameters (JSON) to `parse_request`, and builds responses from `output_arrays`. Keeping this
here means the whole contract of issue 3 (names, types, defaults, vllm_backend aliases and
the errors a client sees) is unit-tested without a server.

Precedence when a field is given several ways: input tensor > request parameter (the keys of
a `generate`/`generate_stream` JSON body that are not inputs) > `sampling_parameters` JSON >
default.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .request import FinishReason, RequestError, RequestOutput, SamplingParams

# Inputs of config.pbtxt (all optional); the tensor of each is (batch=1, dims...).
TEXT_INPUTS = ("text_input", "adapter_id", "sampling_parameters")
INT_FIELDS = ("max_tokens", "min_tokens", "top_k", "seed")
FLOAT_FIELDS = ("temperature", "top_p")
BOOL_FIELDS = ("ignore_eos", "stream", "chat", "exclude_input_in_output")
INPUT_NAMES = (
    "text_input", "input_ids", "adapter_id", "max_tokens", "temperature", "top_p", "top_k",
    "seed", "stop", "ignore_eos", "stream", "chat", "sampling_parameters",
    "exclude_input_in_output", "command",
)
# `command`: generate (default) or an adapter-lifecycle operation answered with JSON.
# `stats` answers the engine's counters (pool pages, queue, preemptions): health probes and soaks.
COMMANDS = ("generate", "list_adapters", "load_adapter", "unload_adapter", "upload_adapter", "stats")
# Inputs of command=upload_adapter only: adapter_config.json text and adapter_model.safetensors
# bytes (raw over gRPC; "base64:" + base64 text where the transport is JSON, as HTTP generate).
UPLOAD_INPUTS = ("adapter_config", "adapter_weights")
BASE64_PREFIX = b"base64:"
# Request-parameter / sampling_parameters keys we read (besides INPUT_NAMES).
EXTRA_KEYS = ("min_tokens", "lora_name")
# vLLM sampling keys we do not implement: accepted only at their neutral value, so a vllm_backend
# client that spells out defaults still works, and one that relies on them gets an error.
VLLM_NEUTRAL = {
    "n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0,
    "repetition_penalty": 1, "use_beam_search": False, "length_penalty": 1,
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "logprobs": None,
    "prompt_logprobs": None, "detokenize": True,
}
# Request parameters that Triton or its clients add on their own.
RESERVED_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
                       "binary_data_output", "headers")
# config.pbtxt parameters read by the Python backend itself, not by the engine.
BACKEND_PARAMETERS = ("EXECUTION_ENV_PATH", "FORCE_CPU_ONLY_INPUT_TENSORS")

DEFAULT_MODEL_DIR = "models/SmolLM2-135M-Instruct"
DEFAULT_ADAPTER_DIR = "demo_adapters"


@dataclass
class ParsedRequest:
    prompt: str | None
    prompt_ids: list[int] | None
    adapter: str | None
    params: SamplingParams
    stream: bool = True
    chat: bool = False
    exclude_input_in_output: bool = True

    def submit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `Engine.submit` (minus on_output)."""
        return {"prompt": self.prompt, "prompt_ids": self.prompt_ids, "adapter": self.adapter,
                "params": self.params, "chat": self.chat}


GetInput = Callable[[str], "np.ndarray | None"]


def parse_request(get_input: GetInput, parameters_json: str | None) -> ParsedRequest:
    """Turn one request's inputs into engine arguments; raises RequestError with a client message.

    `get_input(name)` returns the input tensor as a numpy array (None when absent);
    `parameters_json` is `request.parameters()`.
    """
    values: dict[str, Any] = {}
    sampling = _sampling_parameters(get_input, parameters_json)
    values.update(_check_keys(sampling, "sampling_parameters"))
    values.update(_check_keys(_request_parameters(parameters_json), "request parameter"))
    for name in INPUT_NAMES:
        if name == "sampling_parameters":
            continue
        arr = get_input(name)
        if arr is not None:
            values[name] = _from_tensor(name, arr)

    adapter = values.get("adapter_id")
    alias = values.get("lora_name")
    adapter = _as_str("adapter_id", adapter) if adapter is not None else None
    alias = _as_str("lora_name", alias) if alias is not None else None
    if adapter and alias and adapter != alias:
        raise RequestError(f"adapter_id {adapter!r} and lora_name {alias!r} disagree")
    adapter = adapter or alias or None

    prompt = values.get("text_input")
    prompt = _as_str("text_input", prompt) if prompt is not None else None
    ids = values.get("input_ids")
    prompt_ids = _as_int_list("input_ids", ids) if ids is not None else None
    if prompt_ids is not None and len(prompt_ids) == 0:
        prompt_ids = None
    if prompt and prompt_ids:
        raise RequestError("give either text_input or input_ids, not both")
    if not prompt and not prompt_ids:
        raise RequestError("empty prompt: give text_input or input_ids")

    params = SamplingParams()
    for name in INT_FIELDS:
        if values.get(name) is not None:
            setattr(params, name, _as_int(name, values[name]))
    for name in FLOAT_FIELDS:
        if values.get(name) is not None:
            setattr(params, name, _as_float(name, values[name]))
    if values.get("ignore_eos") is not None:
        params.ignore_eos = _as_bool("ignore_eos", values["ignore_eos"])
    if values.get("stop") is not None:
        params.stop = _as_str_list("stop", values["stop"])

    def flag(name: str, default: bool) -> bool:
        v = values.get(name)
        return default if v is None else _as_bool(name, v)

    return ParsedRequest(
        prompt=prompt or None,
        prompt_ids=prompt_ids,
        adapter=adapter,
        params=params,
        stream=flag("stream", True),
        chat=flag("chat", False),
        exclude_input_in_output=flag("exclude_input_in_output", True),
    )


def parse_command(get_input: GetInput, parameters_json: str | None) -> tuple[str, str | None]:
    """(command, adapter_id) of a request; command is one of COMMANDS."""
    arr = get_input("command")
    value = _from_tensor("command", arr) if arr is not None else _request_parameters(parameters_json).get("command")
    command = "generate" if value is None else _as_str("command", value).strip() or "generate"
    if command not in COMMANDS:
        raise RequestError(f"unknown command {command!r}; known: {', '.join(COMMANDS)}")
    if command != "upload_adapter":
        extra = [n for n in UPLOAD_INPUTS if get_input(n) is not None]
        if extra:
            raise RequestError(f"inputs {', '.join(extra)} belong to command=upload_adapter only")
    if command in ("generate", "list_adapters", "stats"):
        return command, None
    arr = get_input("adapter_id")
    name = _from_tensor("adapter_id", arr) if arr is not None else _request_parameters(parameters_json).get(
        "adapter_id")
    if not name:
        raise RequestError(f"{command} needs adapter_id")
    return command, _as_str("adapter_id", name)


def parse_upload(get_input: GetInput) -> tuple[bytes, bytes]:
    """(adapter_config.json bytes, adapter_model.safetensors bytes) of an upload_adapter request."""
    out = []
    for name in UPLOAD_INPUTS:
        arr = get_input(name)
        if arr is None:
            raise RequestError(f"upload_adapter needs the input {name}")
        value = _from_tensor(name, arr)
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, (bytes, np.bytes_)):
            raise RequestError(f"{name} must be bytes, got {type(value).__name__}")
        value = bytes(value)
        if value.startswith(BASE64_PREFIX):
            # Unambiguous: a safetensors file starts with its header length as 8 little-endian
            # bytes, which "base64:" would make about 10^18.
            try:
                value = base64.b64decode(value[len(BASE64_PREFIX):], validate=True)
            except (binascii.Error, ValueError) as e:
                raise RequestError(f"{name} is not valid base64: {e}") from None
        out.append(value)
    return out[0], out[1]


def _sampling_parameters(get_input: GetInput, parameters_json: str | None) -> dict:
    arr = get_input("sampling_parameters")
    if arr is not None:
        raw = _from_tensor("sampling_parameters", arr)
    else:  # also accepted as a request parameter (a JSON string or an object)
        raw = _request_parameters(parameters_json).get("sampling_parameters")
    if raw is None or raw == "":
        return {}
    if isinstance(raw, dict):
        return raw
    try:
        obj = json.loads(_as_str("sampling_parameters", raw))
    except json.JSONDecodeError as e:
        raise RequestError(f"sampling_parameters is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError("sampling_parameters must be a JSON object")
    return obj


def _request_parameters(parameters_json: str | None) -> dict:
    if not parameters_json:
        return {}
    try:
        obj = json.loads(parameters_json)
    except json.JSONDecodeError as e:
        raise RequestError(f"request parameters are not valid JSON: {e}") from None
    return obj if isinstance(obj, dict) else {}


def _check_keys(values: dict, where: str) -> dict:
    """Known keys pass, vLLM-only keys must hold their neutral value, the rest is an error."""
    out = {}
    for key, value in values.items():
        if key == "sampling_parameters" or key.startswith("triton_") or key in RESERVED_PARAMETERS:
            continue
        if key in INPUT_NAMES or key in EXTRA_KEYS:
            out[key] = value
        elif key in VLLM_NEUTRAL:
            neutral = VLLM_NEUTRAL[key]
            if not _same(value, neutral):
                raise RequestError(f"{where} {key}={value!r} is not supported (only {neutral!r})")
        else:
            known = sorted(set(INPUT_NAMES) | set(EXTRA_KEYS))
            raise RequestError(f"unknown {where} {key!r}; known: {', '.join(known)}")
    return out


def _same(value: Any, neutral: Any) -> bool:
    if neutral is None or isinstance(neutral, bool):
        if isinstance(value, str):
            value = {"true": True, "false": False, "null": None, "none": None}.get(
                value.strip().lower(), value)
        return value == neutral
    try:
        return float(value) == float(neutral)
    except (TypeError, ValueError):
        return False


def _from_tensor(name: str, arr: np.ndarray) -> Any:
    """Strip the batch dimension (Triton batches requests; a request holds one sequence)."""
    arr = np.asarray(arr)
    if arr.ndim >= 2:
        if arr.shape[0] != 1:
            raise RequestError(f"input {name} has batch size {arr.shape[0]}; send one sequence "
                               "per request (batch size 1)")
        arr = arr[0]
    flat = arr.reshape(-1)
    if name in ("input_ids", "stop"):
        return list(flat)
    if flat.size != 1:
        raise RequestError(f"input {name} must hold one value, got shape {list(arr.shape)}")
    return flat[0]


def _as_str(name: str, v: Any) -> str:
    if isinstance(v, (bytes, np.bytes_)):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{name} is not valid UTF-8") from None
    if isinstance(v, str):
        return v
    raise RequestError(f"{name} must be a string, got {type(v).__name__}")


def _as_str_list(name: str, v: Any) -> list[str]:
    if isinstance(v, (str, bytes, np.bytes_)):
        v = [v]
    if not isinstance(v, (list, tuple, np.ndarray)):
        raise RequestError(f"{name} must be a string or a list of strings")
    return [_as_str(name, s) for s in v]


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise RequestError(f"{name} must be an integer, got a boolean")
    if isinstance(v, (bytes, np.bytes_)):
        v = _as_str(name, v)
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v) or v != int(v):
            raise RequestError(f"{name} must be an integer, got {v!r}")
        return int(v)
    try:
        return int(v.strip()) if isinstance(v, str) else int(v)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be an integer, got {v!r}") from None


def _as_int_list(name: str, v: Any) -> list[int]:
    if not isinstance(v, (list, tuple, np.ndarray)):
        v = [v]
    return [_as_int(name, x) for x in v]


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, (bool, np.bool_)):
        raise RequestError(f"{name} must be a number, got a boolean")
    if isinstance(v, (bytes, np.bytes_)):
        v = _as_str(name, v)
    try:
        out = float(v.strip()) if isinstance(v, str) else float(v)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(out):
        raise RequestError(f"{name} must be finite, got {v!r}")
    return out


def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (bytes, np.bytes_)):
        v = _as_str(name, v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "1", "yes"):
            return True
        if s in ("false", "0", "no"):
            return False
    elif isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    raise RequestError(f"{name} must be a boolean, got {v!r}")


# -- responses ---------------------------------------------------------------------------


def output_arrays(text: str, token_ids: list[int],
                  finish_reason: FinishReason | str | None = None) -> dict[str, np.ndarray]:
    """The output tensors of one response, each with the batch dimension 1."""
    out = {
        "text_output": np.array([[text.encode("utf-8")]], dtype=np.object_),
        "token_ids": np.array([token_ids], dtype=np.int32).reshape(1, len(token_ids)),
    }
    if finish_reason is not None:
        reason = finish_reason.value if isinstance(finish_reason, FinishReason) else finish_reason
        out["finish_reason"] = np.array([[reason.encode("utf-8")]], dtype=np.object_)
    return out


def coalesce_outputs(items: list[tuple[Any, RequestOutput]]) -> list[tuple[Any, RequestOutput]]:
    """The (request key, piece) pairs queued for sending, with each request's consecutive
    pieces merged into one: text and token ids joined, the last piece's flags and counts.

    Why. The response thread sends one response per piece, and each send is a round trip to
    the Triton core. When the engine produces pieces faster than they can be sent (a full
    batch streaming one token per step each), the queue grows and every token arrives later
    and later. Merging what has piled up makes one send per request per drain, so the sender
    keeps up at any load; when it keeps up anyway, nothing is merged (one piece per request
    per step). A piece is never merged across a finished piece, and an error piece stays
    alone, so that the tokens before it are still sent."""
    merged: list[list] = []  # [key, piece], in first-seen order
    open_slot: dict[int, list] = {}  # id(key) -> its slot still taking pieces
    for key, piece in items:
        slot = open_slot.get(id(key))
        if slot is None or piece.error is not None:
            slot = [key, piece]
            merged.append(slot)
        else:
            prev = slot[1]
            slot[1] = replace(piece, text=prev.text + piece.text, token_ids=prev.token_ids + piece.token_ids)
        if piece.finished:
            open_slot.pop(id(key), None)
        else:
            open_slot[id(key)] = slot
    return [(key, piece) for key, piece in merged]


@dataclass
class Completion:
    """What one request has produced so far; `stream=false` requests send it once at the end."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.text)
        self.token_ids.extend(out.token_ids)

    def arrays(self, finish_reason: FinishReason | str | None) -> dict[str, np.ndarray]:
        return output_arrays("".join(self.text), self.token_ids, finish_reason)


# -- metrics labels ----------------------------------------------------------------------

BASE_LABEL = "__base__"  # requests without an adapter
OTHER_LABEL = "__other__"  # beyond the label limit, or a name that is not a valid adapter name
_LABEL_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class AdapterLabels:
    """Per-adapter metric label values, bounded so that clients cannot grow them without limit."""

    def __init__(self, limit: int = 512):
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, adapter: str | None) -> str:
        if not adapter:
            return BASE_LABEL
        if adapter in self.seen:
            return adapter
        if not _LABEL_RE.fullmatch(adapter) or len(self.seen) >= self.limit:
            return OTHER_LABEL
        self.seen.add(adapter)
        return adapter


# -- model configuration -----------------------------------------------------------------


def engine_parameters(model_config: dict, repo_root: str | os.PathLike,
                      environ: dict[str, str] | None = None) -> dict[str, str]:
    """config.pbtxt parameters -> EngineConfig.from_parameters input.

    Relative model/adapter directories are resolved against the repository root, so the
    model repository works from any working directory; SLORA_MODEL_DIR / SLORA_ADAPTER_DIR
    (set by scripts/serve.sh) override the configured ones.
    """
    environ = os.environ if environ is None else environ
    params: dict[str, str] = {}
    for key, value in (model_config.get("parameters") or {}).items():
        if key in BACKEND_PARAMETERS:
            continue
        params[key] = value.get("string_value", "") if isinstance(value, dict) else str(value)
    if environ.get("SLORA_MODEL_DIR"):
        params["model_dir"] = environ["SLORA_MODEL_DIR"]
    if environ.get("SLORA_ADAPTER_DIR"):
        params["adapter_dir"] = environ["SLORA_ADAPTER_DIR"]
    params.setdefault("model_dir", DEFAULT_MODEL_DIR)
    params.setdefault("adapter_dir", DEFAULT_ADAPTER_DIR)
    root = Path(repo_root)
    for key in ("model_dir", "adapter_dir"):
        value = params[key].strip()
        if value.lower() in ("", "none"):
            params[key] = ""
            continue
        if key == "model_dir" and value.startswith("dummy:"):  # benchmark shapes: no directory
            params[key] = value
            continue
        path = Path(value).expanduser()
        params[key] = str(path if path.is_absolute() else (root / path).resolve())
    if not params["adapter_dir"]:
        params.pop("adapter_dir")  # EngineConfig default: no adapter directory
    return params
