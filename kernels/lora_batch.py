"""Per-step LoRA metadata shared by the engine and the kernels (see docs/DESIGN.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Bit m of LoraBatch.modules = module m targeted by some adapter of the step. The model skips
# a LoRA point no adapter targets: half the launches (and, under tensor parallelism, half the
# collectives) of a step whose adapters are q,k,v,o only, as in S-LoRA's workloads.
ALL_MODULES = (1 << len(MODULES)) - 1
ATTENTION_MODULES = 0b0001111  # q, k, v, o


def module_bits(module_ids) -> int:
    return sum(1 << m for m in module_ids)


def rank_buckets(max_rank: int) -> list[int]:
    """The max_rank values MBGMV steps are rounded up to (8, 16, 32, ..., max_rank): block
    shapes follow the bucket, so each bucket is one set of compiled kernel variants (decode
    graphs: one graph per bucket; eager steps' decode parts: warmed up per bucket)."""
    buckets, r = [], 8
    while r < max_rank:
        buckets.append(r)
        r *= 2
    return buckets + [max_rank]


@dataclass
class LoraBatch:
    seg_starts: Tensor   # (S+1,) int32: segment s covers rows [seg_starts[s], seg_starts[s+1])
    seg_adapter: Tensor  # (S,) int32: index a into the step's adapter list; -1 = base model only
    ranks: Tensor        # (7, A) int32: rank of adapter a on module m; 0 = not targeted
    scales: Tensor       # (7, A) float32: lora_alpha / r (or / sqrt(r) for rsLoRA)
    a_starts: Tensor     # (7, A) int32: offset into page_ids of module m's A rows
    b_starts: Tensor     # (7, A) int32: offset into page_ids of module m's B^T rows
    page_ids: Tensor     # (total,) int32
    max_rank: int        # largest rank of this batch's segments (host int); 0: nothing to launch
    max_seg_len: int     # bound on segment length (host int): 1 in graph decode; eager steps use >= 5 (MBGMM)
    modules: int = ALL_MODULES  # host bitmask: modules some adapter of the step targets
    # Eager steps with prompt rows and adapter decode rows (one row per running request, at the
    # end): those rows run on the MBGMV kernels, as in a decode graph, instead of as one-row
    # MBGMM segments (too few, too long programs). `decode` describes rows >= decode_start
    # (its seg_starts count from decode_start, one segment per row, max_seg_len 1, max_rank a
    # rank bucket) with this batch's adapter tables; this batch's segments end at decode_start.
    decode: LoraBatch | None = None
    decode_start: int = 0
    # Set on such a decode part: its ints change every step, so the MBGMV launches take the
    # kernels' unspecialised forms (kernels/launch.py); graph decode keeps them specialised.
    eager_decode: bool = False
    # Decode graphs (cuda_graphs.py): one row per segment, segment s on column s of the
    # tables (ranks, starts and scales gathered per row; base and padding rows rank 0, and
    # seg_adapter s or -1). The MBGMV kernels then skip the segment tables: one dependent
    # load fewer before their first weight byte.
    rows_are_adapters: bool = False
    # Launch configurations already chosen for this step, by projection shape (kernels/lora.py:
    # step_config): every layer asks the same question, and an eager step asks it ~64 times.
    configs: dict = field(default_factory=dict, init=False, repr=False, compare=False)
