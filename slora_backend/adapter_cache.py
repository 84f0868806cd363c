"""Adapter cache: three tiers, disk <- host memory <- GPU pool.

* Disk: the adapter directory, PEFT safetensors read on demand through safetensors' memory
  map. The number of adapters is bounded by the disk, not by RAM.
* Host: page images (adapters.py) of recently used adapters, least recently used first out
  once their bytes pass the budget (`host_adapter_budget_mb`). A host copy whose pool copy is
  in flight is never dropped. Once the copy has completed, a GPU-resident adapter's host copy
  may go like any other (running requests read the pool pages; after a GPU eviction the
  adapter is read from disk again). Adapters registered in memory (benchmarks) have no disk
  copy, so they are never dropped and are kept outside the budget.
* GPU: adapters paged into the unified pool. A load copies the host page images into
  freshly allocated pages, on a side CUDA stream so that it overlaps the model's compute; an
  adapter is usable once its copy event has completed. The copy waits only for the steps
  that could still read its pages (StepFences), not for the step in flight behind which the
  engine schedules (engine overlap): the pages free the longest are taken, whose readers
  are usually done. Adapters with no running request are evicted, least recently used
  first, whenever the pool needs their pages.

Every adapter read once keeps an `AdapterInfo` (ranks, scales, page offsets; no weights), so
scheduling and the step tables never need the host copy. The engine thread owns the GPU tier;
the host tier is also filled from request threads (validation at submit, uploads), so it is
guarded by a lock, never held while reading from disk.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from kernels.launch import int32_aligned
from kernels.lora_batch import LoraBatch, module_bits, rank_buckets

from .adapters import AdapterError, AdapterInfo, HostAdapter, load_adapter, resolve_adapter_dir
from .checkpoint import ModelSpec
from .page_pool import OutOfPages, PagePool, PageUse

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ResidentAdapter:
    host: AdapterInfo  # what the step tables read (ranks, scales, offsets); the weights are in `pages`
    pages: list[int]
    page_ids: torch.Tensor  # (n_pages,) int32 on the pool's device
    refs: int = 0  # running requests using it: never evicted while > 0
    ready: torch.cuda.Event | None = None  # copy completion on CUDA; None = ready
    waited: bool = False  # the compute stream already waits on the copy
    src: torch.Tensor | None = None  # (L, n_pages, P) host page images, kept alive while copying
    started: torch.cuda.Event | None = None  # copy start on CUDA (for its latency)
    table: tuple[np.ndarray, np.ndarray] | None = None  # its LoraTables columns, made on first use


class StepFences:
    """An event on the compute stream after each launched step, by the pool's clock: what a
    copy into pages freed at clock k waits for (the k-th step, or nothing once it is done)."""

    def __init__(self):
        self._events: deque[tuple[int, torch.cuda.Event]] = deque()  # (clock, event), oldest first

    def record(self, clock: int, stream) -> None:
        event = torch.cuda.Event()
        event.record(stream)
        self._events.append((clock, event))

    def pending(self, clock: int) -> torch.cuda.Event | None:
        """The event to wait on for steps up to `clock`, or None when they have all finished."""
        while self._events and self._events[0][1].query():  # one stream: they finish in order
            self._events.popleft()
        return next((e for c, e in self._events if c >= clock), None)


@dataclass
class LoraTables:
    """One step's adapter tables on the host, before they become a LoraBatch."""

    names: list[str]  # distinct adapters of the step; a = index in this list
    seg_adapter: list[int]  # (S,) a per segment, -1 = base model
    ints: np.ndarray  # (3, 7, A) int32: rank, A start, B^T start (into page_ids) per module
    scales: np.ndarray  # (7, A) float32
    page_id_parts: list[torch.Tensor] = field(default_factory=list)  # each adapter's (n_pages,) ids
    total_pages: int = 0
    max_rank: int = 0
    modules: int = 0  # bitmask of the modules some adapter targets (LoraBatch.modules)
    # (A,) each adapter's own rank. Under tensor parallelism ints[0] holds a shard's ranks
    # (ceil(r/N) on column-split modules), which are not the rank the step is sized by.
    adapter_ranks: np.ndarray | None = None


