"""CUDA graphs for tensor-parallel decode steps (tensor_parallel.py, tp_worker.py).

The same idea as cuda_graphs.py (a graph per batch bucket and LoRA rank bucket, padding rows
on two scratch pages, one LoRA segment per row, fixed-width tables), with two differences:
* every rank captures the same graphs in the same order at start-up, since each graph holds
  collectives that all ranks must run together (NCCL collectives may be captured: they are
  replayed like any kernel);
* a step's static buffers are filled on the device from the step's StepInputs, which every
  rank holds after rank 0's broadcast (tensor_parallel.pack_step); each rank then replays the
  graph of the same (bucket, rank bucket), chosen from host ints all ranks share.
"""

from __future__ import annotations

import os

import torch

from .cuda_graphs import DecodeGraphs
from .model_runner import ModelRunner, StepInputs

# Tests on CPU: run the graph path's static buffers eagerly (no capture), on every rank.
EAGER_ENV = "SLORA_TP_STATIC_DECODE"


def attach_tp_graphs(runner: ModelRunner, config, capture: bool, pages: int) -> None:
    """Give a rank's runner its decode graphs (all ranks call this at the same point of start-up)."""
    if not capture and os.environ.get(EAGER_ENV) != "1":
        return
    runner.tp_graphs = TPDecodeGraphs(runner, config.max_batch_size, config.max_rank, (pages, pages + 1), pages)
    if capture:
        runner.tp_graphs.capture()


class TPDecodeGraphs(DecodeGraphs):
    """DecodeGraphs whose graphs hold the tensor-parallel layers (collectives included) and
    whose static buffers are filled on the device from a broadcast StepInputs."""

    row_tables = False  # run_inputs copies the step's per-adapter tables as they come

    def covers(self, inp: StepInputs) -> bool:
        return (not inp.prefill and inp.input_ids.shape[0] <= self.sizes[-1]
                and inp.kv_table.shape[1] <= self.kv_table.shape[1]
                and (inp.lora is None or inp.lora.max_rank <= self.ranks[-1]))

    def _model(self, inputs: StepInputs) -> torch.Tensor | None:
        return self.runner.run_layers(inputs)  # logits on rank 0, None on workers

    def run_inputs(self, inp: StepInputs) -> torch.Tensor | None:
        """Logits (B, vocab) of a decode step by replay (None on workers). Device copies only."""
        n = inp.input_ids.shape[0]
        b = self.bucket(n)
        max_len = inp.kv_table.shape[1]
        self.input_ids[:n].copy_(inp.input_ids)
        self.positions[:n].copy_(inp.positions)
        self.k_pages[:n].copy_(inp.k_pages)
        self.v_pages[:n].copy_(inp.v_pages)
        self.seq_lens[:n].copy_(inp.seq_lens)
        self.kv_table[:n, :max_len].copy_(inp.kv_table)
        if n < b:  # padding rows: one scratch token each, written to the scratch pages
            self.input_ids[n:b] = 0
            self.positions[n:b] = 0
            self.k_pages[n:b] = self.scratch_k
            self.v_pages[n:b] = self.scratch_v
            self.seq_lens[n:b] = 1
            self.kv_table[n:b, 0, 0], self.kv_table[n:b, 0, 1] = self.scratch_k, self.scratch_v
        rank = modules = 0
        lora = inp.lora
        if lora is not None:
            rank = next(r for r in self.ranks if r >= lora.max_rank)
            modules = self.modules_class(lora.modules)
            a = lora.ranks.shape[1]
            lengths = lora.seg_starts[1:] - lora.seg_starts[:-1]
            self.seg_adapter[:n] = torch.repeat_interleave(lora.seg_adapter, lengths, output_size=n)
            self.seg_adapter[n:b] = -1
            # Columns past `a` keep stale values: no row of this step points at them.
            self.lora_ints[0, :, :a].copy_(lora.ranks)
            self.lora_ints[1, :, :a].copy_(lora.a_starts)
            self.lora_ints[2, :, :a].copy_(lora.b_starts)
            self.scales[:, :a].copy_(lora.scales)
            self.page_ids[: lora.page_ids.shape[0]].copy_(lora.page_ids)
        return self.replay(n, b, rank, modules)
