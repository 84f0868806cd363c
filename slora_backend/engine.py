"""The engine: one thread that loops schedule -> run -> sample -> stream, and its public API.

Callers (the Triton model, benchmarks, tests) use `submit`/`generate`, `cancel` and `stats`
from any thread; only the engine thread touches the scheduler, the pool and the model.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from kernels import get_ops
from kernels.launch import compiled_variants

from .adapter_cache import AdapterCache
from .adapters import (
    ADAPTER_NAME_RE,
    AdapterError,
    HostAdapter,
    describe_on_disk,
    install_upload,
    resolve_adapter_dir,
    stage_upload,
    validate_name,
)
from .checkpoint import ModelSpec, load_base_weights, read_spec
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs, rank_buckets
from .detokenizer import IncrementalDetokenizer
from .dummy import dummy_spec, dummy_weights, is_dummy, register_dummy_adapters
from .model_runner import ModelRunner
from .page_pool import PagePool
from .request import (
    FinishReason,
    OutputCallback,
    Request,
    RequestError,
    RequestOutput,
    SamplingParams,
    Status,
)
from .sampler import PendingTokens, Sampler
from .scheduler import ScheduledStep, Scheduler
from .tensor_parallel import ShardedAdapterCache, pool_capacity
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if config.dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto, float32, float16 or bfloat16, got {config.dtype!r}")
    return _DTYPES[config.dtype]


class _Tracked:
    """Per-request streaming state kept next to the scheduler's Request."""

    def __init__(self, req: Request, detok: IncrementalDetokenizer, stops: list[str]):
        self.req = req
        self.detok = detok
        self.stops = stops
        self.held = ""  # text not yet sent: it could be the start of a stop string
        self.sent_ids = 0  # output ids already streamed


@dataclass
class _Launched:
    """A step whose GPU work is queued: its tokens arrive with `tokens`."""

    step: ScheduledStep
    tokens: PendingTokens | list[int]
    t0: float  # when its host work began
    rows: dict[int, int] | None = None  # request id -> row: set when the next step may overlap it