def device_lora_batch(t: LoraTables, seg_starts: list[int], max_seg_len: int, dev: torch.device,
                      rank_buckets: list[int] | tuple[int, ...] = ()) -> LoraBatch:
    """A step's host tables as the kernels' LoRA batch (eager steps): one host-to-device copy.

    `seg_starts` and `max_seg_len` describe the first len(seg_starts) - 1 entries of
    t.seg_adapter. Entries past them are decode rows, one row each, following the segments'
    rows: they become the batch's decode part (LoraBatch.decode, MBGMV kernels), whose max_rank
    is rounded up to one of `rank_buckets`. Both parts' max_rank are adapters' own ranks
    (t.adapter_ranks), as the whole batch's is, with or without tensor parallelism.
    """
    n_seg = len(seg_starts) - 1
    seg_adapter = np.asarray(t.seg_adapter, dtype=np.int32)
    n_decode = len(seg_adapter) - n_seg
    n_adapters = t.ints.shape[2]
    scales = np.ascontiguousarray(t.scales, dtype=np.float32)
    parts = [t.ints.reshape(-1), scales.reshape(-1).view(np.int32), np.asarray(seg_starts, dtype=np.int32),
             seg_adapter[:n_seg]]
    if n_decode:
        parts += [np.arange(n_decode + 1, dtype=np.int32), seg_adapter[n_seg:]]
    flat, offsets = _pack_int32(parts)
    flat = torch.from_numpy(flat).to(dev, non_blocking=True)  # no stream sync: see ModelRunner.prepare
    views = [flat[o : o + len(p)] for o, p in zip(offsets, parts, strict=True)]
    ints = views[0].view(3, 7, n_adapters)
    page_ids = torch.cat(t.page_id_parts) if t.page_id_parts else torch.zeros(1, dtype=torch.int32, device=dev)
    batch = LoraBatch(seg_starts=views[2], seg_adapter=views[3], ranks=ints[0],
                      scales=views[1].view(torch.float32).view(7, n_adapters), a_starts=ints[1], b_starts=ints[2],
                      page_ids=page_ids, max_rank=t.max_rank, max_seg_len=max_seg_len, modules=t.modules)
    if n_decode:
        rank_of = t.ints[0].max(axis=0) if t.adapter_ranks is None else t.adapter_ranks  # (A,)

        def max_rank(slots: np.ndarray) -> int:
            slots = slots[slots >= 0]
            return int(rank_of[slots].max()) if len(slots) else 0

        decode_rank = max_rank(seg_adapter[n_seg:])
        if decode_rank:  # 0: no decode row has an adapter, nothing to launch
            decode_rank = next((b for b in rank_buckets if b >= decode_rank), decode_rank)
        batch.decode = replace(batch, seg_starts=views[4], seg_adapter=views[5], max_seg_len=1, max_rank=decode_rank,
                               eager_decode=True)
        batch.decode_start = seg_starts[-1]
        batch.max_rank = max_rank(seg_adapter[:n_seg])
    return batch


