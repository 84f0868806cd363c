"""Dummy weights for benchmarks: named base-model shapes and random adapters, no files.

`EngineConfig(model_dir="dummy:llama-7b")` builds the base weights on the engine's device
from a seed; `random_adapter` builds an adapter's host page images directly (distinct
random weights per seed), so thousands of adapters cost host memory and nothing else.
"""

from __future__ import annotations

import torch

from .adapters import HostAdapter, page_layout
from .checkpoint import MODULES, BaseWeights, LayerWeights, ModelSpec
from .tensor_parallel import COLUMN_MODULES, local_spec, shard_layout

PREFIX = "dummy:"
SHAPES = {
    # name: hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, rope_theta
    "llama-7b": (4096, 32, 32, 32, 128, 11008, 32000, 10000.0),
    "llama-13b": (5120, 40, 40, 40, 128, 13824, 32000, 10000.0),
    "llama-30b": (6656, 60, 52, 52, 128, 17920, 32000, 10000.0),
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


def dummy_weights(spec: ModelSpec, dtype: torch.dtype, device: torch.device, seed: int = 0,
                  tp_size: int = 1, tp_rank: int = 0) -> BaseWeights:
    """Random base weights; with tensor parallelism only rank `tp_rank`'s shard is generated.

    A shard is drawn from its own seed (not cut from the full model): start-up costs one
    shard's worth of random numbers per rank. Embedding and norms, which every rank holds,
    come from the shared seed, so they are equal on all ranks.
    """
    s = spec if tp_size == 1 else local_spec(spec, tp_size)
    g = torch.Generator(device=device).manual_seed(seed if tp_size == 1 else seed * 1_000_003 + 1 + tp_rank)

    def rand(*shape, std=0.02, gen=g):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    def norm():
        return torch.ones(s.hidden, device=device, dtype=dtype)

    layers = [LayerWeights(input_norm=norm(), qkv=rand(s.q_width + 2 * s.kv_width, s.hidden),
                           o=rand(s.hidden, s.q_width), post_norm=norm(),
                           gate_up=rand(2 * s.intermediate, s.hidden), down=rand(s.hidden, s.intermediate))
              for _ in range(s.layers)]
    if tp_size == 1:
        return BaseWeights(embed=rand(s.vocab, s.hidden, std=1.0), layers=layers, norm=norm(),
                           lm_head=rand(s.vocab, s.hidden))
    shared = torch.Generator(device=device).manual_seed(seed)
    embed = rand(s.vocab, s.hidden, std=1.0, gen=shared)
    # Only rank 0 computes logits; workers point lm_head at the embedding instead of holding one.
    lm_head = rand(s.vocab, s.hidden, gen=shared) if tp_rank == 0 else embed
    return BaseWeights(embed=embed, layers=layers, norm=norm(), lm_head=lm_head)


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


def random_adapter_shard(name: str, spec: ModelSpec, rank: int, targets: tuple[str, ...], dtype: torch.dtype,
                         seed: int, tp_size: int, tp_rank: int, device: torch.device | str) -> HostAdapter:
    """Rank `tp_rank`'s shard of a random adapter (tensor_parallel.shard_layout), pages on `device`.

    Padding rows of column-split modules are zero, as in the shard of a real adapter.
    """
    ranks = [rank if m in targets else 0 for m in MODULES]
    lay = shard_layout(spec, tp_size, ranks)
    page = spec.page_width // tp_size
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + tp_rank)
    pages = (torch.randn(spec.layers, lay.n_pages, page, generator=g, device=device) * 0.01).to(dtype)
    for m, r in enumerate(ranks):
        if r == 0 or m not in COLUMN_MODULES:
            continue
        per_a, per_b = -(-lay.a_width[m] // page), -(-lay.b_width[m] // page)
        held = len(range(tp_rank, r, tp_size))  # A rows tp_rank, tp_rank+N, ... below r
        pages[:, lay.a_offsets[m] + held * per_a : lay.b_offsets[m]] = 0
        pages[:, lay.b_offsets[m] + r * per_b : lay.b_offsets[m] + lay.b_rows[m] * per_b] = 0
    scales = [2.0 if r else 0.0 for r in ranks]
    return HostAdapter(name=name, rank=rank, ranks=list(lay.a_rows), scales=scales, a_offsets=list(lay.a_offsets),
                       b_offsets=list(lay.b_offsets), pages=pages, target_modules=[m for m in MODULES if m in targets])


TARGET_SETS = {"qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"), "all": MODULES}


def register_dummy_adapters(engine, description: str, seed: int = 1) -> None:
    """Register "N:RANKS:TARGETS" random adapters named adapter-00000.. (see EngineConfig).

    With tensor parallelism rank 0 registers its shards and remembers the seed, from which
    each worker generates its own shard when the adapter is loaded.
    """
    import logging

    import numpy as np

    try:
        n_text, ranks_text, targets = description.split(":")
        n, ranks = int(n_text), [int(r) for r in ranks_text.split(",")]
        target_modules = TARGET_SETS[targets]
    except (ValueError, KeyError):
        raise ValueError(f"dummy_adapters must look like 100:64,32,16,8:qkvo, got {description!r}") from None
    rng = np.random.default_rng(seed)
    tp = getattr(engine, "tp", None)
    pin = engine.device.type == "cuda"
    for i in range(n):
        name, rank = f"adapter-{i:05d}", int(rng.choice(ranks))
        if tp is None:
            adapter = random_adapter(name, engine.spec, rank, target_modules, engine.dtype, seed=seed + i,
                                     device=engine.device, pin=pin)
        else:
            adapter = random_adapter_shard(name, engine.spec, rank, target_modules, engine.dtype, seed + i,
                                           tp.size, 0, engine.device)
            adapter.pages = adapter.pages.cpu()
            if pin:
                adapter.pages = adapter.pages.pin_memory()
            engine.adapters.note_dummy(name, rank, target_modules, seed + i)
        engine.register_adapter(adapter)
        if (i + 1) % max(1, n // 10) == 0:
            logging.getLogger(__name__).info("registered %d/%d dummy adapters", i + 1, n)
