"""perf_analyzer `--input-data` JSON for the `slora` model: fixed input/output lengths.

Every entry holds `input_ids` of exactly `input_len` tokens, `max_tokens = output_len` and
`ignore_eos = true` (so each request generates exactly `output_len` tokens), and an
`adapter_id` cycling through the given names ("" = the base model).

    python -m client perf-data --adapters uppercase,random-r4 --input-len 32 \\
        --output-len 16 --count 64 --out in.json
    perf_analyzer -m slora -i grpc -u localhost:8001 --streaming --input-data in.json \\
        --concurrency-range 4
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_VOCAB_SIZE = 49152  # SmolLM2
DEFAULT_MIN_TOKEN_ID = 32  # skip the special tokens at the start of the vocabulary


def make_perf_data(
    adapters: Sequence[str],
    input_len: int,
    output_len: int,
    count: int,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_token_id: int = DEFAULT_MIN_TOKEN_ID,
    seed: int = 0,
    stream: bool | None = None,
) -> dict[str, Any]:
    """The input-data document: {"data": [entry, ...]} with `count` entries.

    Token ids are drawn uniformly from [min_token_id, vocab_size) by a seeded RNG, so the
    same arguments give the same file. `stream`, when not None, adds the `stream` input.
    """
    if input_len < 1 or output_len < 1 or count < 1:
        raise ValueError("input_len, output_len and count must be >= 1")
    if not 0 <= min_token_id < vocab_size:
        raise ValueError(f"need 0 <= min_token_id < vocab_size, got {min_token_id}, {vocab_size}")
    names = list(adapters) or [""]
    rng = random.Random(seed)
    data = []
    for i in range(count):
        entry: dict[str, Any] = {
            "input_ids": {
                "content": [rng.randrange(min_token_id, vocab_size) for _ in range(input_len)],
                "shape": [input_len],
            },
            "max_tokens": [output_len],
            "ignore_eos": [True],
            "adapter_id": [names[i % len(names)]],
        }
        if stream is not None:
            entry["stream"] = [bool(stream)]
        data.append(entry)
    return {"data": data}


def parse_adapters(text: str) -> list[str]:
    """`a,b,c` -> ["a", "b", "c"]; an empty item (`,a` or `base`) names the base model."""
    if text is None or text == "":
        return [""]
    return ["" if n.strip() in ("", "base", "-") else n.strip() for n in text.split(",")]


def write_perf_data(path: str | Path, doc: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    return path
