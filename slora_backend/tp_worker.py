"""Tensor-parallel worker processes and rank 0's handle on them (`TPLeader`).

The engine (rank 0) spawns ranks 1..N-1 with `torch.multiprocessing` (spawn) and talks to
each through two pipes: commands in order (a step's header, adapter loads, stop) and status
back (start-up handshake, a traceback before dying). A step's tensors go by one broadcast.
Workers decide nothing: rank 0's scheduler and adapter cache have already chosen every page.

Start-up, in lock step: spawn -> "hello" (imports done) -> init_process_group -> each rank
loads its weight shard -> "capacity" (pages it can hold) -> rank 0 sends the smallest as
"pool" -> pools allocated, CUDA graphs captured together -> "ready".

Failures never hang a request: a supervisor thread in rank 0 watches the workers; when one
exits it marks the engine failed (its requests end with errors, `Engine.is_alive()` turns
false) and aborts the NCCL communicator so that a collective in flight returns. Workers exit
when rank 0's process goes away (their command pipe closes or the parent disappears).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import socket
import sys
import threading
import time
import traceback
from collections import OrderedDict
from datetime import timedelta

import torch
import torch.distributed as dist

from kernels.launch import compiled_variants

from .checkpoint import ModelSpec
from .tensor_parallel import TPGroup, check_tp, local_spec, pack_step, payload_size, pool_capacity, unpack_step

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # a collective waiting longer means a rank is stuck
START_TIMEOUT_S = 600.0  # spawn + imports + weight loading + graph capture, per stage


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python_executable() -> str:
    # Inside tritonserver the interpreter is embedded in the Python-backend stub, whose
    # sys.executable may be the stub binary: spawn the python3 that carries our packages.
    exe = sys.executable
    if exe and os.path.basename(exe).startswith("python"):
        return exe
    return shutil.which("python3") or exe


def _use_graphs(config, device: torch.device, backend: str) -> bool:
    return config.cuda_graphs and device.type == "cuda" and backend == "triton"


class TPLeader:
    """Rank 0: spawns and supervises the workers and sends them every step."""

    def __init__(self, config, spec: ModelSpec, device: torch.device, dtype: torch.dtype, backend: str):
        n = config.tensor_parallel_size
        check_tp(spec, n)
        self.size, self.config, self.spec = n, config, spec
        self.local_spec = local_spec(spec, n)
        if device.type == "cuda":
            if torch.cuda.device_count() < n:
                raise ValueError(f"tensor_parallel_size {n} needs {n} GPUs; {torch.cuda.device_count()} visible")
            self.device = torch.device("cuda", 0)
            torch.cuda.set_device(self.device)
            self.dist_backend = "nccl"
        else:
            self.device, self.dist_backend = device, "gloo"
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialised in this process: "
                               "one tensor-parallel engine per process")
        self.on_failure = None  # set by the engine: called once with the reason
        self.failed: str | None = None
        self._closing = False
        self._lock = threading.Lock()
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = torch.multiprocessing.get_context("spawn")
        ctx.set_executable(_python_executable())
        self.procs, self.cmd, self.status = [], [], []
        for rank in range(1, n):
            cmd_recv, cmd_send = ctx.Pipe(duplex=False)
            status_recv, status_send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=worker_main, name=f"slora-tp{rank}", daemon=True,
                               args=(config, rank, init_method, device.type, dtype, backend, cmd_recv, status_send))
            proc.start()
            cmd_recv.close()
            status_send.close()
            self.procs.append(proc)
            self.cmd.append(cmd_send)
            self.status.append(status_recv)
        self.expect("hello")
        try:
            dist.init_process_group(self.dist_backend, init_method=init_method, rank=0, world_size=n,
                                    timeout=COLLECTIVE_TIMEOUT)
        except BaseException:
            self.shutdown()
            raise
        self.group = TPGroup(n, 0, spec, _lora_ops(backend), config.tp_skip_lora_collectives,
                             send_step=self.send_step)
        self._supervisor = threading.Thread(target=self._supervise, name="slora-tp-supervisor", daemon=True)
        self._supervisor.start()
        log.info("tensor parallel: %d ranks over %s (%s), workers %s", n, self.dist_backend, self.device,
                 [p.pid for p in self.procs])

    # -- start-up ------------------------------------------------------------------------------
    def expect(self, kind: str, timeout: float = START_TIMEOUT_S) -> list:
        """Wait for message `kind` from every worker (start-up only); returns their payloads.
        On any failure the workers are stopped before the error is raised."""
        try:
            return self._expect(kind, timeout)
        except BaseException:
            self.shutdown()
            raise

    def _expect(self, kind: str, timeout: float) -> list:
        out = []
        for rank, (proc, conn) in enumerate(zip(self.procs, self.status, strict=True), start=1):
            deadline = time.monotonic() + timeout
            while not conn.poll(0.2):
                if not proc.is_alive() or time.monotonic() > deadline:
                    why = f"exited with code {proc.exitcode}" if not proc.is_alive() else "did not answer"
                    raise RuntimeError(f"tensor-parallel worker {rank} {why} while starting ({kind})")
            try:
                msg = conn.recv()
            except EOFError:
                proc.join(5)
                raise RuntimeError(f"tensor-parallel worker {rank} exited with code {proc.exitcode} while "
                                   f"starting ({kind})") from None
            if msg[0] == "error":
                raise RuntimeError(f"tensor-parallel worker {rank} failed to start:\n{msg[1]}")
            if msg[0] != kind:
                raise RuntimeError(f"tensor-parallel worker {rank} sent {msg[0]!r}, expected {kind!r}")
            out.append(msg[1:])
        return out

    def agree_pool_pages(self, own: int) -> int:
        """Every rank's pool gets the smallest page count any rank can hold."""
        pages = min([own] + [m[0] for m in self.expect("capacity")])
        self.send(("pool", pages))
        return pages

    # -- running -------------------------------------------------------------------------------
    def send(self, msg: tuple) -> None:
        for conn in self.cmd:
            conn.send(msg)

    def send_step(self, inp) -> None:
        header, payload = pack_step(inp)
        self.send(("step", header))
        dist.broadcast(payload, 0)

    def _supervise(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs, start=1)}
        while not self._closing:
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
            if self._closing:
                return
            for sentinel in ready:
                rank = sentinels[sentinel]
                proc, conn = self.procs[rank - 1], self.status[rank - 1]
                detail = ""
                try:
                    while conn.poll():
                        msg = conn.recv()
                        if msg[0] == "error":
                            detail = ": " + msg[1].strip().splitlines()[-1]
                except (EOFError, OSError):
                    pass
                self.fail(f"tensor-parallel worker {rank} (pid {proc.pid}) exited with code {proc.exitcode}{detail}")
                return

    def explain(self, error: BaseException, wait_s: float = 2.0) -> str:
        """Why a step failed: a worker's death when there is one (a collective with a dead peer
        can fail before the supervisor has noticed), else the error itself."""
        start = time.monotonic()
        while self.failed is None and time.monotonic() - start < wait_s:
            time.sleep(0.05)
            if time.monotonic() - start > 0.5 and all(p.exitcode is None for p in self.procs):
                break  # every worker alive: the step failed by itself
        return self.failed or f"tensor-parallel step failed: {error!r}"

    def fail(self, reason: str) -> None:
        """Mark the group broken (once): tell the engine, release a collective in flight."""
        with self._lock:
            if self.failed is not None or self._closing:
                return
            self.failed = reason
        log.error("%s", reason)
        if self.on_failure is not None:
            self.on_failure(reason)
        if self.dist_backend == "nccl":  # gloo returns an error by itself once the peer's sockets close
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception:
                log.exception("aborting the NCCL communicator failed")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the workers (politely, then by force) and leave the process group. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        for conn in self.cmd:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.cmd + self.status:
            conn.close()
        if dist.is_initialized():
            try:
                if self.dist_backend == "gloo":
                    dist.destroy_process_group()
                else:  # destroy can hang on communicators used in CUDA graphs (pytorch#115388)
                    dist.distributed_c10d._abort_process_group()
            except Exception:
                log.exception("leaving the process group failed")


