"""CUDA graphs for decode steps: the whole forward replayed from static buffers.

A decode step of a 7B model issues ~1,000 kernel launches; from Python that takes longer than
the GPU needs to run them (docs/DESIGN.md, BENCHMARKS.md). So each decode batch size (rounded
up to a bucket) is captured once per LoRA rank bucket (and once without LoRA), and a step only
copies its inputs into the static buffers and replays.

What stays fixed in a graph, and how the step's data fits it:
* rows: padded to the bucket; padding rows read and write two scratch pages past the
  allocator's range, use no adapter, and are never sampled.
* LoRA: one segment per row (so `max_seg_len` = 1, the MBGMV path); the adapter tables have
  a fixed width (the largest bucket) and `page_ids` the pool's size; `max_rank` is the rank
  bucket, which sets block shapes: smaller buckets waste fewer lanes.
* the KV table has `max_model_len` columns; only each row's first `seq_len` are read.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from kernels.lora_batch import ALL_MODULES, ATTENTION_MODULES, LoraBatch, rank_buckets

from .adapter_cache import AdapterCache
from .model_runner import ModelRunner, StepInputs
from .scheduler import ScheduledStep

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    # stage() writes per-row LoRA tables (LoraBatch.rows_are_adapters); a subclass that fills
    # the buffers another way says whether its tables are per row.
    row_tables = True

    def __init__(self, runner: ModelRunner, max_batch: int, max_rank: int, scratch_pages: tuple[int, int],
                 num_pages: int):
        self.runner = runner
        self.sizes = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self.ranks = rank_buckets(max_rank)
        B, L, dev = self.sizes[-1], runner.max_model_len, runner.device
        self.scratch_k, self.scratch_v = scratch_pages
        # Static device buffers (views of them are what the graphs read).
        self.input_ids = torch.zeros(B, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(B, dtype=torch.int64, device=dev)
        self.k_pages = torch.full((B,), self.scratch_k, dtype=torch.int32, device=dev)
        self.v_pages = torch.full((B,), self.scratch_v, dtype=torch.int32, device=dev)
        self.kv_table = torch.zeros(B, L, 2, dtype=torch.int32, device=dev)
        self.kv_table[..., 0], self.kv_table[..., 1] = self.scratch_k, self.scratch_v
        self.seq_lens = torch.ones(B, dtype=torch.int32, device=dev)
        self.last_rows = torch.arange(B, dtype=torch.int64, device=dev)
        self.seg_starts = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.seg_adapter = torch.full((B,), -1, dtype=torch.int32, device=dev)
        self.lora_ints = torch.zeros(3, 7, B, dtype=torch.int32, device=dev)  # ranks, a_starts, b_starts
        self.scales = torch.zeros(7, B, dtype=torch.float32, device=dev)
        self.page_ids = torch.zeros(max(num_pages, 1), dtype=torch.int32, device=dev)
        # Pinned host staging: one async copy per buffer per step.
        pin = dev.type == "cuda"
        self.h_rows = torch.zeros(5, B, dtype=torch.int64, pin_memory=pin)  # ids, pos, k, v, seq_len
        self.h_seg_adapter = torch.zeros(B, dtype=torch.int32, pin_memory=pin)
        self.h_lora_ints = torch.zeros(3, 7, B, dtype=torch.int32, pin_memory=pin)
        self.h_scales = torch.zeros(7, B, dtype=torch.float32, pin_memory=pin)
        self.h_table = torch.zeros(B, L * 2, dtype=torch.int32, pin_memory=pin)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mempool = None
        # Marks the last step's copies out of the pinned staging buffers: the next step may be
        # staged while that one is still queued (Engine's overlap), and must not overwrite them first.
        self._staged = torch.cuda.Event() if pin else None

    def bucket(self, batch: int) -> int | None:
        for b in self.sizes:
            if b >= batch:
                return b
        return None

    def _inputs(self, b: int, rank: int, modules: int = 0) -> StepInputs:
        lora = None
        if rank:
            lora = LoraBatch(seg_starts=self.seg_starts[: b + 1], seg_adapter=self.seg_adapter[:b],
                             ranks=self.lora_ints[0], scales=self.scales, a_starts=self.lora_ints[1],
                             b_starts=self.lora_ints[2], page_ids=self.page_ids, max_rank=rank, max_seg_len=1,
                             modules=modules, rows_are_adapters=self.row_tables)
        return StepInputs(prefill=False, input_ids=self.input_ids[:b], positions=self.positions[:b],
                          k_pages=self.k_pages[:b], v_pages=self.v_pages[:b], last_rows=self.last_rows[:b],
                          seq_bounds=[], kv_table=self.kv_table[:b], seq_lens=self.seq_lens[:b], lora=lora)

    def capture(self) -> None:
        t0 = time.monotonic()
        self.mempool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for b in reversed(self.sizes):  # largest first: later graphs reuse its memory
            for rank, modules in self.variants():
                inputs = self._inputs(b, rank, modules)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):  # compile kernels, settle the allocator (and NCCL) outside capture
                        self._model(inputs)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.mempool):
                    logits = self._model(inputs)
                self.graphs[(b, rank, modules)] = (graph, logits)
        torch.cuda.synchronize()
        log.info("%s: captured %d decode CUDA graphs (batch buckets up to %d, rank buckets %s) in %.1fs",
                 type(self).__name__, len(self.graphs), self.sizes[-1], self.ranks, time.monotonic() - t0)

    def variants(self) -> list[tuple[int, int]]:
        """(rank bucket, LoRA modules) of the graphs of each batch bucket: no LoRA, then per rank
        bucket a graph with the attention LoRA points only (adapters on q,k,v,o, as in S-LoRA's
        workloads: half the LoRA launches) and one with all seven."""
        return [(0, 0)] + [(r, m) for r in self.ranks for m in (ATTENTION_MODULES, ALL_MODULES)]

    @staticmethod
    def modules_class(modules: int) -> int:
        """The graph variant serving a step whose adapters target `modules`."""
        return ATTENTION_MODULES if modules & ~ATTENTION_MODULES == 0 else ALL_MODULES

    def _model(self, inputs: StepInputs) -> torch.Tensor | None:
        """What a graph captures: the whole forward (tensor parallelism replaces it)."""
        return self.runner.forward(inputs)

    def run(self, step: ScheduledStep, adapters: AdapterCache, fill=None) -> torch.Tensor:
        """Logits (B, vocab) of a decode step, by graph replay. `fill` = (rows, ids) device
        tensors overwriting those rows' input ids after staging (Engine._ids_from)."""
        n, b, rank, modules = self.stage(step, adapters)
        if fill is not None:
            self.input_ids.index_copy_(0, *fill)
        return self.replay(n, b, rank, modules)

    def stage(self, step: ScheduledStep, adapters: AdapterCache) -> tuple[int, int, int, int]:
        """Copy the step's inputs into the static buffers; returns (rows, bucket, rank bucket,
        LoRA modules class): the arguments of replay.

        Host work only, plus async copies: every per-request list is already a numpy row
        (PageList), so this is a few vector operations and one memcpy per request.
        """
        reqs = step.requests
        n = len(reqs)
        b = self.bucket(n)
        if self._staged is not None:
            self._staged.synchronize()  # in practice long done: the copies lead their step
        lens = np.fromiter((r.seq_len for r in reqs), dtype=np.int64, count=n)
        max_len = int(lens.max())
        table = self.h_table.numpy()
        for i, r in enumerate(reqs):
            table[i, : 2 * lens[i]] = r.kv_pages.array
        rows = self.h_rows.numpy()
        rows[:, n:b] = ((0,), (0,), (self.scratch_k,), (self.scratch_v,), (1,))  # padding rows
        rows[0, :n] = np.fromiter((r.last_id for r in reqs), dtype=np.int64, count=n)
        rows[1, :n] = lens - 1
        rows[2, :n] = table[np.arange(n), 2 * lens - 2]
        rows[3, :n] = table[np.arange(n), 2 * lens - 1]
        rows[4, :n] = lens
        h = self.h_rows
        self.input_ids[:b].copy_(h[0, :b], non_blocking=True)
        self.positions[:b].copy_(h[1, :b], non_blocking=True)
        self.k_pages[:b].copy_(h[2, :b], non_blocking=True)
        self.v_pages[:b].copy_(h[3, :b], non_blocking=True)
        self.seq_lens[:b].copy_(h[4, :b], non_blocking=True)
        self.kv_table.view(self.kv_table.shape[0], -1)[:n, : 2 * max_len].copy_(
            self.h_table[:n, : 2 * max_len], non_blocking=True)
        if n < b:  # padding rows: one scratch token each
            self.kv_table[n:b, 0, 0], self.kv_table[n:b, 0, 1] = self.scratch_k, self.scratch_v
        rank = modules = 0
        if any(r.adapter is not None for r in reqs):
            tables = adapters.lora_tables([r.adapter for r in reqs])
            rank = next(r for r in self.ranks if r >= tables.max_rank)
            modules = self.modules_class(tables.modules)
            # Per-row tables (LoraBatch.rows_are_adapters): row i reads column i, so the
            # kernels need not look its adapter up first. Base and padding rows get rank 0.
            adapter = np.asarray(tables.seg_adapter)
            base = adapter < 0
            seg = self.h_seg_adapter.numpy()
            seg[:b] = -1
            seg[:n] = np.where(base, -1, np.arange(n))
            ints, scales = self.h_lora_ints.numpy(), self.h_scales.numpy()
            ints[:, :, :n] = tables.ints[:, :, np.maximum(adapter, 0)]
            ints[0, :, :n][:, base] = 0
            ints[0, :, n:b] = 0
            scales[:, :n] = tables.scales[:, np.maximum(adapter, 0)]
            self.seg_adapter[:b].copy_(self.h_seg_adapter[:b], non_blocking=True)
            # Columns past b keep stale values: no row of this step reads them.
            self.lora_ints.copy_(self.h_lora_ints, non_blocking=True)
            self.scales.copy_(self.h_scales, non_blocking=True)
            torch.cat(tables.page_id_parts, out=self.page_ids[: tables.total_pages])
        if self._staged is not None:
            self._staged.record()
        return n, b, rank, modules

    def replay(self, n: int, b: int, rank: int, modules: int = 0) -> torch.Tensor | None:
        captured = self.graphs.get((b, rank, modules))
        if captured is None:  # not captured (CPU tests): run the same static inputs eagerly
            logits = self._model(self._inputs(b, rank, modules))
        else:
            graph, logits = captured
            graph.replay()
        return None if logits is None else logits[:n]
