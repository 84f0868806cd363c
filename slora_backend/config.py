"""Engine configuration: one dataclass, filled from config.pbtxt parameters or keyword args."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class EngineConfig:
    model_dir: str
    adapter_dir: str | None = None  # adapters are looked up here by name on first use
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA; or float32/float16/bfloat16
    device: str = "auto"  # auto = cuda when available, else cpu
    kernel_backend: str = "auto"  # auto = triton on cuda, torch on cpu; or triton / torch
    pool_pages: int = 0  # pages in the unified pool; 0 = size from memory below
    gpu_memory_fraction: float = 0.93  # on CUDA: weights + pool + activation reserve take this share
    cpu_pool_mb: int = 512  # on CPU with pool_pages = 0: pool size in MiB
    max_rank: int = 64  # adapters of a larger rank are refused
    max_batch_size: int = 256  # running requests at once
    max_prefill_tokens: int = 4096  # prompt tokens in one prefill step (one longer prompt still runs alone)
    # Running requests decode their next token inside prefill steps instead of waiting for
    # them (scheduler.py); false = separate prefill and decode steps.
    mix_decode_in_prefill: bool = True
    # With the batch full, wait until this many slots are free (or as many requests as wait)
    # before admitting: each admission makes the step an eager prefill (60-93 ms on H200 at a
    # batch of 256) instead of a graph-replayed decode (~20 ms). 1 = admit as soon as one slot frees.
    admit_min_batch: int = 8
    # ... but never defer admission more than this many steps in a row (bounds the added wait).
    admit_max_wait_steps: int = 16
    # Below a full batch, while requests run, newcomers wait up to this many (graph-replayed
    # decode) steps to be admitted together: an eager mixed step costs about as much host time
    # for one prompt as for several (BENCHMARKS.md item 21). 0 = admit at the next step.
    admit_gather_steps: int = 4
    # In those mixed steps, the decode rows' LoRA runs on the MBGMV kernels (per-row, as in
    # decode graphs) and the prompt rows' on MBGMM, instead of every row on MBGMM (one-row
    # segments: too few, too long programs). Compiled at start-up either way. false = the
    # combined path (benchmark A/B).
    lora_decode_rows_gmv: bool = True
    # The same under tensor parallelism (both parts share each LoRA point's collective:
    # tensor_parallel.TPLoraStep). Off by default: on 2 x H200 (13B, S4, 40 req/s) it lost
    # throughput, 20.12 -> 18.89 req/s with admission batching, 14.02 -> 13.02 without; its
    # mixed steps were faster with the LoRA collectives skipped (78 against 88 ms) but slower
    # with them (104 against 93 ms), which is not understood yet (BENCHMARKS.md, item 17).
    tp_lora_decode_rows_gmv: bool = False
    # ... but only when those decode rows form at least this many adapter segments (runs of
    # one adapter; the scheduler sorts decode rows by adapter). MBGMV reads an adapter once per
    # row and costs two more launches per LoRA point, so a few long segments stay on MBGMM.
    # H200, S2: n=5 adapters (<= 6 segments) lost 3.5-4% with the split, n=1000 gained 5%.
    lora_decode_gmv_min_segments: int = 32
    # In decode graphs (one GPU), each LoRA point's shrink runs on a side stream beside its base
    # GEMM: both read the same input, and the latency-bound LoRA kernels use bandwidth the
    # GEMM leaves over (kernels/lora.py: lora_linear). false = one stream (benchmark A/B).
    lora_beside_gemm: bool = True
    max_queue: int = 1024  # waiting requests; beyond it submit() answers "busy"
    max_model_len: int = 0  # 0 = the model's max_position_embeddings
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    # The engine loop counts as hung (not alive to the health probe, so the watchdog reloads
    # the model) when one step or wait has lasted longer than this.
    engine_stall_timeout_s: float = 120.0
    cuda_graphs: bool = True  # on CUDA with the Triton kernels: replay decode steps from graphs
    # Schedule and launch the next step before reading the last (greedy) one's tokens: its
    # input ids for them are taken on the device, so scheduling, staging, launching,
    # detokenizing and streaming run while the GPU computes (engine.py _step_ahead). A request
    # that stops on EOS or a stop string costs one wasted row.
    overlap_decode: bool = True
    # GPUs of this host the model is split over (tensor parallelism; rank 0 runs in the engine,
    # one worker process per other GPU; gloo processes on CPU). 1 = one GPU.
    tensor_parallel_size: int = 1
    # Benchmarks only: leave out the LoRA collectives of tensor parallelism. Wrong outputs; it
    # times what those collectives cost.
    tp_skip_lora_collectives: bool = False
    # Host memory for adapter page images read from disk (LRU beyond it); <= 0 = unlimited.
    # Adapters registered in memory (dummy_adapters) are kept outside it: they have no disk copy.
    host_adapter_budget_mb: float = 4096.0
    max_upload_mb: float = 512.0  # largest adapter upload (config + safetensors) a request may carry
    # Benchmarks only: "N:RANKS:TARGETS" registers N random adapters adapter-00000.. at start,
    # ranks drawn from RANKS (e.g. 64,32,16,8), TARGETS qkvo or all. Empty = none.
    dummy_adapters: str = ""

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> EngineConfig:
        """Build from string parameters (Triton config.pbtxt); unknown keys are an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, raw in params.items():
            if key not in fields:
                raise ValueError(f"unknown engine parameter {key!r}; known: {sorted(fields)}")
            kind = fields[key].type
            value = raw.strip() if isinstance(raw, str) else raw
            if kind == "bool":
                if str(value).lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(f"parameter {key} must be true or false, got {value!r}")
                kwargs[key] = str(value).lower() in ("true", "1", "yes")
            elif "int" in kind and "str" not in kind:
                kwargs[key] = int(value)
            elif "float" in kind:
                kwargs[key] = float(value)
            elif "None" in kind and value in ("", "none", "None"):
                kwargs[key] = None
            else:
                kwargs[key] = value
        if "model_dir" not in kwargs:
            raise ValueError("parameter model_dir is required")
        return cls(**kwargs)
