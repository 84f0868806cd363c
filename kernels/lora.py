"""Multi-adapter LoRA for one projection group: shrink + expand, two launches in all (or, for
small ranks at decode when LoraLaunchConfig.fused is set, one fused launch: lora_fused.py)."""

import functools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .launch import KernelCall, cdiv, next_pow2, pdl_supported, register_group
from .lora_expand import expand_call
from .lora_fused import lora_fused
from .lora_shrink import shrink_call

# Segments this short are decode-like: per-row broadcast-multiply (MBGMV) beats padding
# them to the 16-row minimum of tl.dot (MBGMM).
GMV_MAX_SEG_LEN = 4


@dataclass(frozen=True)
class LoraLaunchConfig:
    block_m: int          # rows per program (1 on the MBGMV path)
    block_r: int          # shrink: ranks per program
    block_k: int          # shrink: input columns per step
    block_r_expand: int   # expand: covers the largest rank, loaded once per program
    block_n: int          # expand: output columns per step
    n_iters: int          # expand: column blocks per program
    use_dot: bool
    ieee: bool
    shrink_warps: int
    expand_warps: int
    split_k: int = 1
    k_per_split: int = 0  # columns of x per split, a multiple of block_k: use with_split_k
    shrink_stages: int = 0  # 0: Triton's default software-pipelining depth
    expand_stages: int = 0
    expand_block_m: int = 0  # MBGMM expand rows per program (0: block_m)
    shrink_unroll: bool = False  # MBGMV shrink: a split's K blocks as a fixed-count loop
    expand_unroll: bool = False  # MBGMV expand (and fused): column blocks as a fixed-count loop
    # Page ids loaded once per program, before its K (shrink, MBGMM) or column (expand) loop,
    # where the program's range lies inside one page.
    one_page: bool = True
    # The expand as a programmatic dependent launch of the shrink (Hopper+, CUDA only; see
    # lora_expand.py): it starts during the shrink's tail instead of after it.
    pdl: bool = True
    # Fused MBGMV kernel (lora_fused.py): one launch per LoRA point, no tmp. pick_config keeps
    # it off; it runs only when set and the step's rank bucket is <= fused_max_rank.
    fused: bool = False
    fused_max_rank: int = 16
    fused_splits: int = 0   # column ranges per (row, module); 0: pick_fused_splits
    fused_block_k: int = 0  # shrink columns per step; 0: a 4096-element tile (lora_fused.py)
    fused_warps: int = 4
    fused_stages: int = 0   # 0: Triton's default

    def with_split_k(self, in_width: int, split_k: int) -> "LoraLaunchConfig":
        k_blocks = cdiv(in_width, self.block_k)
        per_split = cdiv(k_blocks, max(1, min(split_k, k_blocks))) * self.block_k
        return replace(self, split_k=cdiv(in_width, per_split), k_per_split=per_split)


def _page_block(page_width: int, cap: int) -> int:
    """Largest power of two <= cap that divides the page, so a block stays in one page.

    Pages whose power-of-two factor is below 16 (never for real head dims) get a 32-wide
    block; the kernels then look up the page of every element instead of every block.
    """
    block = min(page_width & -page_width, cap)
    return block if block >= 16 else min(32, cap)


# Overrides of pick_config's choices, by path ("gmv": decode-like, "gmm": prefill, "gmv_small":
# decode-like steps of at most SMALL_BATCH segments, on top of "gmv"), for tuning runs: a JSON
# file {"gmv": {field: value}, "gmm": {...}} named by $SLORA_LORA_TUNING (written by
# benchmarks/kernel_bench.py --sweep); empty in normal use.
TUNED: dict[str, dict] = {"gmv": {}, "gmm": {}, "gmv_small": {}}
SMALL_BATCH = 64
if os.environ.get("SLORA_LORA_TUNING"):
    _table = json.loads(Path(os.environ["SLORA_LORA_TUNING"]).read_text())
    for _path, _overrides in TUNED.items():
        _overrides.update(_table.get(_path, {}))


