"""GPU parity: the engine (Triton-lang kernels, bf16 / fp16) against HF Transformers + PEFT.

    python benchmarks/gpu_parity.py --out results_dir

A random GQA Llama and five PEFT adapters (ranks 1..64, one rsLoRA, mixed target sets) are
built on disk; one batch mixing all adapters and base requests runs greedily through the
engine (half of it arriving while the first half decodes, so prefill steps carry decode rows)
while every step's logits are recorded. HF+PEFT then computes teacher-forced logits on
the same token sequences in fp32 and in the engine's dtype. Pass criterion per request: the
engine's relative logit error against fp32 is at most twice HF's own error in that dtype
(plus 1e-3), i.e. we lose no more precision than the reference implementation does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny_model import PARITY_ADAPTERS, build_adapter, build_tokenizer  # noqa: E402

from slora_backend.config import EngineConfig  # noqa: E402
from slora_backend.engine import Engine  # noqa: E402
from slora_backend.request import SamplingParams  # noqa: E402

log = logging.getLogger("gpu_parity")
ADAPTERS = PARITY_ADAPTERS


def build_model(out: Path, kv_heads: int = 2) -> Path:
    """A random GQA Llama (hidden 512, 8 heads) saved as a checkpoint with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(out)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=kv_heads, head_dim=64, max_position_embeddings=512,
                      rms_norm_eps=1e-5, initializer_range=0.05, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(out), safe_serialization=True)
    return out


def parity_setup(root: Path, new_tokens: int, kv_heads: int = 2):
    """The model and adapters on disk under root, and the requests every parity run sends:
    (model dir, adapter dir, prompts, adapter names, engine jobs)."""
    model = build_model(root / "model", kv_heads=kv_heads)
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        build_adapter(model, root / "adapters" / name, seed=100 + i, **kw)
    g = torch.Generator().manual_seed(1)
    names = [None, *ADAPTERS, None, "r12-all-rslora"]
    prompts = [torch.randint(1, 380, (n,), generator=g).tolist() for n in (1, 7, 33, 64, 5, 120, 17, 48)]
    jobs = [dict(prompt_ids=p, adapter=n, params=SamplingParams(max_tokens=new_tokens, ignore_eos=True))
            for p, n in zip(prompts, names, strict=True)]
    return model, root / "adapters", prompts, names, jobs


def hf_logits(model_dir, adapter_dir, ids: list[int], start: int, dtype) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).cuda().eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).to(dtype).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device="cuda")).logits[0, start:].float().cpu()
    return out


def run_engine(model_dir, adapter_dir, dtype_name, jobs, pool_pages: int = 20000):
    engine = Engine(EngineConfig(model_dir=str(model_dir), adapter_dir=str(adapter_dir), dtype=dtype_name,
                                 kernel_backend="triton", pool_pages=pool_pages))
    recorded: dict[int, list[torch.Tensor]] = {}

    def record(logits, reqs):  # every step's logits, overlapped decode steps included
        for i, r in enumerate(reqs):
            recorded.setdefault(r.request_id, []).append(logits[i].float().cpu())

    engine.sampler.observe = record
    import queue

    # Half the requests first; the rest once those are decoding, so that their prefills carry
    # decode rows (mixed steps: both attention paths, LoRA over all rows) as in serving.
    qs, ids, tokens, done = [], [], [], []

    def take(k: int) -> None:  # one output of request k
        o = qs[k].get(timeout=600)
        assert o.error is None, o.error
        tokens[k] += o.token_ids
        done[k] = o.finished

    half = min(len(jobs) // 2, len(ADAPTERS) + 3)  # one wave: 8 requests (3 without an adapter)
    for k, job in enumerate(jobs):
        if k and k % half == 0:
            for j in range(k - half, k):
                while len(tokens[j]) < 2 and not done[j]:
                    take(j)
        qs.append(queue.SimpleQueue())
        ids.append(engine.submit(on_output=qs[-1].put, **job))
        tokens.append([])
        done.append(False)
    for k in range(len(jobs)):
        while not done[k]:
            take(k)
    stats = engine.stats()
    engine.shutdown()
    counters = {"steps": stats["steps"], "mixed_steps": stats["mixed_steps"],
                "overlapped_steps": stats["overlapped_steps"], "adapter_loads": stats["adapters"]["loads"],
                "adapter_evictions": stats["adapters"]["evictions"],
                "preemptions": stats["requests"]["preemptions"],
                "kernel_compiles_while_serving": stats["kernel_compiles_while_serving"]}
    return tokens, [torch.stack(recorded[i]) for i in ids], counters


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--pressure-pages", type=int, default=2400,
                    help="pool of the pressure run: the adapters need 2954 pages, a wave's KV about 1000")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model, adapter_dir, prompts, names, jobs = parity_setup(Path(tempfile.mkdtemp(prefix="gpu_parity_")),
                                                            args.new_tokens)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": {}}
    ok = True
    # "pressure": the requests three times over, in waves, through a pool that holds the KV and
    # about two of the adapters: adapters are evicted and loaded again into pages that KV or
    # other adapters freed while later steps were queued (adapter copies behind StepFences).
    runs = [("bfloat16", torch.bfloat16, jobs, 20000), ("float16", torch.float16, jobs, 20000),
            ("bfloat16_pressure", torch.bfloat16, jobs * 3, args.pressure_pages)]
    for label, dtype, run_jobs, pool_pages in runs:
        dtype_name = str(dtype).removeprefix("torch.")
        tokens, ours, counters = run_engine(model, adapter_dir, dtype_name, run_jobs, pool_pages)
        rows = []
        reps = len(run_jobs) // len(jobs)
        for p, n, toks, our in zip(prompts * reps, names * reps, tokens, ours, strict=True):
            seq = p + toks[:-1]
            ad = None if n is None else adapter_dir / n
            ref32 = hf_logits(model, ad, seq, len(p) - 1, torch.float32)
            ref_dt = hf_logits(model, ad, seq, len(p) - 1, dtype)
            scale = ref32.abs().max().item()
            ours_err = (our - ref32).abs().max().item() / scale
            hf_err = (ref_dt - ref32).abs().max().item() / scale
            agree = (our.argmax(-1) == ref32.argmax(-1)).float().mean().item()
            hf_agree = (ref_dt.argmax(-1) == ref32.argmax(-1)).float().mean().item()
            passed = ours_err <= 2 * hf_err + 1e-3
            ok &= passed
            rows.append(dict(adapter=n, prompt_len=len(p), ours_rel_err=ours_err, hf_rel_err=hf_err,
                             top1_agree_ours=agree, top1_agree_hf=hf_agree, passed=passed))
            log.info("%s %-16s len=%3d ours_err=%.2e hf_err=%.2e top1 ours=%.2f hf=%.2f %s", label,
                     n, len(p), ours_err, hf_err, agree, hf_agree, "PASS" if passed else "FAIL")
        report["results"][label] = {**counters, "pool_pages": pool_pages, "requests": rows}
    report["passed"] = ok
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_parity.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
