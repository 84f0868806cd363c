"""Per-step LoRA metadata shared by the engine and the kernels (see docs/DESIGN.md)."""

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


@dataclass
class LoraBatch:
    seg_starts: Tensor   # (S+1,) int32: segment s covers rows [seg_starts[s], seg_starts[s+1])
    seg_adapter: Tensor  # (S,) int32: index a into the step's adapter list; -1 = base model only
    ranks: Tensor        # (7, A) int32: rank of adapter a on module m; 0 = not targeted
    scales: Tensor       # (7, A) float32: lora_alpha / r (or / sqrt(r) for rsLoRA)
    a_starts: Tensor     # (7, A) int32: offset into page_ids of module m's A rows
    b_starts: Tensor     # (7, A) int32: offset into page_ids of module m's B^T rows
    page_ids: Tensor     # (total,) int32
    max_rank: int        # largest rank in the step (host int)
    max_seg_len: int     # bound on segment length (host int): 1 in graph decode; eager steps use >= 5 (MBGMM)
    modules: int = ALL_MODULES  # host bitmask: modules some adapter of the step targets
    # Launch configurations already chosen for this step, by projection shape (kernels/lora.py:
    # step_config): every layer asks the same question, and an eager step asks it ~64 times.
    configs: dict = field(default_factory=dict, init=False, repr=False, compare=False)
