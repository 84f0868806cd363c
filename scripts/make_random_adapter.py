#!/usr/bin/env python3
"""Make deterministic random PEFT LoRA adapters for a Llama-architecture model.

Writes the standard PEFT layout (`adapter_config.json` + `adapter_model.safetensors`) without
loading the model: shapes come from the model's config.json, and the size of each update is
set from the base weights (model.safetensors) so that ||scale * B @ A|| is `--rel-norm` of
||W|| for every targeted module: outputs change visibly but stay sensible.

    python scripts/make_random_adapter.py --model models/SmolLM2-135M-Instruct \\
        --out demo_adapters/random-r4 --rank 4 --modules q_proj,v_proj --seed 1
    python scripts/make_random_adapter.py --demo     # the demo set (see DEMO) into demo_adapters/

Same arguments, same bytes (seeded torch CPU generator).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("make_random_adapter")

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL = ATTN + MLP

# name -> (rank, alpha, modules, use_rslora, seed)
DEMO = {
    "random-r4": (4, 8, ("q_proj", "v_proj"), False, 1),
    "random-r16": (16, 32, ALL, False, 2),
    "random-r32-rslora": (32, 32, ATTN, True, 3),
}


def module_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each linear module of one decoder layer."""
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    hd = cfg.get("head_dim") or h // heads
    inter = cfg["intermediate_size"]
    return {
        "q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h),
        "o_proj": (h, heads * hd), "gate_proj": (inter, h), "up_proj": (inter, h),
        "down_proj": (h, inter),
    }


def _prefix(module: str) -> str:
    return "self_attn" if module in ATTN else "mlp"


def make_adapter(model_dir: Path, out: Path, rank: int, alpha: float, modules, *,
                 use_rslora: bool = False, seed: int = 0, rel_norm: float = 0.05,
                 dtype: str = "bfloat16") -> Path:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    shapes = module_shapes(cfg)
    bad = sorted(set(modules) - set(shapes))
    if bad:
        raise ValueError(f"unknown modules {bad}; known: {list(shapes)}")
    n_layers = cfg["num_hidden_layers"]
    scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    weights_file = model_dir / "model.safetensors"
    base = safe_open(str(weights_file), "pt") if weights_file.is_file() else None
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(n_layers):
        for m in modules:
            out_f, in_f = shapes[m]
            bound = 1.0 / math.sqrt(in_f)  # PEFT's default (kaiming-uniform) range for A
            a = (torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound
            b = torch.randn(out_f, rank, generator=gen)
            key = f"model.layers.{layer}.{_prefix(m)}.{m}.weight"
            w_norm = (base.get_tensor(key).float().norm().item() if base is not None
                      else math.sqrt(out_f * in_f) * 0.02)
            delta = scale * (b @ a)
            b *= rel_norm * w_norm / max(delta.norm().item(), 1e-12)
            name = f"base_model.model.model.layers.{layer}.{_prefix(m)}.{m}"
            tensors[f"{name}.lora_A.weight"] = a.to(getattr(torch, dtype)).contiguous()
            tensors[f"{name}.lora_B.weight"] = b.to(getattr(torch, dtype)).contiguous()

    adapter_cfg = {
        "alpha_pattern": {}, "auto_mapping": None,
        "base_model_name_or_path": cfg.get("_name_or_path") or model_dir.name,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "layers_pattern": None, "layers_to_transform": None,
        "lora_alpha": alpha, "lora_dropout": 0.0, "modules_to_save": None,
        "peft_type": "LORA", "r": rank, "rank_pattern": {}, "revision": None,
        "target_modules": sorted(modules), "task_type": "CAUSAL_LM",
        "use_dora": False, "use_rslora": use_rslora,
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True)
                                             + "\n")
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    ap.add_argument("--out", type=Path, help="adapter directory to write")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2*rank)")
    ap.add_argument("--modules", default="q_proj,v_proj",
                    help="comma-separated target modules, or 'attn' / 'all'")
    ap.add_argument("--rslora", action="store_true", help="use_rslora (scale alpha/sqrt(r))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rel-norm", type=float, default=0.05,
                    help="||scale*B@A|| / ||W|| for every module (default 0.05)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--demo", action="store_true",
                    help=f"write the demo set {sorted(DEMO)} into --demo-dir")
    ap.add_argument("--demo-dir", type=Path, default=ROOT / "demo_adapters")
    ap.add_argument("--force", action="store_true", help="with --demo: rewrite existing ones")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[make_random_adapter] %(message)s")
    if not (args.model / "config.json").is_file():
        log.error("no model config at %s", args.model)
        return 1

    jobs = []
    if args.demo:
        for name, (rank, alpha, mods, rs, seed) in DEMO.items():
            out = args.demo_dir / name
            if (out / "adapter_model.safetensors").is_file() and not args.force:
                log.info("%s exists", out)
                continue
            jobs.append((out, rank, alpha, mods, rs, seed))
    else:
        if args.out is None:
            ap.error("--out is required (or --demo)")
        mods = {"attn": ATTN, "all": ALL}.get(args.modules) or tuple(args.modules.split(","))
        alpha = args.alpha if args.alpha is not None else 2 * args.rank
        jobs.append((args.out, args.rank, alpha, mods, args.rslora, args.seed))
    for out, rank, alpha, mods, rs, seed in jobs:
        t0 = time.time()
        make_adapter(args.model, out, rank, alpha, mods, use_rslora=rs, seed=seed,
                     rel_norm=args.rel_norm, dtype=args.dtype)
        size = (out / "adapter_model.safetensors").stat().st_size
        log.info("wrote %s: r=%d alpha=%g rslora=%s on %s (%.1f MB, %.1f s)", out, rank, alpha,
                 rs, ",".join(mods), size / 1e6, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
