"""Interactive speed on CPU: SmolLM2-135M-Instruct (the embedded default), torch kernels, fp32.

    python benchmarks/cpu_tokens_per_s.py [--model models/SmolLM2-135M-Instruct] [--threads N]

Reports time to first token and decode tokens/s for one chat request, and aggregate
tokens/s for 8 concurrent requests (base and the uppercase adapter mixed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slora_backend.config import EngineConfig  # noqa: E402
from slora_backend.engine import Engine  # noqa: E402
from slora_backend.request import SamplingParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--adapters", default="demo_adapters")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(model_dir=args.model, adapter_dir=args.adapters, device="cpu"))
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    list(engine.generate(prompt="warm up", params=SamplingParams(max_tokens=4)))
    t0 = time.monotonic()
    first = None
    n = 0
    for out in engine.generate(prompt="What is the capital of France?", chat=True, params=params):
        if out.token_ids and first is None:
            first = time.monotonic() - t0
        n += len(out.token_ids)
    single = time.monotonic() - t0
    import queue

    q: queue.SimpleQueue = queue.SimpleQueue()
    t1 = time.monotonic()
    for i in range(8):
        engine.submit(prompt=f"Tell me about number {i}.", chat=True, adapter="uppercase" if i % 2 else None,
                      params=params, on_output=q.put)
    done = total = 0
    while done < 8:
        out = q.get()
        total += len(out.token_ids)
        done += out.finished
    batch = time.monotonic() - t1
    engine.shutdown()
    report = {"device": "cpu", "threads": torch.get_num_threads(), "first_token_s": first,
              "single_decode_tok_s": (n - 1) / (single - first), "batch8_tok_s": total / batch}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cpu_smollm2.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
