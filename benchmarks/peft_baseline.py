"""HF Transformers + PEFT on the S-LoRA trace: the baseline for "ours / HF PEFT".

    python benchmarks/peft_baseline.py --model llama-7b --setting S2 --n 100 --rate 2 --duration 60

The base model is HF's LlamaForCausalLM with random weights in a named shape (the same shapes
as our dummy mode); n PEFT LoRA adapters with random A and B (S-LoRA's q,k,v,o targets). Best
batching HF+PEFT offers: requests that have arrived are served in batches of up to
--batch, each batch mixing adapters through PEFT's `adapter_names` (one adapter per row),
left-padded, generated greedily until the longest requested output (`min_new_tokens` keeps
EOS from ending rows early). Time-bounded: after --time-limit seconds no new batch starts.
Throughput = finished requests / elapsed time, as S-LoRA counts it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from client.workload import WorkloadSpec, adapter_name, make_trace  # noqa: E402
from slora_backend.dummy import SHAPES  # noqa: E402

log = logging.getLogger("peft_baseline")
SETTINGS = {"S1": (8,), "S2": (64, 32, 16, 8), "S4": (64, 32, 16)}


def build(shape: str, n: int, ranks, device, dtype, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, hd, inter, vocab, theta = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=hd, intermediate_size=inter, vocab_size=vocab,
                      rope_theta=theta, max_position_embeddings=2048, initializer_range=0.02)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    rng = np.random.default_rng(seed)
    peft_model = None
    t0 = time.monotonic()
    for i in range(n):
        r = int(rng.choice(ranks))
        lcfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False, lora_dropout=0.0)
        if peft_model is None:
            peft_model = get_peft_model(model, lcfg, adapter_name=adapter_name(i))
        else:
            peft_model.add_adapter(adapter_name(i), lcfg)
        if (i + 1) % max(1, n // 10) == 0:
            log.info("created %d/%d PEFT adapters (%.0fs)", i + 1, n, time.monotonic() - t0)
    peft_model.to(device=device, dtype=dtype).eval()
    return peft_model


def write_report(args, device, trace, done, tokens, latencies, elapsed) -> dict:
    """Written after every batch, so that a run cut short still leaves its numbers."""
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "args": vars(args),
              "date": time.strftime("%Y-%m-%d"), "requests": len(trace), "finished": done,
              "elapsed_s": elapsed, "throughput_req_s": done / elapsed, "throughput_tok_s": tokens / elapsed,
              "latency_avg": float(np.mean(latencies)) if latencies else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"peft_baseline_{args.setting}_n{args.n}.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-7b", choices=sorted(SHAPES))
    ap.add_argument("--setting", default="S2", choices=sorted(SETTINGS))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--max-wait", type=float, default=2.0, help="seconds to wait for a batch to fill")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(args.model, args.n, SETTINGS[args.setting], device, dtype)
    vocab = SHAPES[args.model][6]
    trace = make_trace(WorkloadSpec(n_adapters=args.n, rate=args.rate, duration=args.duration,
                                    input_range=(8, args.max_len), output_range=(8, args.max_len), vocab=vocab, seed=7))
    start = time.monotonic()
    done, pending, tokens = 0, list(trace), 0
    latencies = []
    while pending and time.monotonic() - start < args.time_limit:
        now = time.monotonic() - start
        ready = [r for r in pending if r.arrival <= now][: args.batch]
        # A batch runs until its longest output is done, so fill it first (up to --max-wait).
        if len(ready) < min(args.batch, len(pending)) and now - pending[0].arrival < args.max_wait:
            time.sleep(0.01)
            continue
        for r in ready:
            pending.remove(r)
        width = max(len(r.prompt_ids) for r in ready)
        ids = torch.zeros(len(ready), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(ready):  # left padding, as generation needs
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        new = max(r.output_len for r in ready)
        with torch.no_grad():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0,
                           adapter_names=[r.adapter for r in ready])
        finish = time.monotonic() - start
        done += len(ready)
        tokens += sum(r.output_len for r in ready)
        latencies += [finish - r.arrival for r in ready]
        log.info("batch of %d done at %.1fs (%d finished, %d pending)", len(ready), finish, done, len(pending))
        report = write_report(args, device, trace, done, tokens, latencies, time.monotonic() - start)
    report = write_report(args, device, trace, done, tokens, latencies, time.monotonic() - start)
    print(json.dumps({k: report[k] for k in ("finished", "requests", "throughput_req_s", "latency_avg")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
