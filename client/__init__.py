"""Client for the `slora` model served by tritonserver: streaming requests and perf data.

    python -m client generate --prompt "What is the capital of France?" --chat
    python -m client perf-data --adapters a,b --input-len 32 --output-len 16 --out in.json
"""

from client.perf_data import make_perf_data, parse_adapters, write_perf_data
from client.triton_client import (
    INPUTS,
    MODEL_NAME,
    OUTPUTS,
    Chunk,
    Completion,
    GenerationError,
    build_grpc_inputs,
    build_http_body,
    build_inputs,
    generate,
    generate_many,
    parse_sse_event,
    parse_sse_lines,
    stream_generate,
)

__all__ = [
    "INPUTS",
    "MODEL_NAME",
    "OUTPUTS",
    "Chunk",
    "Completion",
    "GenerationError",
    "build_grpc_inputs",
    "build_http_body",
    "build_inputs",
    "generate",
    "generate_many",
    "make_perf_data",
    "parse_adapters",
    "parse_sse_event",
    "parse_sse_lines",
    "stream_generate",
    "write_perf_data",
]
