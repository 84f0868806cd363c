"""Dummy weights for benchmarks: named base-model shapes and random adapters, no files.

`EngineConfig(model_dir="dummy:llama-7b")` builds the base weights on the engine's device
from a seed; `random_adapter` builds an adapter's host page images directly (distinct
random weights per seed), so thousands of adapters cost host memory and nothing else.
"""

from __future__ import annotations

import torch

from .adapters import HostAdapter, page_layout
from .checkpoint import MODULES, BaseWeights, LayerWeights, ModelSpec

PREFIX = "dummy:"
SHAPES = {
    # name: hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, rope_theta
    "llama-7b": (4096, 32, 32, 32, 128, 11008, 32000, 10000.0),
    "llama-13b": (5120, 40, 40, 40, 128, 13824, 32000, 10000.0),
    "llama3-8b": (4096, 32, 32, 8, 128, 14336, 128256, 500000.0),
    "smollm2-135m": (576, 30, 9, 3, 64, 1536, 49152, 100000.0),
    "tiny": (128, 2, 4, 2, 32, 256, 512, 10000.0),
}


def is_dummy(model_dir: str) -> bool:
    return model_dir.startswith(PREFIX)


def dummy_spec(model_dir: str, max_position: int = 4096) -> ModelSpec:
    name = model_dir[len(PREFIX):]
    if name not in SHAPES:
        raise ValueError(f"unknown dummy shape {name!r}; known: {sorted(SHAPES)}")
    hidden, layers, heads, kv, hd, inter, vocab, theta = SHAPES[name]
    return ModelSpec(hidden=hidden, layers=layers, heads=heads, kv_heads=kv, head_dim=hd, intermediate=inter,
                     vocab=vocab, rope_theta=theta, rms_eps=1e-5, tie_embeddings=False,
                     max_position=max_position, rope_scaling=None, eos_token_ids=())


def dummy_weights(spec: ModelSpec, dtype: torch.dtype, device: torch.device, seed: int = 0) -> BaseWeights:
    g = torch.Generator(device=device).manual_seed(seed)
    s = spec

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    def norm():
        return torch.ones(s.hidden, device=device, dtype=dtype)

    layers = [LayerWeights(input_norm=norm(), qkv=rand(s.q_width + 2 * s.kv_width, s.hidden),
                           o=rand(s.hidden, s.q_width), post_norm=norm(),
                           gate_up=rand(2 * s.intermediate, s.hidden), down=rand(s.hidden, s.intermediate))
              for _ in range(s.layers)]
    return BaseWeights(embed=rand(s.vocab, s.hidden, std=1.0), layers=layers, norm=norm(),
                       lm_head=rand(s.vocab, s.hidden))


def random_adapter(name: str, spec: ModelSpec, rank: int, targets: tuple[str, ...], dtype: torch.dtype,
                   seed: int, device: torch.device | str = "cpu", pin: bool = False) -> HostAdapter:
    """An adapter with distinct random weights, generated on `device`, held on the host."""
    ranks = [rank if m in targets else 0 for m in MODULES]
    a_off, b_off, n_pages = page_layout(spec, ranks)
    g = torch.Generator(device=device).manual_seed(seed)
    pages = (torch.randn(spec.layers, n_pages, spec.page_width, generator=g, device=device) * 0.01).to(dtype)
    pages = pages.cpu()
    if pin:
        pages = pages.pin_memory()
    scales = [2.0 if r else 0.0 for r in ranks]
    return HostAdapter(name=name, rank=rank, ranks=ranks, scales=scales, a_offsets=a_off, b_offsets=b_off,
                       pages=pages, target_modules=[m for m in MODULES if m in targets])


TARGET_SETS = {"qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"), "all": MODULES}


def register_dummy_adapters(engine, description: str, seed: int = 1) -> None:
    """Register "N:RANKS:TARGETS" random adapters named adapter-00000.. (see EngineConfig)."""
    import logging

    import numpy as np

    try:
        n_text, ranks_text, targets = description.split(":")
        n, ranks = int(n_text), [int(r) for r in ranks_text.split(",")]
        target_modules = TARGET_SETS[targets]
    except (ValueError, KeyError):
        raise ValueError(f"dummy_adapters must look like 100:64,32,16,8:qkvo, got {description!r}") from None
    rng = np.random.default_rng(seed)
    for i in range(n):
        engine.register_adapter(random_adapter(f"adapter-{i:05d}", engine.spec, int(rng.choice(ranks)),
                                               target_modules, engine.dtype, seed=seed + i, device=engine.device,
                                               pin=engine.device.type == "cuda"))
        if (i + 1) % max(1, n // 10) == 0:
            logging.getLogger(__name__).info("registered %d/%d dummy adapters", i + 1, n)
