"""Model ops (LoRA, KV write, paged attention, RMSNorm, RoPE, SwiGLU): Triton-lang kernels or
their pure-torch twins.

Importing this package never imports triton: only get_ops("triton") does.
"""

import os
import sys
from types import SimpleNamespace

from .lora_batch import MODULES, LoraBatch

__all__ = ["MODULES", "LoraBatch", "get_ops"]

_OPS = ("lora_apply", "lora_linear", "write_kv", "paged_decode_attention", "rms_norm", "add_rms_norm",
        "rope_write_kv", "silu_mul")


def get_ops(backend: str) -> SimpleNamespace:
    """Namespace of the model ops (_OPS) for "triton" or "torch"."""
    if backend == "torch":
        from . import torch_ops

        return SimpleNamespace(**{name: getattr(torch_ops, name) for name in _OPS})
    if backend == "triton":
        if "triton" not in sys.modules:
            import torch

            # Without a GPU the kernels can only run in Triton's interpreter, which must be
            # chosen before triton is first imported.
            if not torch.cuda.is_available():
                os.environ.setdefault("TRITON_INTERPRET", "1")
        from .kv_write import write_kv
        from .lora import lora_apply, lora_linear
        from .paged_attention import paged_decode_attention
        from .rms_norm import add_rms_norm, rms_norm
        from .rope import rope_write_kv
        from .silu_mul import silu_mul

        return SimpleNamespace(lora_apply=lora_apply, lora_linear=lora_linear, write_kv=write_kv,
                               paged_decode_attention=paged_decode_attention, rms_norm=rms_norm,
                               add_rms_norm=add_rms_norm, rope_write_kv=rope_write_kv,
                               silu_mul=silu_mul)
    raise ValueError(f"unknown kernel backend {backend!r} (expected 'triton' or 'torch')")