def _lora_ops(backend: str):
    from kernels.lora_tp import get_tp_lora_ops

    return get_tp_lora_ops(backend)


# -- the worker process -------------------------------------------------------------------------
class WorkerAdapters:
    """A worker's adapter shards: built from the source rank 0 names, placed at rank 0's pages."""

    def __init__(self, config, spec: ModelSpec, dtype: torch.dtype, rank: int, pool_tensor: torch.Tensor):
        self.config, self.spec, self.dtype, self.rank = config, spec, dtype, rank
        self.pool_tensor = pool_tensor
        self.device = pool_tensor.device
        self.cache: OrderedDict[str, tuple] = OrderedDict()  # name -> (generation, HostAdapter), LRU first
        self.cache_bytes = 0
        self.budget = int(config.host_adapter_budget_mb * 2**20) if config.host_adapter_budget_mb > 0 else None

    def load(self, name: str, source: tuple, pages: list[int]) -> None:
        from .dummy import random_adapter_shard

        n = self.config.tensor_parallel_size
        if source[0] == "dummy":  # generated straight into the pool: no host copy to keep
            _, rank, targets, seed = source
            shard = random_adapter_shard(name, self.spec, rank, targets, self.dtype, seed, n, self.rank,
                                         self.device)
        else:
            shard = self._from_disk(name, source[1])
        ids = torch.tensor(pages, dtype=torch.long, device=self.device)
        # On the compute stream: ordered after every step that still reads these pages.
        self.pool_tensor[:, ids, :] = shard.pages.to(self.device, non_blocking=True)

    def _from_disk(self, name: str, generation: int):
        from .adapters import load_adapter, resolve_adapter_dir
        from .tensor_parallel import shard_adapter

        cached = self.cache.get(name)
        if cached is not None and cached[0] == generation:
            self.cache.move_to_end(name)
            return cached[1]
        self.forget(name)
        path = resolve_adapter_dir(self.config.adapter_dir, name)
        full = load_adapter(path, name, self.spec, self.dtype, self.config.max_rank)
        shard = shard_adapter(full, self.spec, self.config.tensor_parallel_size, self.rank,
                              pin=self.device.type == "cuda")
        self.cache[name] = (generation, shard)
        self.cache_bytes += shard.nbytes
        while self.budget is not None and self.cache_bytes > self.budget and len(self.cache) > 1:
            self.forget(next(iter(self.cache)))
        return shard

    def forget(self, name: str) -> None:
        old = self.cache.pop(name, None)
        if old is not None:
            self.cache_bytes -= old[1].nbytes