def _pack_int32(parts: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """`parts` end to end in one int32 array (one copy to the device), each starting on a
    16-byte boundary: the kernels' table pointers are compiled for 16-byte aligned tensors, as
    fresh ones are (kernels/launch.py). Returns (array, offset of each part); padding is never read."""
    offsets, end = [], 0
    for p in parts:
        offsets.append(end)
        end += int32_aligned(len(p))
    flat = np.empty(end, dtype=np.int32)
    for o, p in zip(offsets, parts, strict=True):
        flat[o : o + len(p)] = p
    return flat, offsets


def adapter_columns(host: HostAdapter) -> tuple[np.ndarray, np.ndarray]:
    """An adapter's columns of the step tables: (3, 7) int32 rank / A / B^T offsets, (7,) scales."""
    ints = np.array([host.ranks, host.a_offsets, host.b_offsets], dtype=np.int32)
    return ints, np.array(host.scales, dtype=np.float32)


class LoadTimes:
    """Latency of one load stage: running totals and the latest samples (for percentiles)."""

    def __init__(self, keep: int = 4096):
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0
        self.recent: deque[float] = deque(maxlen=keep)
        self._lock = threading.Lock()  # added to on the engine thread, read by stats() anywhere

    def add(self, seconds: float) -> None:
        with self._lock:
            self.count += 1
            self.total_s += seconds
            self.max_s = max(self.max_s, seconds)
            self.recent.append(seconds)

    def summary(self) -> dict:
        with self._lock:
            recent = sorted(self.recent)
            count, total, peak = self.count, self.total_s, self.max_s

        def pct(q: float) -> float:
            return recent[min(len(recent) - 1, int(q * len(recent)))] if recent else 0.0

        return {"count": count, "total_s": total, "mean_s": total / count if count else 0.0,
                "p50_s": pct(0.5), "p99_s": pct(0.99), "max_s": peak}


@dataclass
class AdapterCacheStats:
    registered: int = 0  # adapters read at least once or registered in memory (AdapterInfo kept)
    resident: int = 0  # in the pool (GPU tier)
    loads: int = 0  # host -> pool copies
    evictions: int = 0  # pool evictions
    host: int = 0  # host copies (host tier), memory-registered ones included
    host_bytes: int = 0  # bytes of host copies read from disk: the budgeted part
    host_budget_bytes: int = 0  # 0 = unlimited
    peak_host_bytes: int = 0  # most host_bytes ever held
    memory_bytes: int = 0  # adapters registered in memory: never evicted, outside the budget
    host_evictions: int = 0
    disk_reads: int = 0
    disk_to_host: dict = field(default_factory=dict)  # LoadTimes.summary()
    host_to_gpu: dict = field(default_factory=dict)  # LoadTimes.summary(); on CPU: into the pool


class AdapterCache:
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, pool: PagePool, pool_tensor: torch.Tensor,
                 adapter_dir: str | None, max_rank: int, host_budget_bytes: int = 0):
        self.spec, self.dtype = spec, dtype
        self.pool, self.pool_tensor = pool, pool_tensor  # pool_tensor: (L, N, P)
        self.device = pool_tensor.device
        self.adapter_dir = adapter_dir
        self.max_rank = max_rank
        self.rank_buckets = rank_buckets(max_rank)  # an eager step's decode part rounds its max_rank up to one
        self.host_budget = host_budget_bytes if host_budget_bytes > 0 else None  # None = unlimited
        self.host: OrderedDict[str, HostAdapter] = OrderedDict()  # host tier, LRU first
        self.infos: dict[str, AdapterInfo] = {}  # every adapter read once
        self.memory_only: set[str] = set()  # registered in memory: no disk copy to fall back on
        self.copying: set[str] = set()  # pool copy in flight: its host copy must stay
        self.host_bytes = 0
        self.memory_bytes = 0
        self.peak_host_bytes = 0
        self.host_evictions = 0
        self.disk_reads = 0
        self.disk_to_host = LoadTimes()
        self.host_to_gpu = LoadTimes()
        self._lock = threading.Lock()  # host tier, infos, copying
        self.resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # LRU first
        self.loads = 0
        self.evictions = 0
        self.dropping: set[str] = set()  # unloaded by the operator: leave once idle
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # With fences a copy waits for the steps that could read its pages; without (None:
        # slora_bench's --ab-fence) for everything queued on the compute stream.
        self.fences = StepFences() if self._stream is not None else None

    def step_launched(self) -> None:
        """The engine queued a step on the compute stream: advance the pool's clock."""
        self.pool.clock += 1
        if self.fences is not None:
            self.fences.record(self.pool.clock, torch.cuda.current_stream(self.device))

    # -- host tier -----------------------------------------------------------------------
    def register(self, adapter: HostAdapter) -> None:
        """Register an adapter built in memory (benchmarks): kept in host memory for good."""
        if adapter.rank > self.max_rank:
            raise AdapterError(f"rank {adapter.rank} exceeds the configured maximum {self.max_rank}")
        with self._lock:
            self._drop_host(adapter.name)
            self.host[adapter.name] = adapter
            self.memory_only.add(adapter.name)
            self.memory_bytes += adapter.nbytes
            self.infos[adapter.name] = adapter.info()

    def add_host(self, adapter: HostAdapter) -> None:
        """Cache the host copy of an adapter that has a disk copy (an upload, just validated)."""
        with self._lock:
            self._insert(adapter)

    def get_host(self, name: str) -> HostAdapter:
        """The host copy of `name`, read from the adapter directory when it is not cached."""
        with self._lock:
            adapter = self.host.get(name)
            if adapter is not None:
                self.host.move_to_end(name)
                return adapter
        path = resolve_adapter_dir(self.adapter_dir, name)
        t0 = time.perf_counter()
        adapter = load_adapter(path, name, self.spec, self.dtype, self.max_rank,
                               pin=self.device.type == "cuda")
        self.disk_to_host.add(time.perf_counter() - t0)
        with self._lock:
            self.disk_reads += 1
            self._insert(adapter)
        return adapter

    def info(self, name: str) -> AdapterInfo:
        """What `name` needs (pages, ranks), read and validated from disk the first time."""
        with self._lock:
            info = self.infos.get(name)
        return info if info is not None else self.get_host(name).info()

    def prefetch(self, name: str) -> AdapterInfo:
        """At submit, on the request's thread: validate `name` on first use and bring its host
        copy in unless it is resident, so that the engine thread rarely waits on the disk."""
        host = None if name in self.resident else self.get_host(name)
        with self._lock:
            info = self.infos.get(name)
        return info if info is not None else (host or self.get_host(name)).info()

    def known(self, name: str) -> bool:
        with self._lock:
            return name in self.infos or name in self.resident

    def tier(self, name: str) -> str:
        if name in self.resident:
            return "gpu"
        with self._lock:
            return "host" if name in self.host else "disk"

    def _insert(self, adapter: HostAdapter) -> None:
        """Put a host copy read from disk into the host tier, then hold the budget (lock held)."""
        self._drop_host(adapter.name)
        self.host[adapter.name] = adapter
        self.host_bytes += adapter.nbytes
        self.infos[adapter.name] = adapter.info()
        if self.host_budget is not None:
            for name in list(self.host):  # least recently used first
                if self.host_bytes <= self.host_budget:
                    break
                if name == adapter.name or name in self.memory_only or name in self.copying:
                    continue
                self._drop_host(name)
                self.host_evictions += 1
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)

    def _drop_host(self, name: str) -> None:
        """Forget the host copy of `name`, if any (lock held)."""
        old = self.host.pop(name, None)
        if old is None:
            return
        if name in self.memory_only:
            self.memory_only.discard(name)
            self.memory_bytes -= old.nbytes
        else:
            self.host_bytes -= old.nbytes

    # -- GPU tier ------------------------------------------------------------------------
    def is_ready(self, name: str) -> bool:
        res = self.resident.get(name)
        return res is not None and self._copied(name, res)

    def _copied(self, name: str, res: ResidentAdapter) -> bool:
        """Whether the pool copy of `res` has completed; the first time, finish its bookkeeping."""
        if res.src is None:
            return True
        if res.ready is not None and not res.ready.query():
            return False
        if res.started is not None:
            self.host_to_gpu.add(res.started.elapsed_time(res.ready) / 1e3)
        res.src = None
        with self._lock:
            self.copying.discard(name)
        return True

    def pages_needed(self, name: str) -> int:
        return 0 if name in self.resident else self.info(name).n_pages

    def start_load(self, name: str) -> bool:
        """Make `name` resident (the copy may still be in flight). False if pages are short."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return True
        host = self.get_host(name)
        if not self.reclaim(host.n_pages):
            return False
        pages = self.pool.alloc(host.n_pages, PageUse.ADAPTER, oldest=self.fences is not None)
        # On the compute stream, which reads it (and frees it in stream order).
        page_ids = torch.tensor(pages, dtype=torch.int32).to(self.device, non_blocking=True)
        res = ResidentAdapter(host=host.info(), pages=pages, page_ids=page_ids)
        if self._stream is not None:
            with self._lock:
                self.copying.add(name)
            res.src = host.pages
            # The copy must not start before earlier steps have stopped reading these pages.
            compute = torch.cuda.current_stream(self.device)
            if self.fences is None:
                self._stream.wait_stream(compute)
            elif (fence := self.fences.pending(self.pool.freed_at(pages))) is not None:
                self._stream.wait_event(fence)
            with torch.cuda.stream(self._stream):
                res.started = torch.cuda.Event(enable_timing=True)
                res.started.record(self._stream)
                index = torch.tensor(pages, dtype=torch.int64).to(self.device, non_blocking=True)
                src = host.pages.to(self.device, non_blocking=True)
                self.pool_tensor[:, index, :] = src
                res.ready = torch.cuda.Event(enable_timing=True)
                res.ready.record(self._stream)
        else:
            t0 = time.perf_counter()
            self.pool_tensor[:, page_ids.long(), :] = host.pages
            self.host_to_gpu.add(time.perf_counter() - t0)
        self.resident[name] = res
        self.loads += 1
        return True

    def reclaim(self, pages_wanted: int) -> bool:
        """Evict idle adapters (LRU first) until `pages_wanted` pages are free."""
        if self.pool.free >= pages_wanted:
            return True
        for name in list(self.resident):
            res = self.resident[name]
            if res.refs > 0 or not self._copied(name, res):
                continue
            self.evict(name)
            if self.pool.free >= pages_wanted:
                return True
        return self.pool.free >= pages_wanted

    def evict(self, name: str) -> None:
        res = self.resident.pop(name)
        if res.refs:
            raise RuntimeError(f"evicting adapter {name} with {res.refs} running requests")
        self.pool.release(res.pages, PageUse.ADAPTER)
        self.evictions += 1

    def evict_all_idle(self) -> None:
        for name in [n for n, r in self.resident.items() if r.refs == 0]:
            if self.is_ready(name):
                self.evict(name)

    def acquire(self, name: str) -> None:
        res = self.resident[name]
        res.refs += 1
        self.resident.move_to_end(name)

    def release(self, name: str) -> None:
        self.resident[name].refs -= 1
        self.drop_if_idle(name)

    def drop(self, name: str) -> None:
        """Unload: leave the GPU and host memory as soon as no running request uses it."""
        self.dropping.add(name)
        self.drop_if_idle(name)

    def drop_if_idle(self, name: str) -> None:
        if name not in self.dropping:
            return
        res = self.resident.get(name)
        if res is not None:
            if res.refs > 0 or not self._copied(name, res):
                return
            self.evict(name)
        with self._lock:
            self._drop_host(name)
            self.infos.pop(name, None)  # read again (and validated again) on the next load
        self.dropping.discard(name)

    def describe(self) -> list[dict]:
        """Every adapter read once: name, rank, targets, tier (gpu/host/disk), bytes (engine thread)."""
        with self._lock:
            infos = list(self.infos.values())
            in_host, memory = set(self.host), set(self.memory_only)
        return [{"name": i.name, "rank": i.rank, "target_modules": list(i.target_modules),
                 "tier": "gpu" if i.name in self.resident else "host" if i.name in in_host else "disk",
                 "bytes": i.nbytes, "on_disk": i.name not in memory} for i in infos]

    # -- per-step tables -----------------------------------------------------------------
    def lora_tables(self, seg_names: list[str | None]) -> LoraTables:
        """Host-side index tables for one step (valid for every layer): see docs/DESIGN.md.

        Runs every decode step, so the per-adapter columns are cached on the resident entry
        and stacked with numpy: no Python loop over adapters x modules.
        """
        names = list(dict.fromkeys(n for n in seg_names if n is not None))
        slot = {n: i for i, n in enumerate(names)}
        compute = torch.cuda.current_stream(self.device) if self._stream is not None else None
        residents = [self.resident[n] for n in names]
        for res in residents:
            if compute is not None and res.ready is not None and not res.waited:
                compute.wait_event(res.ready)  # order the copy before the first use
                res.waited = True
            if res.table is None:
                res.table = adapter_columns(res.host)
        n_pages = np.array([res.host.n_pages for res in residents], dtype=np.int64)
        base = np.cumsum(n_pages) - n_pages  # where each adapter's ids start in page_ids
        if residents:
            ints = np.stack([res.table[0] for res in residents], axis=2)  # (3, 7, A)
            ints[1:] += base.astype(np.int32)
            scales = np.stack([res.table[1] for res in residents], axis=1)  # (7, A)
        else:
            ints, scales = np.zeros((3, 7, 0), np.int32), np.zeros((7, 0), np.float32)
        targeted = (ints[0] > 0).any(axis=1)  # (7,): some adapter has this module
        return LoraTables(names=names, seg_adapter=[slot[n] if n is not None else -1 for n in seg_names],
                          ints=ints, scales=scales, page_id_parts=[res.page_ids for res in residents],
                          total_pages=int(n_pages.sum()),
                          max_rank=max((res.host.rank for res in residents), default=0),
                          modules=module_bits(np.flatnonzero(targeted).tolist()),
                          adapter_ranks=np.array([res.host.rank for res in residents], dtype=np.int64))

    def build_lora_batch(self, seg_starts: list[int], seg_names: list[str | None], max_seg_len: int,
                         decode_names: list[str | None] = ()) -> LoraBatch:
        """The step's tables as device tensors (eager path; CUDA graphs fill static ones). With
        `decode_names` (the adapter of each decode row after the segments' rows) those rows form
        the batch's decode part (LoraBatch.decode), sharing its adapter tables."""
        tables = self.lora_tables([*seg_names, *decode_names])
        return device_lora_batch(tables, seg_starts, max_seg_len, self.device, self.rank_buckets)

    def stats(self) -> AdapterCacheStats:
        with self._lock:
            host = dict(registered=len(self.infos), host=len(self.host), host_bytes=self.host_bytes,
                        peak_host_bytes=self.peak_host_bytes, memory_bytes=self.memory_bytes,
                        host_evictions=self.host_evictions, disk_reads=self.disk_reads)
        return AdapterCacheStats(resident=len(self.resident), loads=self.loads, evictions=self.evictions,
                                 host_budget_bytes=self.host_budget or 0,
                                 disk_to_host=self.disk_to_host.summary(),
                                 host_to_gpu=self.host_to_gpu.summary(), **host)


__all__ = ["AdapterCache", "AdapterCacheStats", "LoadTimes", "OutOfPages", "ResidentAdapter"]