def pick_config(max_seg_len: int, max_rank: int, page_width: int, in_width: int,
                dtype) -> LoraLaunchConfig:
    """Block shapes for the step; K is not split here (see split_k_for).

    Swept on an H200 (benchmarks/kernel_bench.py --sweep: Llama-7B, P = 4096, 4096 -> 4096,
    256 tokens on distinct S2 adapters / 16 x 256 prefill tokens, CUDA graphs, L2 flushed).
    """
    ieee = dtype == torch.float32
    rank_pow2 = next_pow2(max_rank)
    if max_seg_len <= GMV_MAX_SEG_LEN:
        # Shrink: rank blocks of 8 rows (a rank-8 adapter next to rank-64 ones idles no
        # lanes), 256 columns (512 B of a page row) per row and step, page ids loaded once
        # per page. Expand: one tile covering the rank bucket (rows past an adapter's rank
        # masked: no bytes read), 2 x 256 columns per program. At B=256 tokens on distinct
        # S2 adapters (P = 4096, 4096 -> 4096): shrink 30 us (the first version, 16 x 256
        # tiles reloading page ids per step: 46 us), expand 44 us, both 67 us; walking the
        # rank in blocks in the expand measured 45 us, tensor-core variants 53 + 86 us.
        # The shrink's K loop unrolled (512-column blocks, splits of 1024): 31.4 -> 28.6 us;
        # the expand's column loop unrolled: 46 -> 85 us at rank 64 (register spills), so not.
        block_r_expand = max(8, rank_pow2)
        cfg = LoraLaunchConfig(
            block_m=1, block_r=8, block_k=_page_block(page_width, 512), shrink_unroll=True,
            block_r_expand=block_r_expand,
            block_n=_page_block(page_width, min(256, max(32, 16384 // block_r_expand))),
            n_iters=2, use_dot=False, ieee=ieee, shrink_warps=4, expand_warps=2,
            shrink_stages=4, expand_stages=4,
            # The fused kernel stays OFF until a GPU measurement decides (kernel_bench.py
            # --variants: fused vs this default at B=256 r8/r16 and smaller batches; it was
            # written in a session without GPU time). Force it with $SLORA_LORA_TUNING
            # {"gmv": {"fused": true}}.
            fused=False,
            # Page ids loaded before the column loop made the expand slower here (B=256 S2:
            # 43.5 -> 58.6 us, sweep of 2026-11-22), unlike on the MBGMM path below; so did
            # the expand as a programmatic dependent launch (66.4 -> 75.6 us; a decode step
            # at B=256 27.9 -> 28.9 ms): its 250-register programs, parked on the wait, hold
            # the SM slots the shrink's last programs need.
            one_page=False, pdl=False)
        cfg = _tuned(cfg, "gmv")
        if cfg.fused and max_rank > cfg.fused_max_rank:
            # Larger ranks are bandwidth-bound; the fused kernel's A re-reads and its
            # (rank, BLOCK_K) product tile only pay off for small ones.
            cfg = replace(cfg, fused=False)
        return cfg.with_split_k(in_width, 1)
    # 16 x 256 tokens, S2 (kernel_bench.py --sweep --quick, H200): the page ids of a K split
    # (shrink) or column range (expand) loaded once before the loop instead of per block
    # (one_page) took the shrink from 31.3 to 20.8 us and the expand from 51.7 to 46.6 us:
    # the per-block id load sat on the loop's dependency chain, so the pipeliner could not
    # prefetch A and B^T as it does x and y. Best shapes with it: 64-row blocks for both,
    # 64-column K steps in 8 warps (stage depth 4; the 16-row blocks of short
    # prompts keep their 128-column steps, not re-swept), 16 column blocks of 64 per expand
    # program. The expand as a programmatic dependent launch of the shrink (pdl, default
    # on here): both kernels 67.3 -> 62.4 us. Two row-block sizes only: every block shape
    # is a variant the engine compiles before serving (warm-up), and LoRA's share of a
    # prefill is small.
    block_m = 16 if max_seg_len <= 16 else 64
    cfg = LoraLaunchConfig(
        block_m=block_m, block_r=min(max(16, rank_pow2), 64),
        block_k=_page_block(page_width, 64 if block_m == 64 else 128),
        block_r_expand=max(16, rank_pow2), block_n=_page_block(page_width, 64), n_iters=16,
        use_dot=True, ieee=ieee, shrink_warps=8 if block_m == 64 else 4, expand_warps=8,
        shrink_stages=4 if block_m == 64 else 0)
    return _tuned(cfg, "gmm").with_split_k(in_width, 1)


def _tuned(cfg: LoraLaunchConfig, path: str) -> LoraLaunchConfig:
    return replace(cfg, **{k: v for k, v in TUNED[path].items() if k != "split_k"})


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of `device`; 0 off CUDA (no K split there)."""
    if device.type != "cuda":
        return 0
    return _sm_count(device.index if device.index is not None else 0)


def split_k_for(cfg, segments: int, max_seg_len: int, max_rank: int, n_mod: int, in_width: int,
                sms: int) -> int:
    """Split K into parts of >= ~1K columns while the shrink grid is under 32 programs/SM
    (the kernels are latency bound: more programs in flight hide the page-table loads).
    Powers of two, so that a split of a power-of-two hidden size stays inside one page
    (what the unrolled MBGMV shrink needs). sms = 0 (CPU): no split."""
    if not sms:
        return 1
    programs = (segments * cdiv(max_seg_len, cfg.block_m) * n_mod
                * cdiv(max_rank, cfg.block_r))
    split = next_pow2(cdiv(32 * sms, max(programs, 1)))
    return max(1, min(split, next_pow2(cdiv(in_width, 1024)), 16))


_group_tables: dict = {}


def _group_table(module_ids, out_offsets, widths, device) -> torch.Tensor:
    # A handful of distinct groups per model: build each once so that a step does no
    # host-to-device copies (and stays CUDA-graph capturable).
    key = (tuple(module_ids), tuple(out_offsets), tuple(widths), str(device))
    table = _group_tables.get(key)
    if table is None:
        rows = [[m, o, w] for m, o, w in zip(module_ids, out_offsets, widths, strict=True)]
        table = torch.tensor(rows, dtype=torch.int32, device=device)
        register_group(table, module_ids)
        _group_tables[key] = table
    return table


def _group_of(module_ids, out_offsets, y_width: int, device) -> tuple[torch.Tensor, int]:
    """The (NMOD, 3) group table of a projection group whose output is y_width wide (each
    module's width runs to the next offset), and its widest module."""
    bounds = (*out_offsets[1:], y_width)
    widths = [end - off for off, end in zip(out_offsets, bounds, strict=True)]
    return _group_table(module_ids, out_offsets, widths, device), max(widths)


def _check_inputs(x, y, pool_layer, module_ids, out_offsets) -> None:
    """What the kernels assume of their tensors (they index with row strides only)."""
    assert pool_layer.stride() == (pool_layer.shape[1], 1), "pool_layer must have contiguous pages"
    assert x.stride(1) == 1 and y.stride(1) == 1, "x and y need unit column stride"
    assert x.dtype == pool_layer.dtype, "x and the pool must share the model dtype"
    assert x.shape[0] == y.shape[0] and len(module_ids) == len(out_offsets)


def lora_apply(x, y, pool_layer, batch, module_ids, out_offsets):
    """y[:, off_i : off_i + out_i] += scale * (x A_i^T) B_i^T per segment; y updated in place.

    x: (T, in), y: (T, sum out_i), pool_layer: (N, P); module_ids index MODULES, out_offsets
    give each module's first column in y (widths follow from the next offset / y's width).
    A batch with a decode part (LoraBatch.decode) runs its rows before decode_start on the
    MBGMM kernels and the decode rows on the MBGMV ones: two launches each.
    """
    if x.shape[0] == 0:
        return y
    _check_inputs(x, y, pool_layer, module_ids, out_offsets)
    page_width = pool_layer.shape[1]
    group, max_width = _group_of(module_ids, out_offsets, y.shape[1], x.device)
    for part_x, part_y, part in lora_parts(x, y, batch):
        cfg = step_config(part, len(module_ids), page_width, x.shape[1], x.dtype, x.device)
        run_lora(part_x, part_y, pool_layer, part, group, max_width, cfg)
    return y


def lora_linear(x, weight, pool_layer, batch, module_ids, out_offsets, side=None):
    """x @ weight^T plus the step's LoRA delta (lora_apply), as one projection group.

    `side`: a CUDA stream (decode graphs: ModelRunner.run_layers) on which the shrinks, which
    read only x, run beside the base GEMM; the expands follow both. A decode step's LoRA
    kernels are latency-bound (BENCHMARKS.md, Kernels) and the GEMM leaves bandwidth over, so
    in the captured graph the two branches overlap. Without `side` (eager steps: two stream
    switches per LoRA point would cost host time there) the GEMM, then lora_apply.
    """
    y_width = weight.shape[0]
    parts = lora_parts(x, x, batch) if side is not None and x.shape[0] else []
    if not parts or any(step_config(part, len(module_ids), pool_layer.shape[1], x.shape[1], x.dtype,
                                    x.device).fused for _, _, part in parts):
        return lora_apply(x, torch.nn.functional.linear(x, weight), pool_layer, batch, module_ids, out_offsets)
    _check_inputs(x, x, pool_layer, module_ids, out_offsets)  # y is the GEMM's fresh output
    page_width = pool_layer.shape[1]
    group, max_width = _group_of(module_ids, out_offsets, y_width, x.device)
    plan = []
    for part_x, _, part in parts:
        cfg = step_config(part, len(module_ids), page_width, x.shape[1], x.dtype, x.device)
        # Allocated on the main stream, which also frees them (after the expands).
        tmp = torch.empty((cfg.split_k, part_x.shape[0], len(module_ids), part.max_rank),
                          dtype=torch.float32, device=x.device)
        plan.append((cfg, tmp, shrink_call(part_x, tmp, pool_layer, part, group, cfg)))
    main = torch.cuda.current_stream(x.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for _, _, shrink in plan:
            shrink.run()
    y = torch.nn.functional.linear(x, weight)
    main.wait_stream(side)
    for (cfg, tmp, _), (_, part_y, part) in zip(plan, lora_parts(x, y, batch), strict=True):
        expand_call(part_y, tmp, pool_layer, part, group, max_width, cfg).run()
    return y


def lora_parts(x, y, batch) -> list[tuple[torch.Tensor, torch.Tensor, object]]:
    """(x rows, y rows, LoraBatch) of each kernel path of the step, parts without LoRA left
    out: the whole step, or with a decode part the rows before decode_start and the decode
    rows. Row views: the kernels take row strides, and a real model's rows are whole multiples
    of 16 bytes, so a view starts 16-byte aligned like the whole tensor (the pointer
    specialisation the warm-up compiled: tests/test_kernel_variants.py)."""
    parts = []
    decode = batch.decode
    if decode is not None:
        n = batch.decode_start
        if batch.max_rank and n:
            parts.append((x[:n], y[:n], batch))
        if decode.max_rank:
            parts.append((x[n:], y[n:], decode))
    elif batch.max_rank:
        parts.append((x, y, batch))
    return parts


def step_config(batch, n_mod: int, page_width: int, in_width: int, dtype, device):
    """The launch configuration lora_apply uses for this step (K split included); chosen once
    per step and projection shape (LoraBatch.configs), not once per layer."""
    key = (n_mod, page_width, in_width, dtype, device)
    cfg = batch.configs.get(key)
    if cfg is None:
        cfg = batch.configs[key] = launch_config(batch.seg_adapter.shape[0], batch.max_seg_len, batch.max_rank,
                                                 n_mod, page_width, in_width, dtype, sm_count(device),
                                                 batch.eager_decode)
    return cfg


def launch_config(segments: int, max_seg_len: int, max_rank: int, n_mod: int, page_width: int, in_width: int,
                  dtype, sms: int, eager_decode: bool = False) -> LoraLaunchConfig:
    """pick_config and the K split for a batch of that shape on a GPU of `sms` SMs (0: CPU)."""
    cfg = pick_config(max_seg_len, max_rank, page_width, in_width, dtype)
    small = max_seg_len <= GMV_MAX_SEG_LEN and segments <= SMALL_BATCH and TUNED["gmv_small"]
    if small:
        cfg = _tuned(cfg, "gmv_small")
    if eager_decode:
        # The fused kernel has one (specialised, graph) form: eager decode rows take shrink + expand.
        cfg = replace(cfg, fused=False)
    path = "gmv" if max_seg_len <= GMV_MAX_SEG_LEN else "gmm"
    split_k = ((small and TUNED["gmv_small"].get("split_k")) or TUNED[path].get("split_k")
               or split_k_for(cfg, segments, max_seg_len, max_rank, n_mod, in_width, sms))
    return cfg.with_split_k(in_width, split_k)


def eager_decode_warmups(groups, page_width: int, dtype, ranks, max_rows: int, sms: int,
                         tp_size: int = 1) -> list[tuple[int, int]]:
    """(rank bucket, decode rows) of warm-up steps that launch every MBGMV variant the decode
    part of an eager step (LoraBatch.decode) can take: per rank bucket, one step per distinct
    set of K splits that 1..max_rows decode rows give the projection `groups` ((n_mod,
    in_width, column-split) each) on a GPU of `sms` SMs. Block shapes follow the bucket and the
    unrolled shrink's trip count the split; the kernels' other ints are unspecialised there.
    Under tensor parallelism (tp_size > 1) a column-split group shrinks ceil(rank / tp_size)
    rank rows per GPU (slora_backend/tensor_parallel.py)."""
    steps: dict = {}
    for rank in ranks:
        for rows in range(1, max_rows + 1):
            splits = tuple(launch_config(rows, 1, cdiv(rank, tp_size) if column else rank, n_mod, page_width,
                                         in_width, dtype, sms, eager_decode=True).k_per_split
                           for n_mod, in_width, column in groups)
            steps.setdefault((rank, splits), rows)
    return [(rank, rows) for (rank, _), rows in steps.items()]


def pick_fused_splits(batch, n_mod: int, max_width: int, device) -> int:
    """Column ranges per (row, module) for the fused kernel: the fewest (a power of two)
    that give about 2 programs per SM, ranges of >= 512 columns. Each range re-reads A and x
    (lora_fused.py: bytes against parallelism); a guess until kernel_bench.py --variants has
    timed 1/2/4/8 on a GPU."""
    if device.type != "cuda":
        return 1
    programs = batch.seg_adapter.shape[0] * batch.max_seg_len * n_mod
    target = 2 * _sm_count(device.index if device.index is not None else 0)
    split = next_pow2(cdiv(target, programs))
    return max(1, min(split, max_width // 512))


def run_lora(x, y, pool_layer, batch, group, max_width, cfg):
    """The launches with an explicit configuration (tests force paths and splits): the
    fused kernel when cfg.fused and the step is on the MBGMV path, else shrink + expand."""
    if cfg.fused and not cfg.use_dot and cfg.block_m == 1:
        splits = cfg.fused_splits or pick_fused_splits(batch, group.shape[0], max_width, x.device)
        return lora_fused(x, y, pool_layer, batch, group, max_width, cfg, splits)
    for call in lora_calls(x, y, pool_layer, batch, group, max_width, cfg):
        call.run()
    return y


def lora_calls(x, y, pool_layer, batch, group, max_width, cfg) -> list[KernelCall]:
    """The two launches of the shrink + expand path (kernels/launch.py), tmp allocated."""
    tmp = torch.empty((cfg.split_k, x.shape[0], group.shape[0], batch.max_rank),
                      dtype=torch.float32, device=x.device)
    pdl = cfg.pdl and pdl_supported(x.device)
    return [shrink_call(x, tmp, pool_layer, batch, group, cfg, pdl),
            expand_call(y, tmp, pool_layer, batch, group, max_width, cfg, pdl)]