def _watch_parent() -> None:
    """Exit when rank 0's process is gone, even in the middle of a collective."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(3)

    threading.Thread(target=watch, name="slora-tp-parent", daemon=True).start()


def worker_main(config, rank: int, init_method: str, device_type: str, dtype: torch.dtype, backend: str,
                cmd, status) -> None:
    """Entry point of worker `rank` (spawned by TPLeader)."""
    _watch_parent()
    logging.basicConfig(level=logging.INFO, format=f"slora tp{rank} %(levelname)s %(name)s: %(message)s")
    try:
        status.send(("hello", os.getpid()))
        worker = _Worker(config, rank, init_method, device_type, dtype, backend, cmd, status)
        worker.serve()
    except (EOFError, BrokenPipeError):
        os._exit(0)  # rank 0 went away
    except BaseException:
        try:
            status.send(("error", traceback.format_exc()))
        except (OSError, ValueError):
            pass
        log.exception("tensor-parallel worker %d failed", rank)
        os._exit(1)
    # Skip interpreter teardown: destroying NCCL communicators used in CUDA graphs can hang.
    os._exit(0)


class _Worker:
    def __init__(self, config, rank, init_method, device_type, dtype, backend, cmd, status):
        from kernels import get_ops

        from .checkpoint import load_base_weights, read_spec
        from .dummy import dummy_spec, dummy_weights, is_dummy
        from .model_runner import ModelRunner

        n = config.tensor_parallel_size
        self.cmd, self.rank = cmd, rank
        if device_type == "cuda":
            self.device = torch.device("cuda", rank)
            torch.cuda.set_device(self.device)
            dist_backend = "nccl"
        else:
            self.device, dist_backend = torch.device("cpu"), "gloo"
        dist.init_process_group(dist_backend, init_method=init_method, rank=rank, world_size=n,
                                timeout=COLLECTIVE_TIMEOUT)
        if is_dummy(config.model_dir):
            spec = dummy_spec(config.model_dir, config.max_model_len or 4096)
            weights = dummy_weights(spec, dtype, self.device, tp_size=n, tp_rank=rank)
        else:
            spec = read_spec(config.model_dir)
            weights = load_base_weights(config.model_dir, spec, dtype, self.device, tp_size=n, tp_rank=rank)
        ls = local_spec(spec, n)
        status.send(("capacity", pool_capacity(config, ls, dtype, self.device)))
        kind, pages = self._next()
        if kind != "pool":
            raise RuntimeError(f"expected the pool size from rank 0, got {kind!r}")
        use_graphs = _use_graphs(config, self.device, backend)
        extra = 2  # scratch pages of graph padding rows, as on rank 0
        pool_tensor = torch.zeros(ls.layers, pages + extra, ls.page_width, dtype=dtype, device=self.device)
        self.group = TPGroup(n, rank, spec, _lora_ops(backend), config.tp_skip_lora_collectives)
        self.runner = ModelRunner(ls, weights, pool_tensor, get_ops(backend),
                                  config.max_model_len or spec.max_position, tp=self.group)
        from .tp_graphs import attach_tp_graphs

        attach_tp_graphs(self.runner, config, use_graphs, pages)
        self.adapters = WorkerAdapters(config, spec, dtype, rank, pool_tensor)
        self._variants = None  # kernel variants compiled when rank 0 started serving
        status.send(("ready",))

    def _next(self) -> tuple:
        msg = self.cmd.recv()
        return msg[0], *msg[1:]

    def _check_compiles(self) -> None:
        """Say so when this rank compiles a kernel variant while serving: rank 0 waits for it in
        the next collective (rank 0's own count is in Engine.stats)."""
        if self._variants is None:
            return
        now = compiled_variants()
        if now > self._variants:
            log.warning("tensor-parallel worker %d compiled %d kernel variant(s) while serving (%d in all)",
                        self.rank, now - self._variants, now)
            self._variants = now

    def serve(self) -> None:
        while True:
            msg = self.cmd.recv()
            kind = msg[0]
            if kind == "step":
                header = msg[1]
                payload = torch.empty(payload_size(header), dtype=torch.int32, device=self.device)
                dist.broadcast(payload, 0)
                self.runner.forward(unpack_step(header, payload))
                self._check_compiles()
            elif kind == "load":
                self.adapters.load(*msg[1:])
            elif kind == "forget":
                self.adapters.forget(msg[1])
            elif kind == "serving":
                self._variants = compiled_variants()
            elif kind == "stop":
                return
            else:
                raise RuntimeError(f"unknown command {kind!r} from rank 0")
