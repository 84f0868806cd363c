"""LoRA, KV-write and paged-attention ops; Triton-lang kernels or their pure-torch twins.

Importing this package never imports triton: only get_ops("triton") does.
"""

import os
import sys
from types import SimpleNamespace

from .lora_batch import MODULES, LoraBatch

__all__ = ["MODULES", "LoraBatch", "get_ops"]


def get_ops(backend: str) -> SimpleNamespace:
    """Namespace with lora_apply, write_kv and paged_decode_attention for "triton" or "torch"."""
    if backend == "torch":
        from . import torch_ops as ops

        return SimpleNamespace(lora_apply=ops.lora_apply, write_kv=ops.write_kv,
                               paged_decode_attention=ops.paged_decode_attention)
    if backend == "triton":
        if "triton" not in sys.modules:
            import torch

            # Without a GPU the kernels can only run in Triton's interpreter, which must be
            # chosen before triton is first imported.
            if not torch.cuda.is_available():
                os.environ.setdefault("TRITON_INTERPRET", "1")
        from .kv_write import write_kv
        from .lora import lora_apply
        from .paged_attention import paged_decode_attention

        return SimpleNamespace(lora_apply=lora_apply, write_kv=write_kv,
                               paged_decode_attention=paged_decode_attention)
    raise ValueError(f"unknown kernel backend {backend!r} (expected 'triton' or 'torch')")