class Engine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        self.config = config
        self.device = resolve_device(config)
        self.dtype = resolve_dtype(config, self.device)
        backend = config.kernel_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        self.kernel_backend = backend
        t0 = time.monotonic()
        tp_size = config.tensor_parallel_size
        self.tp = None  # tp_worker.TPLeader with tensor parallelism (docs/DESIGN.md)
        if is_dummy(config.model_dir):  # benchmarks: random weights of a named shape, token ids only
            self.spec: ModelSpec = dummy_spec(config.model_dir, config.max_model_len or 4096)
        else:
            self.spec = read_spec(config.model_dir)
            if tokenizer is None:
                tokenizer = load_tokenizer(config.model_dir)
        if tp_size > 1:  # workers spawned first: they load their shards while rank 0 loads its own
            from .tp_worker import TPLeader

            self.tp = TPLeader(config, self.spec, self.device, self.dtype, backend)
            self.device = self.tp.device
        if is_dummy(config.model_dir):
            weights = dummy_weights(self.spec, self.dtype, self.device, tp_size=tp_size)
        else:
            weights = load_base_weights(config.model_dir, self.spec, self.dtype, self.device, tp_size=tp_size)
        self.max_model_len = config.max_model_len or self.spec.max_position
        self.tokenizer = tokenizer
        self._tok_lock = threading.Lock()
        s = self.spec
        run_spec = s if self.tp is None else self.tp.local_spec  # the shapes this process computes
        if self.tp is None:
            pages = self._pool_pages()
        else:
            pages = self.tp.agree_pool_pages(pool_capacity(config, run_spec, self.dtype, self.device))
        use_graphs = config.cuda_graphs and self.device.type == "cuda" and backend == "triton"
        # With CUDA graphs, two scratch pages past the allocator's range absorb padding rows
        # (always there with tensor parallelism, whose static decode path is also tested on CPU).
        extra = 2 if use_graphs or self.tp is not None else 0
        self.pool_tensor = torch.zeros(s.layers, pages + extra, run_spec.page_width, dtype=self.dtype,
                                       device=self.device)
        self.pool = PagePool(pages)
        cache_args = (s, self.dtype, self.pool, self.pool_tensor, config.adapter_dir, config.max_rank,
                      int(config.host_adapter_budget_mb * 2**20))
        if self.tp is None:
            self.adapters = AdapterCache(*cache_args)
        else:
            self.adapters = ShardedAdapterCache(*cache_args, tp_size=tp_size, send=self.tp.send)
        self.scheduler = Scheduler(self.pool, self.adapters, config.max_batch_size,
                                   config.max_prefill_tokens, mix_decode=config.mix_decode_in_prefill,
                                   admit_min_batch=config.admit_min_batch,
                                   admit_max_wait_steps=config.admit_max_wait_steps,
                                   admit_gather_steps=config.admit_gather_steps)
        self.scheduler.on_adapter_error = self._adapter_failed
        self.runner = ModelRunner(run_spec, weights, self.pool_tensor, get_ops(backend), self.max_model_len,
                                  tp=None if self.tp is None else self.tp.group,
                                  lora_decode_rows_gmv=config.lora_decode_rows_gmv and (
                                      self.tp is None or config.tp_lora_decode_rows_gmv),
                                  gmv_min_segments=config.lora_decode_gmv_min_segments,
                                  lora_beside_gemm=config.lora_beside_gemm)
        self.sampler = Sampler(self.device)
        self.graphs: DecodeGraphs | None = None
        if use_graphs and self.tp is None:
            self.graphs = DecodeGraphs(self.runner, config.max_batch_size, config.max_rank, (pages, pages + 1),
                                       pages)
            self.graphs.capture()
        if self.tp is not None:  # every rank captures the same graphs, together (collectives inside)
            from .tp_graphs import attach_tp_graphs

            attach_tp_graphs(self.runner, config, use_graphs, pages)
            self.tp.expect("ready")
        if self.device.type == "cuda" and backend == "triton":
            # Prefill (and mixed) steps run eagerly: compile their kernel variants now, not while
            # a request waits (kernels/launch.py). Seconds on a first start, then Triton's disk cache.
            t1 = time.monotonic()
            forwards = self.runner.warm_up_eager(rank_buckets(config.max_rank), config.max_batch_size)
            log.info("eager-step kernels ready (%d warm-up forwards) in %.1fs", forwards, time.monotonic() - t1)
        self._variants_at_start = compiled_variants()
        if self.device.type == "cuda":  # start-up's work on the pool is done before the first step
            torch.cuda.synchronize(self.device)  # (adapter copies wait only for steps: StepFences)
        if self.tp is not None:  # workers count their own compiles from here (tp_worker.py)
            self.tp.send(("serving",))
        self._adapter_lock = threading.Lock()  # host registry is filled from caller threads
        self._unloaded: set[str] = set()  # refused for new requests until loaded again
        self.requests_served: dict[str, int] = {}  # finished requests per adapter
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._tracked: dict[int, _Tracked] = {}
        self._pending = 0  # submitted, not yet finished (bounded by max_queue + running)
        self._pending_lock = threading.Lock()
        self._stop = False
        self._error: BaseException | None = None
        self.steps = 0
        self.generated_tokens = 0
        self._beat = time.monotonic()  # the engine loop's last round (healthy())
        # Wall time of steps by kind (host view, sampling's device sync included): where a
        # serving run's time goes. kind -> [steps, seconds, tokens computed]
        self.step_time = {"prefill": [0, 0.0, 0], "decode": [0, 0.0, 0]}
        self.mixed_steps = 0  # prefill steps that also decoded running requests
        # Overlap (config.overlap_decode): the next step is scheduled and launched while the last
        # (greedy) one still runs on the GPU, whose tokens the host then reads and streams.
        self._inflight: _Launched | None = None
        self._last_done = 0.0  # when the last step's tokens were processed
        self.overlapped_steps = 0  # steps launched before the previous one's tokens were read
        self.overlapped_prefill_steps = 0  # ... of which prefill (mixed) steps
        self.gpu_wait_s = 0.0  # host time spent waiting for a step's tokens (device-bound share)
        # The engine thread's own time by phase (perf_counter, no profiler): where a host-bound
        # run goes. Launches are split by step kind, since eager (prefill) steps cost the most.
        self.host_s = {"schedule": 0.0, "launch_prefill": 0.0, "launch_decode": 0.0, "stream": 0.0}
        log.info("engine ready in %.1fs: %s layers=%d hidden=%d heads=%d/%d on %s %s, kernels=%s, "
                 "pool %d pages x %d (%.1f MiB)", time.monotonic() - t0, config.model_dir, s.layers,
                 s.hidden, s.heads, s.kv_heads, self.device, self.dtype, backend, pages, s.page_width,
                 self.pool_tensor.numel() * self.pool_tensor.element_size() / 2**20)
        if config.dummy_adapters:
            register_dummy_adapters(self, config.dummy_adapters)
        if self.tp is not None:
            self.tp.on_failure = self._tp_failed  # from now on a dead worker stops the engine
            if self.tp.failed is not None:
                self.tp.shutdown()
                raise RuntimeError(self.tp.failed)
        self._thread = threading.Thread(target=self._loop, name="slora-engine", daemon=True)
        self._thread.start()

    def _pool_pages(self) -> int:
        return pool_capacity(self.config, self.spec, self.dtype, self.device)

    # -- public API ----------------------------------------------------------------------
    def submit(self, *, prompt: str | None = None, prompt_ids: list[int] | None = None,
               adapter: str | None = None, params: SamplingParams | None = None,
               on_output: OutputCallback, chat: bool = False) -> int:
        """Queue a request; its outputs go to on_output (called from the engine thread)."""
        if not self.is_alive():
            raise RequestError(f"engine is not running: {self._error!r}")
        params = params or SamplingParams()
        params.validate(self.config.max_tokens_limit)
        ids = self._prompt_ids(prompt, prompt_ids, chat)
        adapter = adapter or None
        adapter_pages = 0
        if adapter is not None:
            with self._adapter_lock:
                if adapter in self._unloaded:
                    raise RequestError(f"adapter {adapter!r} is unloaded; load it again to use it")
                try:
                    adapter_pages = self.adapters.prefetch(adapter).n_pages
                except AdapterError as e:
                    raise RequestError(str(e)) from None
        total_len = min(len(ids) + params.max_tokens, self.max_model_len)
        need = 2 * total_len + adapter_pages
        if need > self.pool.num_pages:
            raise RequestError(f"request needs {need} pool pages ({total_len} tokens + adapter), "
                               f"the pool has {self.pool.num_pages}: lower max_tokens or the prompt")
        req = Request(prompt_ids=ids, params=params, adapter=adapter, on_output=on_output)
        with self._pending_lock:
            # Under the lock that the dying loop takes to set _stop: a request is either queued
            # before its final drain (and failed there) or refused here, never left unanswered.
            if self._stop:
                raise RequestError(f"engine is not running: {self._error!r}")
            if self._pending >= self.config.max_queue + self.config.max_batch_size:
                raise RequestError("server busy: request queue is full, retry later")
            self._pending += 1
            self._inbox.put(("add", req))
        self._wake.set()
        return req.request_id

    def generate(self, **kwargs) -> Iterator[RequestOutput]:
        """Blocking iterator over a request's outputs (same arguments as submit)."""
        out: queue.SimpleQueue = queue.SimpleQueue()
        self.submit(on_output=out.put, **kwargs)
        while True:
            item = out.get()
            yield item
            if item.finished:
                return

    def cancel(self, request_id: int) -> None:
        self._inbox.put(("cancel", request_id))
        self._wake.set()

    # -- adapter lifecycle (no restart) -----------------------------------------------------
    def load_adapter(self, name: str) -> dict:
        """Read and validate adapter `name` from the adapter directory into host memory."""
        with self._adapter_lock:
            try:
                validate_name(name)
                self._unloaded.discard(name)
                self.call_in_engine(lambda: self.adapters.dropping.discard(name))
                self.adapters.get_host(name)
            except AdapterError as e:
                raise RequestError(str(e)) from None
        return self._adapter_entry(name)

    def unload_adapter(self, name: str) -> dict:
        """New requests for `name` are refused; running ones finish, then its memory is freed."""
        with self._adapter_lock:
            try:
                validate_name(name)
            except AdapterError as e:
                raise RequestError(str(e)) from None
            if not self.adapters.known(name):  # still on disk only: unloading it blocks its first use
                try:
                    resolve_adapter_dir(self.config.adapter_dir, name)
                except AdapterError:
                    raise RequestError(f"adapter {name!r} is not loaded") from None
            self._unloaded.add(name)
        self.call_in_engine(lambda: self.adapters.drop(name))
        return {"name": name, "unloaded": True}

    def upload_adapter(self, name: str, config_json: bytes, weights: bytes) -> dict:
        """Validate an adapter sent in a request, persist it under the adapter directory, serve it.

        Refused exactly like an adapter on disk (adapters.load_adapter validates the staged
        files). An existing name is replaced only after the operator unloaded it and its last
        running request finished: clients never see two versions under one name.
        """
        limit = int(self.config.max_upload_mb * 2**20)
        size = len(config_json) + len(weights)
        if size > limit:
            raise RequestError(f"upload of {size} bytes exceeds the limit of {limit} bytes "
                               f"(parameter max_upload_mb = {self.config.max_upload_mb:g})")
        try:
            validate_name(name)
            with self._adapter_lock:  # refuse early, before writing anything
                self._check_upload_name(name)
            staging, adapter = stage_upload(self.config.adapter_dir, name, config_json, weights, self.spec,
                                            self.dtype, self.config.max_rank, pin=self.device.type == "cuda")
            with self._adapter_lock:  # again: the name may have been taken meanwhile
                try:
                    replace = self._check_upload_name(name)
                except AdapterError:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
                install_upload(self.config.adapter_dir, staging, name, replace)
                self.adapters.add_host(adapter)
                self._unloaded.discard(name)
        except AdapterError as e:
            raise RequestError(f"upload refused: {e}") from None
        except OSError as e:
            raise RequestError(f"upload of {name!r} could not be written: {e}") from None
        log.info("adapter %s uploaded (%d bytes%s)", name, size, ", replacing the old version" if replace else "")
        return {**self._adapter_entry(name), "uploaded": True, "replaced": replace}

    def _check_upload_name(self, name: str) -> bool:
        """Whether an upload of `name` replaces an unloaded adapter; raises if the name is taken."""
        if name in self._unloaded:
            if self.call_in_engine(lambda: name in self.adapters.resident):
                raise AdapterError(f"the unloaded adapter {name!r} still has running requests; "
                                   "retry when they have finished")
            return True
        on_disk = bool(self.config.adapter_dir) and os.path.lexists(os.path.join(self.config.adapter_dir, name))
        if on_disk or self.adapters.known(name):
            raise AdapterError(f"adapter {name!r} already exists; unload it first to replace it")
        return False

    def list_adapters(self) -> list[dict]:
        """Every adapter: name, rank, target modules, tier (gpu/host/disk), bytes, requests served.

        Adapters never read are described from their adapter_config.json (rank, targets, the
        bytes their page images will take); their weights are validated on first use.
        """
        entries = {e["name"]: e for e in self.call_in_engine(self.adapters.describe)}
        for name in self._adapter_dir_names():
            if name not in entries:
                entries[name] = self._disk_entry(name)
        return [self._finish_entry(e) for _, e in sorted(entries.items())]

    def _adapter_entry(self, name: str) -> dict:
        """The list entry of one adapter."""
        found = [e for e in self.call_in_engine(self.adapters.describe) if e["name"] == name]
        return self._finish_entry(found[0] if found else self._disk_entry(name))

    def _disk_entry(self, name: str) -> dict:
        entry = {"name": name, "rank": None, "target_modules": None, "tier": "disk", "bytes": None,
                 "on_disk": True}
        try:
            path = resolve_adapter_dir(self.config.adapter_dir, name)
            entry.update(describe_on_disk(path, self.spec, self.pool_tensor.element_size()))
        except (AdapterError, OSError, ValueError) as e:
            entry["error"] = str(e)
        return entry

    def _finish_entry(self, entry: dict) -> dict:
        entry["requests_served"] = self.requests_served.get(entry["name"], 0)
        entry["unloaded"] = entry["name"] in self._unloaded
        return entry

    def _adapter_failed(self, req: Request, message: str) -> None:
        """The scheduler could not read a waiting request's adapter (its files changed since submit)."""
        tracked = self._tracked.get(req.request_id)
        if tracked is not None:
            self._finish(tracked, FinishReason.ERROR, error=message)

    def _adapter_dir_names(self, limit: int = 1_000_000) -> list[str]:
        root = self.config.adapter_dir
        if not root or not os.path.isdir(root):
            return []
        names = []
        with os.scandir(root) as it:
            for entry in it:
                if len(names) >= limit:
                    break
                if entry.is_dir() and ADAPTER_NAME_RE.fullmatch(entry.name) and ".." not in entry.name:
                    names.append(entry.name)
        return names

    def call_in_engine(self, fn, timeout: float = 60.0):
        """Run fn on the engine thread (which owns the adapter cache) and return its result."""
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            return fn()
        reply: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox.put(("call", (fn, reply)))
        self._wake.set()
        ok, value = reply.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def evict_idle_adapters(self) -> None:
        """Drop every adapter without running requests from the pool (benchmarks start cold)."""
        self._inbox.put(("evict_idle", None))
        self._wake.set()

    def register_adapter(self, adapter: HostAdapter) -> None:
        with self._adapter_lock:
            self.adapters.register(adapter)

    def stats(self) -> dict:
        return {
            "pool": asdict(self.pool.stats()),
            "adapters": asdict(self.adapters.stats()),
            "requests": {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                         "preemptions": self.scheduler.preemptions,
                         "pool_used_at_first_preemption": self.scheduler.used_at_first_preemption,
                         # steps that only decoded so that admissions gather (Scheduler.admit_min_batch)
                         "admission_deferred_steps": self.scheduler.deferred_steps},
            "steps": self.steps,
            "generated_tokens": self.generated_tokens,
            "mixed_steps": self.mixed_steps,
            # steps launched while the previous one ran (config.overlap_decode); host time blocked on the GPU
            "overlapped_steps": self.overlapped_steps,
            "overlapped_prefill_steps": self.overlapped_prefill_steps,
            "gpu_wait_s": round(self.gpu_wait_s, 3),
            "host_s": {k: round(v, 3) for k, v in self.host_s.items()},
            "loop_stalled_s": round(self.stalled_for(), 3),
            "step_time": {kind: dict(zip(("steps", "seconds", "tokens"), v, strict=True))
                          for kind, v in self.step_time.items()},
            # Triton kernel binaries built by this process; those built after start-up stalled a step.
            "kernel_variants": (n := compiled_variants()),
            "kernel_compiles_while_serving": n - self._variants_at_start,
        }

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def stalled_for(self) -> float:
        """Seconds since the engine loop last came round (a step in progress counts)."""
        return time.monotonic() - self._beat

    def healthy(self) -> bool:
        """Alive and not hung: what the health probe (command=stats) reports."""
        return self.is_alive() and self.stalled_for() < self.config.engine_stall_timeout_s

    @property
    def failure(self) -> str | None:
        """Why the engine stopped by itself (a dead thread, a dead worker); None otherwise."""
        return None if self._error is None else repr(self._error)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        if self.tp is not None:
            self.tp.shutdown()

    def _tp_failed(self, reason: str) -> None:
        """A tensor-parallel worker died (supervisor thread): stop, failing every request."""
        self._error = RuntimeError(reason)
        self._stop = True
        self._wake.set()

    def _prompt_ids(self, prompt, prompt_ids, chat) -> list[int]:
        if prompt_ids is not None and len(prompt_ids) > 0:
            ids = [int(t) for t in prompt_ids]
            bad = [t for t in ids if not 0 <= t < self.spec.vocab]
            if bad:
                raise RequestError(f"token ids out of range [0, {self.spec.vocab}): {bad[:5]}")
        elif prompt and self.tokenizer is None:
            raise RequestError("this model has no tokenizer: send input_ids")
        elif prompt:
            with self._tok_lock:
                if chat:
                    text = self.tokenizer.apply_chat_template(
                        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
                    ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                else:
                    ids = self.tokenizer(prompt)["input_ids"]
        else:
            raise RequestError("empty prompt: give text_input or input_ids")
        if not ids:
            raise RequestError("the prompt has no tokens")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt of {len(ids)} tokens does not fit the context of "
                               f"{self.max_model_len} tokens")
        return ids

    # -- engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        # Test-only fault injection (tests/test_recovery.py): with SLORA_TEST_ENGINE_CRASH_FILE set,
        # the loop dies like an unexpected bug once that file appears (it is consumed, so a
        # reloaded engine runs normally). Unset in production: one None check per iteration.
        crash_file = os.environ.get("SLORA_TEST_ENGINE_CRASH_FILE") or None
        hang_file = os.environ.get("SLORA_TEST_ENGINE_HANG_FILE") or None  # same, but it hangs
        try:
            while not self._stop:
                self._beat = time.monotonic()
                self._drain_inbox()
                if crash_file is not None:
                    _injected_crash(crash_file)
                if hang_file is not None and _consume(hang_file):
                    log.error("test fault injection: %s appeared; the engine loop hangs", hang_file)
                    while not self._stop:  # like a deadlock, except that shutdown ends it
                        time.sleep(0.05)
                if self._inflight is not None:
                    self._step_ahead(self._inflight)
                    continue
                if not self.scheduler.has_work():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                step = self._schedule()
                if step is None:  # waiting for adapter copies or pages
                    self._wake.wait(0.001)
                    self._wake.clear()
                    continue
                launched = self._launch(step)
                if launched is not None and launched.rows is not None:
                    self._inflight = launched  # the next step may be launched before its tokens are read
                elif launched is not None:
                    self._complete(launched)
        except BaseException as e:  # the thread must never die silently
            log.exception("engine thread died")
            self._error = e
        finally:
            with self._pending_lock:  # see submit()
                self._stop = True
            self._fail_all("engine stopped" if self._error is None else f"engine failed: {self._error}")
            if self.tp is not None:
                self.tp.shutdown()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                req: Request = item
                tok_eos = getattr(self.tokenizer, "eos_token_id", None)
                eos = frozenset(self.spec.eos_token_ids) | frozenset([] if tok_eos is None else [tok_eos])
                detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, self._tok_lock,
                                               skip_ids=eos)
                self._tracked[req.request_id] = _Tracked(req, detok, list(req.params.stop))
                self.scheduler.add(req)
            elif kind == "call":
                fn, reply = item
                try:
                    reply.put((True, fn()))
                except Exception as e:  # handed back to the caller's thread
                    reply.put((False, e))
            elif kind == "evict_idle":
                self.adapters.evict_all_idle()
            elif kind == "cancel":
                tracked = self._tracked.get(item)
                if tracked is not None:
                    self._finish(tracked, FinishReason.CANCELLED)

    def _schedule(self, ahead=None) -> ScheduledStep | None:
        t0 = time.perf_counter()
        step = self.scheduler.schedule(ahead=ahead)
        self.host_s["schedule"] += time.perf_counter() - t0
        return step

    def _overlappable(self, step: ScheduledStep) -> bool:
        """Steps whose successor may be launched before their tokens are read: greedy ones
        (sampling with a temperature reads its rows on the host)."""
        return self.config.overlap_decode and Sampler.all_greedy(step.requests)

    def _launch(self, step: ScheduledStep, prev: _Launched | None = None) -> _Launched | None:
        """Queue a step's forward and sampling. With `prev` (still on the GPU), the decode rows
        of prev's requests take their input ids from prev's tokens, on the device. None when the
        step failed (its requests got errors)."""
        t0 = time.perf_counter()
        overlap = self._overlappable(step)
        try:
            fill = None if prev is None else self._ids_from(prev, step)
            if not step.prefill and self.graphs is not None:
                logits = self.graphs.run(step, self.adapters, fill)
            else:
                inp = self.runner.prepare(step, self.adapters)
                if fill is not None:
                    inp.input_ids.index_copy_(0, *fill)
                logits = self.runner.forward(inp)
            sample = self.sampler.launch_greedy if overlap else self.sampler.sample
            tokens = sample(logits, step.requests)
        except Exception as e:
            self.adapters.step_launched()  # some of its kernels may be queued
            if self.tp is not None:  # the ranks may be out of step now: a tensor-parallel engine stops
                raise RuntimeError(self.tp.explain(e)) from e
            # Contain the failure to this batch: its requests get errors, the engine goes on.
            log.exception("step failed for %d requests", len(step.requests))
            for req in step.requests:
                tracked = self._tracked.get(req.request_id)
                if tracked is not None:
                    self._finish(tracked, FinishReason.ERROR, error=f"internal error: {e}")
            return None
        self.adapters.step_launched()
        for req in step.requests:  # their next token is now on its way
            req.num_computed = req.seq_len
            req.pending += 1
        rows = {r.request_id: i for i, r in enumerate(step.requests)} if overlap else None
        self.overlapped_steps += prev is not None
        self.overlapped_prefill_steps += prev is not None and step.prefill
        self.host_s["launch_prefill" if step.prefill else "launch_decode"] += time.perf_counter() - t0
        return _Launched(step, tokens, t0, rows)

    def _ids_from(self, prev: _Launched, step: ScheduledStep) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows of the step's input ids, prev's tokens for them): the decode rows whose last
        token prev computes. Prompt rows come first, one row per token."""
        first_row = sum(r.seq_len for r in step.prefills)
        rows, src = [], []
        for i, req in enumerate(step.requests[len(step.prefills) :]):
            if req.pending:
                rows.append(first_row + i)
                src.append(prev.rows[req.request_id])  # it ran in prev: nothing else leaves tokens pending
        if not rows:
            return None
        both = torch.tensor([rows, src], dtype=torch.int64).to(self.device, non_blocking=True)
        return both[0], prev.tokens.device.index_select(0, both[1])

    def _step_ahead(self, prev: _Launched) -> None:
        """With prev on the GPU: schedule and launch the next step behind it when that needs
        nobody preempted, then read and stream prev's tokens."""

        def continuing(req: Request) -> bool:  # decodes again before prev's tokens are read
            if req.request_id not in prev.rows or req.request_id not in self._tracked:
                return False
            return (len(req.output_ids) + req.pending < req.params.max_tokens
                    and req.seq_len < self.max_model_len)

        step = self._schedule(ahead=continuing)
        launched = None if step is None else self._launch(step, prev)
        self._complete(prev)
        self._inflight = None
        if launched is not None and launched.rows is None:  # a sampled request joined: no overlap
            self._complete(launched)
        elif launched is not None:
            self._inflight = launched

    def _complete(self, launched: _Launched) -> None:
        """Read a step's tokens (waiting for the GPU if need be) and stream them."""
        t_wait = time.perf_counter()
        tokens = launched.tokens.wait() if isinstance(launched.tokens, PendingTokens) else launched.tokens
        now_perf = time.perf_counter()
        self.gpu_wait_s += now_perf - t_wait
        step = launched.step
        self.steps += 1
        kind = self.step_time["prefill" if step.prefill else "decode"]
        kind[0] += 1
        kind[1] += now_perf - max(launched.t0, self._last_done)  # overlapped: time since the last one
        kind[2] += sum(r.seq_len - r.pending for r in step.prefills) + len(step.requests) - len(step.prefills)
        self._last_done = now_perf
        self.mixed_steps += step.decodes > 0
        now = time.monotonic()
        for req, token in zip(step.requests, tokens, strict=True):
            tracked = self._tracked.get(req.request_id)
            if tracked is None:  # finished or cancelled after this step was launched
                continue
            req.pending -= 1
            req.output_ids.append(token)
            self.generated_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = now
            self._postprocess(tracked, token)
        self.host_s["stream"] += time.perf_counter() - now_perf

    def _postprocess(self, t: _Tracked, token: int) -> None:
        req, p = t.req, t.req.params
        eos = (token in t.detok.skip_ids and not p.ignore_eos
               and len(req.output_ids) >= max(p.min_tokens, 1))
        t.held += t.detok.add(token)
        reason = None
        if t.stops:
            cut = min((i for i in (t.held.find(s) for s in t.stops) if i >= 0), default=-1)
            if cut >= 0:
                t.held = t.held[:cut]
                reason = FinishReason.STOP
        if reason is None:
            if eos:
                reason = FinishReason.STOP
            elif len(req.output_ids) >= p.max_tokens or req.seq_len - req.pending >= self.max_model_len:
                reason = FinishReason.LENGTH
        if reason is not None:
            if reason is FinishReason.LENGTH:
                t.held += t.detok.flush()
            self._finish(t, reason)
            return
        keep = max((len(s) for s in t.stops), default=1) - 1
        text = t.held[: len(t.held) - keep] if keep else t.held
        t.held = t.held[len(text) :]
        self._emit(t, text, finished=False)

    def _emit(self, t: _Tracked, text: str, finished: bool, reason: FinishReason | None = None,
              error: str | None = None) -> None:
        req = t.req
        new_ids = req.output_ids[t.sent_ids :]
        t.sent_ids = len(req.output_ids)
        out = RequestOutput(request_id=req.request_id, text=text, token_ids=new_ids, finished=finished,
                            finish_reason=reason, error=error, prompt_tokens=len(req.prompt_ids),
                            generated_tokens=len(req.output_ids))
        try:
            req.on_output(out)
        except Exception:
            log.exception("output callback failed for request %d", req.request_id)

    def _finish(self, t: _Tracked, reason: FinishReason, error: str | None = None) -> None:
        req = t.req
        if req.adapter is not None:
            self.requests_served[req.adapter] = self.requests_served.get(req.adapter, 0) + 1
        self.scheduler.finish(req)
        self.sampler.forget(req)
        self._tracked.pop(req.request_id, None)
        with self._pending_lock:
            self._pending -= 1
        text = "" if error else t.held
        t.held = ""
        self._emit(t, text, finished=True, reason=reason, error=error)

    def _fail_all(self, message: str) -> None:
        self._drain_inbox_for_failure()
        for t in list(self._tracked.values()):
            self._finish(t, FinishReason.ERROR, error=message)

    def _drain_inbox_for_failure(self) -> None:
        try:
            self._drain_inbox()
        except Exception:
            log.exception("draining the inbox failed")


def _consume(path: str) -> bool:
    """Remove the file if it is there; whether it was."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _injected_crash(path: str) -> None:
    if _consume(path):
        raise RuntimeError(f"test fault injection: {path} appeared (SLORA_TEST_ENGINE_CRASH_FILE)")


__all__ = ["Engine", "EngineConfig", "RequestError", "SamplingParams", "Status"]
