"""Base model: read an HF Llama-family checkpoint directory (config.json + *.safetensors)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from kernels.lora_batch import MODULES  # noqa: F401  (re-exported: the order of every table and kernel)

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM"}


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool
    max_position: int
    rope_scaling: dict | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def page_width(self) -> int:
        # One token's K (or V) of one layer fills one page exactly (docs/DESIGN.md).
        return self.kv_width

    def module_shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a linear module."""
        return {
            "q_proj": (self.hidden, self.q_width),
            "k_proj": (self.hidden, self.kv_width),
            "v_proj": (self.hidden, self.kv_width),
            "o_proj": (self.q_width, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[module]

    def pages_per_row(self, width: int) -> int:
        return math.ceil(width / self.page_width)


def read_spec(model_dir: str | Path) -> ModelSpec:
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json")
    cfg = json.loads(cfg_path.read_text())
    archs = set(cfg.get("architectures") or ["LlamaForCausalLM"])
    if not archs & SUPPORTED_ARCHS:
        raise CheckpointError(f"unsupported architecture {sorted(archs)}; supported: {sorted(SUPPORTED_ARCHS)}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise CheckpointError("checkpoints with attention or MLP biases are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act {cfg.get('hidden_act')!r} (only silu)")
    heads = cfg["num_attention_heads"]
    rope_params = cfg.get("rope_parameters") or {}  # transformers 5 folds theta/scaling in here
    rope_scaling = cfg.get("rope_scaling") or None
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = rope_params
    if rope_scaling is not None:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if kind == "default":
            rope_scaling = None
        elif kind not in ("llama3", "linear"):
            raise CheckpointError(f"unsupported rope scaling {kind!r} (supported: llama3, linear)")
    eos = _eos_ids(model_dir, cfg)
    max_position = int(cfg.get("max_position_embeddings", 2048))
    window = cfg.get("sliding_window")
    if isinstance(window, int) and 0 < window < max_position:
        # Our attention is full attention; within the window it equals sliding-window attention.
        log.warning("sliding_window %d < context %d: serving at most %d tokens per sequence",
                    window, max_position, window)
        max_position = window
    return ModelSpec(
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"],
        rope_theta=float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position=max_position,
        rope_scaling=rope_scaling,
        eos_token_ids=eos,
    )


def _eos_ids(model_dir: Path, cfg: dict) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (cfg, _read_json(model_dir / "generation_config.json")):
        value = source.get("eos_token_id")
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids.extend(v for v in value if isinstance(v, int))
    return tuple(dict.fromkeys(ids))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (hidden,)
    qkv: torch.Tensor  # (q_width + 2*kv_width, hidden): q, k, v fused by output rows
    o: torch.Tensor  # (hidden, q_width)
    post_norm: torch.Tensor  # (hidden,)
    gate_up: torch.Tensor  # (2*intermediate, hidden): gate, up fused
    down: torch.Tensor  # (hidden, intermediate)


@dataclass
class BaseWeights:
    embed: torch.Tensor  # (vocab, hidden)
    layers: list[LayerWeights]
    norm: torch.Tensor  # (hidden,)
    lm_head: torch.Tensor  # (vocab, hidden); the embedding itself when tied


class _Checkpoint:
    """A checkpoint's safetensors files, read one tensor (or one slice of it) at a time."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype):
        model_dir = Path(model_dir)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
            hint = f" (found {pickles}: pickled weights are never loaded)" if pickles else ""
            raise CheckpointError(f"{model_dir} has no *.safetensors weights{hint}")
        self.dtype = dtype
        self.files = [safe_open(str(path), framework="pt") for path in files]
        self.where = {name: f for f in self.files for name in f.keys()}
        self.used: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...], rows: slice | None = None,
             cols: slice | None = None) -> torch.Tensor:
        """Tensor `name` (checked against `shape`), or only its `rows` / `cols`, in self.dtype."""
        f = self.where.get(name)
        if f is None:
            raise CheckpointError(f"checkpoint lacks tensor {name}")
        part = f.get_slice(name)
        if tuple(part.get_shape()) != shape:
            raise CheckpointError(f"{name} has shape {tuple(part.get_shape())}, expected {shape}")
        self.used.add(name)
        if rows is not None:
            return part[rows].to(self.dtype)
        if cols is not None:
            return part[:, cols].to(self.dtype)
        return f.get_tensor(name).to(self.dtype)


def load_base_weights(model_dir: str | Path, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                      tp_size: int = 1, tp_rank: int = 0) -> BaseWeights:
    """The base weights, or with tensor parallelism rank `tp_rank`'s shard of them.

    Shards are read as slices (safetensors reads only those bytes): q/k/v/gate/up by output
    rows, o/down by input columns (tensor_parallel.py); embedding and norms whole; lm_head
    only on rank 0, the one rank that computes logits.
    """
    ck = _Checkpoint(model_dir, dtype)
    q = kv = mlp = None
    if tp_size > 1:
        from .tensor_parallel import rank_slices

        sl = rank_slices(spec, tp_size, tp_rank)
        q, kv, mlp = sl.q, sl.kv, sl.mlp
    h, i = spec.hidden, spec.intermediate
    layers = []
    for n in range(spec.layers):
        p = f"model.layers.{n}."
        qkv = [ck.take(p + "self_attn.q_proj.weight", (spec.q_width, h), rows=q),
               ck.take(p + "self_attn.k_proj.weight", (spec.kv_width, h), rows=kv),
               ck.take(p + "self_attn.v_proj.weight", (spec.kv_width, h), rows=kv)]
        gate_up = [ck.take(p + "mlp.gate_proj.weight", (i, h), rows=mlp),
                   ck.take(p + "mlp.up_proj.weight", (i, h), rows=mlp)]
        layers.append(LayerWeights(
            input_norm=ck.take(p + "input_layernorm.weight", (h,)).to(device),
            qkv=torch.cat(qkv).to(device),
            o=ck.take(p + "self_attn.o_proj.weight", (h, spec.q_width), cols=q).to(device),
            post_norm=ck.take(p + "post_attention_layernorm.weight", (h,)).to(device),
            gate_up=torch.cat(gate_up).to(device),
            down=ck.take(p + "mlp.down_proj.weight", (h, i), cols=mlp).to(device),
        ))
    embed = ck.take("model.embed_tokens.weight", (spec.vocab, h)).to(device)
    if spec.tie_embeddings or tp_rank > 0:
        ck.used.add("lm_head.weight")
        lm_head = embed  # tied; or a worker rank, which never computes logits
    else:
        lm_head = ck.take("lm_head.weight", (spec.vocab, h)).to(device)
    norm = ck.take("model.norm.weight", (h,)).to(device)
    leftover = [k for k in ck.where if k not in ck.used and not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        log.warning("ignoring %d unexpected checkpoint tensors, e.g. %s", len(leftover), leftover[:3])
    log.info("loaded %d tensors from %d safetensors file(s) in %s%s", len(ck.used), len(ck.files), model_dir,
             f" (tensor-parallel shard {tp_rank}/{tp_size})" if tp_size > 1 else "")
    return BaseWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)
