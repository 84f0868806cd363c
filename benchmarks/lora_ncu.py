"""Launch the LoRA kernels of kernel_bench.py's B=256 S2 decode and 16 x 256 prefill cases a
few times, eagerly, for Nsight Compute to count (GPU):

    ncu --kernel-name regex:lora --launch-skip 4 --launch-count 4 --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats python3 benchmarks/lora_ncu.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_bench import PREFILL, S2, LoraCase, default_cfg  # noqa: E402

for seg_lens, ranks in (([1] * 256, [S2[i % 4] for i in range(256)]), (PREFILL[1], PREFILL[2])):
    case = LoraCase(seg_lens, ranks)
    shrink, expand, _ = case.parts(default_cfg(case))
    for _ in range(3):
        shrink()
        expand()
    torch.cuda.synchronize()
