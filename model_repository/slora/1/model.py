"""Triton Python-backend model `slora`: a thin adapter between tritonserver and the engine.

Data flow: `execute()` parses and validates each request (slora_backend.triton_io), hands it
to the engine with a callback and returns at once (decoupled model). The engine thread calls
the callback with each new piece; the callback only queues it. One response thread drains
that queue into the requests' response senders, checks for client cancellation, and keeps
the metrics up to date. Every request ends with exactly one response carrying the FINAL flag
(an error response for failures), so clients never hang.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _repo_root() -> Path:
    # SLORA_REPO_ROOT for a model repository copied away from the checkout; else this file
    # lies at <repo>/model_repository/slora/1/model.py (symlinks resolved).
    env = os.environ.get("SLORA_REPO_ROOT")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[3]


def _extend_sys_path(root: Path) -> None:
    # The stub's embedded interpreter does not read PYTHONPATH (seen with tritonserver 2.51):
    # add the repository and what PYTHONPATH names, after the interpreter's own paths.
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for p in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if p and p not in sys.path:
            sys.path.append(p)


REPO_ROOT = _repo_root()
_extend_sys_path(REPO_ROOT)

from slora_backend import triton_io  # noqa: E402
from slora_backend.request import FinishReason, RequestError, RequestOutput  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_POLL_S = 0.2  # how often live requests are checked for client cancellation
STATS_POLL_S = 0.5  # how often engine.stats() refreshes the gauges
MAX_DRAIN = 4096  # pieces taken from the queue at once (triton_io.coalesce_outputs)
# The engine thread releases the GIL at every torch call and must get it back at once. With
# Python's default 5 ms switch interval, a busy response thread (hundreds of sends per step)
# kept it each time for up to 5 ms: a saturated server's engine spent twice the in-process
# host time per step (BENCHMARKS.md, item 25: 0.84 of in-process throughput; 0.99 at 0.5 ms).
GIL_SWITCH_S = 0.0005
# Benchmark knobs (benchmarks/server_bench.py --server-env), read at initialize:
#   SLORA_GIL_SWITCH_MS       overrides GIL_SWITCH_S, in ms
#   SLORA_STREAM_INTERVAL_MS  the response thread's least time between two drains of the queue
#                             (default 0: drain as soon as pieces arrive)
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


class _Live:
    """Response-side state of one request."""

    __slots__ = ("sender", "label", "stream", "arrival", "request_id", "first_token",
                 "completion", "done")

    def __init__(self, sender, label: str, stream: bool, arrival: float):
        self.sender = sender
        self.label = label
        self.stream = stream
        self.arrival = arrival
        self.request_id: int | None = None
        self.first_token = False
        self.completion = triton_io.Completion()
        self.done = False


class _Metrics:
    """Custom metrics on Triton's metrics port. Families must outlive their metrics."""

    def __init__(self):
        fam = pb_utils.MetricFamily
        self.f_requests = fam("slora_requests_total", "Requests received, by adapter", fam.COUNTER)
        self.f_tokens = fam("slora_generated_tokens_total", "Tokens generated, by adapter",
                            fam.COUNTER)
        self.f_errors = fam("slora_request_errors_total", "Requests that failed, by adapter",
                            fam.COUNTER)
        self.f_ttft = fam("slora_first_token_latency_seconds",
                          "From execute() to the first generated token, by adapter", fam.HISTOGRAM)
        self.f_pages = fam("slora_pool_pages", "Unified pool pages by use (free, kv, adapter)",
                           fam.GAUGE)
        self.f_capacity = fam("slora_pool_capacity_pages", "Pages in the unified pool", fam.GAUGE)
        self.f_adapters = fam("slora_adapters", "Adapters known (registered) and resident on "
                              "the device (resident)", fam.GAUGE)
        self.f_loads = fam("slora_adapter_loads_total", "Adapter loads into the pool", fam.COUNTER)
        self.f_evictions = fam("slora_adapter_evictions_total", "Adapter evictions from the pool",
                               fam.COUNTER)
        self.f_queue = fam("slora_requests", "Engine requests by state (waiting, running)",
                           fam.GAUGE)
        # Adapter load latency per tier step (disk_to_host, host_to_gpu): mean = seconds / loads.
        self.f_stage_seconds = fam("slora_adapter_load_seconds_total",
                                   "Time spent loading adapters, by stage", fam.COUNTER)
        self.f_stage_loads = fam("slora_adapter_stage_loads_total", "Adapter loads, by stage",
                                 fam.COUNTER)
        self.f_host_bytes = fam("slora_adapter_host_bytes", "Host memory of adapters read from "
                                "disk (used) and its budget (budget, 0 = unlimited)", fam.GAUGE)
        # Where the engine's time goes: prefill vs decode steps (mean = seconds / steps), and
        # Triton kernel compiles after start-up (each one stalled a step; should stay 0).
        self.f_step_seconds = fam("slora_step_seconds_total", "Engine step wall time, by kind "
                                  "(prefill, decode)", fam.COUNTER)
        self.f_steps = fam("slora_steps_total", "Engine steps, by kind (prefill, decode)", fam.COUNTER)
        self.f_compiles = fam("slora_kernel_compiles_total", "Triton kernels compiled while serving "
                              "(after start-up)", fam.COUNTER)
        self._labels = triton_io.AdapterLabels()
        self._pending_tokens: dict[str, int] = {}
        self._per_adapter: dict[str, tuple] = {}
        self._lock = threading.Lock()  # execute() and the response thread both create metrics
        self.pages = {use: self.f_pages.Metric(labels={"use": use})
                      for use in ("free", "kv", "adapter")}
        self.capacity = self.f_capacity.Metric(labels={})
        self.adapters = {k: self.f_adapters.Metric(labels={"state": k})
                         for k in ("registered", "resident")}
        self.loads = self.f_loads.Metric(labels={})
        self.evictions = self.f_evictions.Metric(labels={})
        self.queue = {k: self.f_queue.Metric(labels={"state": k}) for k in ("waiting", "running")}
        self.stages = {k: (self.f_stage_seconds.Metric(labels={"stage": k}),
                           self.f_stage_loads.Metric(labels={"stage": k}))
                       for k in ("disk_to_host", "host_to_gpu")}
        self._last_stage = {k: (0.0, 0) for k in self.stages}
        self.host_bytes = {k: self.f_host_bytes.Metric(labels={"kind": k}) for k in ("used", "budget")}
        self.step_metrics = {k: (self.f_step_seconds.Metric(labels={"kind": k}),
                                 self.f_steps.Metric(labels={"kind": k})) for k in ("prefill", "decode")}
        self._last_steps = {k: (0.0, 0) for k in self.step_metrics}
        self.compiles = self.f_compiles.Metric(labels={})
        self._last_compiles = 0
        self._last_loads = 0
        self._last_evictions = 0

    def label(self, adapter: str | None) -> str:
        with self._lock:
            return self._labels(adapter)

    def adapter(self, label: str) -> tuple:
        """(requests, tokens, errors, first-token histogram) metrics of one adapter label."""
        with self._lock:
            m = self._per_adapter.get(label)
            if m is None:
                labels = {"adapter": label}
                m = (self.f_requests.Metric(labels=labels), self.f_tokens.Metric(labels=labels),
                     self.f_errors.Metric(labels=labels),
                     self.f_ttft.Metric(labels=labels, buckets=LATENCY_BUCKETS))
                self._per_adapter[label] = m
            return m

    def add_tokens(self, label: str, n: int) -> None:
        """Count streamed tokens; the counters move at the next flush_tokens (every update):
        each increment is a message to the server process, too dear to make per token."""
        self._pending_tokens[label] = self._pending_tokens.get(label, 0) + n

    def flush_tokens(self) -> None:
        pending, self._pending_tokens = self._pending_tokens, {}
        for label, n in pending.items():
            self.adapter(label)[1].increment(n)

    def update(self, stats: dict) -> None:
        self.flush_tokens()
        pool, adapters, requests = stats["pool"], stats["adapters"], stats["requests"]
        self.pages["free"].set(pool["pages_free"])
        self.pages["kv"].set(pool["pages_kv"])
        self.pages["adapter"].set(pool["pages_adapter"])
        self.capacity.set(pool["pages_total"])
        self.adapters["registered"].set(adapters["registered"])
        self.adapters["resident"].set(adapters["resident"])
        # The engine reports running totals; counters only move forward by the difference.
        if adapters["loads"] > self._last_loads:
            self.loads.increment(adapters["loads"] - self._last_loads)
            self._last_loads = adapters["loads"]
        if adapters["evictions"] > self._last_evictions:
            self.evictions.increment(adapters["evictions"] - self._last_evictions)
            self._last_evictions = adapters["evictions"]
        self.queue["waiting"].set(requests["waiting"])
        self.queue["running"].set(requests["running"])
        for stage, (seconds, loads) in self.stages.items():
            total, count = adapters[stage]["total_s"], adapters[stage]["count"]
            last_total, last_count = self._last_stage[stage]
            if count > last_count:
                seconds.increment(total - last_total)
                loads.increment(count - last_count)
                self._last_stage[stage] = (total, count)
        self.host_bytes["used"].set(adapters["host_bytes"])
        self.host_bytes["budget"].set(adapters["host_budget_bytes"])
        for kind, (seconds, steps) in self.step_metrics.items():
            now = stats["step_time"][kind]
            last_seconds, last_steps = self._last_steps[kind]
            if now["steps"] > last_steps:
                seconds.increment(now["seconds"] - last_seconds)
                steps.increment(now["steps"] - last_steps)
                self._last_steps[kind] = (now["seconds"], now["steps"])
        if stats["kernel_compiles_while_serving"] > self._last_compiles:
            self.compiles.increment(stats["kernel_compiles_while_serving"] - self._last_compiles)
            self._last_compiles = stats["kernel_compiles_while_serving"]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        """Build the engine from config.pbtxt parameters and start the response thread."""
        self.log = pb_utils.Logger
        if int(np.__version__.split(".")[0]) >= 2:
            # The 2.51 stub's pybind11 misreads numpy 2 dtypes: every BYTES tensor is corrupted.
            raise RuntimeError(
                f"the Python-backend stub loaded numpy {np.__version__} from {np.__file__}; "
                "it needs numpy < 2. Put the environment's bin directory first on PATH "
                "(the stub takes its site-packages from the python3 found there).")
        from slora_backend.config import EngineConfig
        from slora_backend.engine import Engine

        # The engine logs through `logging`; without a handler its INFO lines (pool size,
        # graph capture, preemptions) would never reach the server log.
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="slora %(levelname)s %(name)s: %(message)s")
        model_config = json.loads(args["model_config"])
        params = triton_io.engine_parameters(model_config, REPO_ROOT)
        if os.environ.get("SLORA_TENSOR_PARALLEL_SIZE"):  # scripts/serve.sh --tp N
            params["tensor_parallel_size"] = os.environ["SLORA_TENSOR_PARALLEL_SIZE"]
        if os.environ.get("SLORA_ENGINE_STALL_TIMEOUT_S"):  # tests: detect a hang in seconds
            params["engine_stall_timeout_s"] = os.environ["SLORA_ENGINE_STALL_TIMEOUT_S"]
        self.log.log_info(f"slora: engine parameters {params}")
        self.engine = Engine(EngineConfig.from_parameters(params))
        self.model_name = args["model_name"]
        self._finalizing = False
        self._unload_requested = False
        self.metrics = _Metrics()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, _Live] = {}  # id(_Live) -> state, for cancellation and shutdown
        self._live_lock = threading.Lock()
        switch = os.environ.get("SLORA_GIL_SWITCH_MS")
        sys.setswitchinterval(float(switch) / 1e3 if switch else GIL_SWITCH_S)
        self._stream_interval = float(os.environ.get("SLORA_STREAM_INTERVAL_MS", "0")) / 1e3
        self._thread = threading.Thread(target=self._respond_loop, name="slora-responses",
                                        daemon=True)
        self._thread.start()
        self.log.log_info("slora: ready")

    def execute(self, requests: list) -> None:
        """Validate each request and hand it to the engine; responses flow from the thread."""
        arrival = time.monotonic()
        for request in requests:
            sender = request.get_response_sender()
            if not self.engine.is_alive():  # every request, commands too: health probes see it
                self._reject(sender, None, f"the slora engine has stopped ({self.engine.failure}); "
                             "this model instance cannot serve until it is reloaded")
                continue
            try:
                command, name = triton_io.parse_command(lambda n, r=request: _input(r, n), request.parameters())
                if command != "generate":
                    self._lifecycle(sender, command, name, lambda n, r=request: _input(r, n))
                    continue
                parsed = triton_io.parse_request(
                    lambda name, r=request: _input(r, name), request.parameters())
            except RequestError as e:
                self._reject(sender, None, str(e))
                continue
            except Exception as e:  # never let one bad request take the model down
                self.log.log_error(f"slora: parsing a request failed: {e!r}")
                self._reject(sender, None, f"invalid request: {e}")
                continue
            label = self.metrics.label(parsed.adapter)
            live = _Live(sender, label, parsed.stream, arrival)
            with self._live_lock:
                self._live[id(live)] = live
            try:
                live.request_id = self.engine.submit(
                    **parsed.submit_kwargs(), on_output=lambda out, s=live: self._queue.put((s, out)))
            except Exception as e:
                with self._live_lock:
                    self._live.pop(id(live), None)
                if not isinstance(e, RequestError):
                    self.log.log_error(f"slora: submit failed: {e!r}")
                self._reject(sender, parsed.adapter, str(e))
                continue
            self.metrics.adapter(label)[0].increment(1)
        return None

    def finalize(self) -> None:
        """Stop the engine (it fails what is in flight) and send every request its FINAL."""
        self.log.log_info("slora: finalize")
        self._finalizing = True
        self.engine.shutdown()
        self._queue.put(None)
        self._thread.join(timeout=30)
        with self._live_lock:
            left = list(self._live.values())
            self._live.clear()
        for live in left:
            if not live.done:
                self._send_error(live, "the model is being unloaded")

    def _lifecycle(self, sender, command: str, name: str | None, get_input) -> None:
        """Adapter list/load/unload/upload: one JSON answer with the FINAL flag (errors as errors)."""
        if command == "list_adapters":
            result = self.engine.list_adapters()
        elif command == "load_adapter":
            result = self.engine.load_adapter(name)
        elif command == "upload_adapter":
            result = self.engine.upload_adapter(name, *triton_io.parse_upload(get_input))
        elif command == "stats":  # the watchdog probes with it every second: not logged
            result = {"alive": self.engine.healthy(), **self.engine.stats()}
        else:
            result = self.engine.unload_adapter(name)
        if command != "stats":
            self.log.log_info(f"slora: {command} {name or ''}")
        arrays = triton_io.output_arrays(json.dumps(result), [], "stop")
        sender.send(pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()]), flags=FINAL)

    # -- helpers -------------------------------------------------------------------------
    def _reject(self, sender, adapter: str | None, message: str) -> None:
        label = self.metrics.label(adapter)
        requests, _, errors, _ = self.metrics.adapter(label)
        requests.increment(1)
        errors.increment(1)
        try:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
                        flags=FINAL)
        except Exception as e:
            self.log.log_warn(f"slora: could not send an error response: {e!r}")

    def _send_error(self, live: _Live, message: str) -> None:
        live.done = True
        self.metrics.adapter(live.label)[2].increment(1)
        try:
            live.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
                             flags=FINAL)
        except Exception as e:
            self.log.log_warn(f"slora: could not send an error response: {e!r}")

    def _respond_loop(self) -> None:
        next_cancel_check = next_stats = drained = 0.0
        while True:
            if self._stream_interval:
                time.sleep(max(0.0, drained + self._stream_interval - time.monotonic()))
            try:
                items = [self._queue.get(timeout=CANCEL_POLL_S)]
                drained = time.monotonic()
            except queue.Empty:
                items = []
            while items and items[-1] is not None and len(items) < MAX_DRAIN:
                try:  # everything queued so far: merged per request, one send each
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = bool(items) and items[-1] is None
            self._deliver_all(items[:-1] if stop else items)
            if stop:
                self._drain()
                return
            try:
                now = time.monotonic()
                if now >= next_cancel_check:
                    next_cancel_check = now + CANCEL_POLL_S
                    self._check_cancelled()
                if now >= next_stats:
                    next_stats = now + STATS_POLL_S
                    self.metrics.update(self.engine.stats())
                    self._check_engine()
            except Exception as e:  # the response thread must survive anything
                self.log.log_error(f"slora: response thread: {e!r}")

    def _check_engine(self) -> None:
        """If the engine stopped by itself, ask Triton to unload this model.

        Its requests have already had their errors (Engine._fail_all) and every new one gets an
        error, but Triton 2.51 never asks a Python model whether it is healthy: only unloading
        turns `/v2/models/slora/ready` false. Under explicit model control (scripts/serve.sh)
        the watchdog then loads it again; in the other modes the call fails, and the model stays
        "ready" while it answers every request with an error.
        """
        if self._unload_requested or self._finalizing or self.engine.is_alive():
            return
        self._unload_requested = True
        self.log.log_error(f"slora: the engine has stopped ({self.engine.failure}); "
                           "asking Triton to unload the model")
        # Off this thread: it must go on delivering the failed requests' error responses,
        # which the unload waits for.
        threading.Thread(target=self._unload_self, name="slora-unload", daemon=True).start()

    def _unload_self(self) -> None:
        try:
            pb_utils.unload_model(self.model_name)
            self.log.log_info("slora: unload requested")
        except Exception as e:
            self.log.log_warn(f"slora: could not unload the model ({e}); it stays not serving")

    def _drain(self) -> None:
        items = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item:
                items.append(item)
        self._deliver_all(items)
        self.metrics.flush_tokens()

    def _deliver_all(self, items: list) -> None:
        for live, out in triton_io.coalesce_outputs(items):
            try:
                self._deliver(live, out)
            except Exception as e:  # the response thread must survive anything
                self.log.log_error(f"slora: response thread: {e!r}")

    def _deliver(self, live: _Live, out: RequestOutput) -> None:
        if live.done:
            return
        if out.token_ids:
            self.metrics.add_tokens(live.label, len(out.token_ids))
            if not live.first_token:
                live.first_token = True
                _, _, _, ttft = self.metrics.adapter(live.label)
                ttft.observe(time.monotonic() - live.arrival)
        if out.finished:
            live.done = True
            with self._live_lock:
                self._live.pop(id(live), None)
        if out.error is not None:
            self._send_error(live, out.error)
            return
        if not live.stream:
            live.completion.add(out)
            if out.finished:
                self._send(live, live.completion.arrays(_reason(out)), FINAL)
            return
        if out.finished:
            self._send(live, triton_io.output_arrays(out.text, out.token_ids, _reason(out)), FINAL)
        elif out.text or out.token_ids:
            self._send(live, triton_io.output_arrays(out.text, out.token_ids), 0)

    def _send(self, live: _Live, arrays: dict, flags: int) -> None:
        tensors = [pb_utils.Tensor(name, value) for name, value in arrays.items()]
        try:
            live.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)
        except Exception as e:  # the client may be gone; the engine learns it by cancellation
            self.log.log_warn(f"slora: sending a response failed: {e!r}")

    def _check_cancelled(self) -> None:
        with self._live_lock:
            live = [s for s in self._live.values() if s.request_id is not None and not s.done]
        for s in live:
            try:
                cancelled = s.sender.is_cancelled()
            except Exception:
                cancelled = True
            if cancelled:
                self.engine.cancel(s.request_id)


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _reason(out: RequestOutput) -> str:
    reason = out.finish_reason
    if reason is None:
        return FinishReason.STOP.value
    return reason.value if isinstance(reason, FinishReason) else str(reason)
