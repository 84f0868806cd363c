"""Adapter cache: every registered adapter in host memory, the ones in use paged into the pool.

Loading copies an adapter's host page images into freshly allocated pool pages, on a side
CUDA stream so that it overlaps the model's compute; an adapter is usable once its copy event
has completed. Adapters with no running request are evicted, least recently used first,
whenever the pool needs their pages (for KV or for another adapter).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kernels.lora_batch import LoraBatch

from .adapters import AdapterError, HostAdapter, load_adapter, resolve_adapter_dir
from .checkpoint import ModelSpec
from .page_pool import OutOfPages, PagePool, PageUse

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ResidentAdapter:
    host: HostAdapter
    pages: list[int]
    page_ids: torch.Tensor  # (n_pages,) int32 on the pool's device
    refs: int = 0  # running requests using it: never evicted while > 0
    ready: torch.cuda.Event | None = None  # copy completion on CUDA; None = ready
    waited: bool = False  # the compute stream already waits on the copy


@dataclass
class LoraTables:
    """One step's adapter tables on the host, before they become a LoraBatch."""

    names: list[str]  # distinct adapters of the step; a = index in this list
    seg_adapter: list[int]  # (S,) a per segment, -1 = base model
    ranks: list[list[int]]  # (7, A)
    scales: list[list[float]]  # (7, A)
    a_starts: list[list[int]]  # (7, A)
    b_starts: list[list[int]]  # (7, A)
    page_id_parts: list[torch.Tensor] = field(default_factory=list)  # each adapter's (n_pages,) ids
    total_pages: int = 0
    max_rank: int = 0


@dataclass
class AdapterCacheStats:
    registered: int = 0
    resident: int = 0
    loads: int = 0
    evictions: int = 0


class AdapterCache:
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, pool: PagePool, pool_tensor: torch.Tensor,
                 adapter_dir: str | None, max_rank: int):
        self.spec, self.dtype = spec, dtype
        self.pool, self.pool_tensor = pool, pool_tensor  # pool_tensor: (L, N, P)
        self.device = pool_tensor.device
        self.adapter_dir = adapter_dir
        self.max_rank = max_rank
        self.host: dict[str, HostAdapter] = {}
        self.resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # LRU first
        self.loads = 0
        self.evictions = 0
        self.dropping: set[str] = set()  # unloaded by the operator: leave once idle
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # -- host tier -----------------------------------------------------------------------
    def register(self, adapter: HostAdapter) -> None:
        """Register an adapter built in memory (benchmarks, uploads)."""
        if adapter.rank > self.max_rank:
            raise AdapterError(f"rank {adapter.rank} exceeds the configured maximum {self.max_rank}")
        self.host[adapter.name] = adapter

    def get_host(self, name: str) -> HostAdapter:
        """The host copy of `name`, read from the adapter directory on first use."""
        adapter = self.host.get(name)
        if adapter is None:
            path = resolve_adapter_dir(self.adapter_dir, name)
            adapter = load_adapter(path, name, self.spec, self.dtype, self.max_rank,
                                   pin=self.device.type == "cuda")
            self.host[name] = adapter
        return adapter

    # -- GPU tier ------------------------------------------------------------------------
    def is_ready(self, name: str) -> bool:
        res = self.resident.get(name)
        if res is None:
            return False
        if res.ready is not None and not res.ready.query():
            return False
        return True

    def pages_needed(self, name: str) -> int:
        return 0 if name in self.resident else self.get_host(name).n_pages

    def start_load(self, name: str) -> bool:
        """Make `name` resident (the copy may still be in flight). False if pages are short."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return True
        host = self.get_host(name)
        if not self.reclaim(host.n_pages):
            return False
        pages = self.pool.alloc(host.n_pages, PageUse.ADAPTER)
        page_ids = torch.tensor(pages, dtype=torch.int32, device=self.device)
        res = ResidentAdapter(host=host, pages=pages, page_ids=page_ids)
        if self._stream is not None:
            # The copy must not start before earlier compute has stopped reading these pages.
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                src = host.pages.to(self.device, non_blocking=True)
                self.pool_tensor[:, page_ids.long(), :] = src
                res.ready = torch.cuda.Event()
                res.ready.record(self._stream)
        else:
            self.pool_tensor[:, page_ids.long(), :] = host.pages
        self.resident[name] = res
        self.loads += 1
        return True

    def reclaim(self, pages_wanted: int) -> bool:
        """Evict idle adapters (LRU first) until `pages_wanted` pages are free."""
        if self.pool.free >= pages_wanted:
            return True
        for name in list(self.resident):
            res = self.resident[name]
            if res.refs > 0 or (res.ready is not None and not res.ready.query()):
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
            if res.refs > 0 or (res.ready is not None and not res.ready.query()):
                return
            self.evict(name)
        self.host.pop(name, None)
        self.dropping.discard(name)

    # -- per-step tables -----------------------------------------------------------------
    def lora_tables(self, seg_names: list[str | None]) -> LoraTables:
        """Host-side index tables for one step (valid for every layer): see docs/DESIGN.md."""
        names = list(dict.fromkeys(n for n in seg_names if n is not None))
        slot = {n: i for i, n in enumerate(names)}
        t = LoraTables(names=names, seg_adapter=[slot[n] if n is not None else -1 for n in seg_names],
                       ranks=[[0] * len(names) for _ in range(7)],
                       scales=[[0.0] * len(names) for _ in range(7)],
                       a_starts=[[0] * len(names) for _ in range(7)],
                       b_starts=[[0] * len(names) for _ in range(7)])
        base = 0
        compute = torch.cuda.current_stream(self.device) if self._stream is not None else None
        for a, name in enumerate(names):
            res = self.resident[name]
            if compute is not None and res.ready is not None and not res.waited:
                compute.wait_event(res.ready)  # order the copy before the first use
                res.waited = True
            h = res.host
            for m in range(7):
                t.ranks[m][a] = h.ranks[m]
                t.scales[m][a] = h.scales[m]
                t.a_starts[m][a] = base + h.a_offsets[m]
                t.b_starts[m][a] = base + h.b_offsets[m]
            t.max_rank = max(t.max_rank, h.rank)
            t.page_id_parts.append(res.page_ids)
            base += h.n_pages
        t.total_pages = base
        return t

    def build_lora_batch(self, seg_starts: list[int], seg_names: list[str | None],
                         max_seg_len: int) -> LoraBatch:
        """The step's tables as device tensors (eager path; CUDA graphs fill static ones)."""
        t = self.lora_tables(seg_names)
        dev, a = self.device, len(t.names)
        page_ids = torch.cat(t.page_id_parts) if t.page_id_parts else torch.zeros(1, dtype=torch.int32, device=dev)
        return LoraBatch(
            seg_starts=torch.tensor(seg_starts, dtype=torch.int32, device=dev),
            seg_adapter=torch.tensor(t.seg_adapter, dtype=torch.int32, device=dev),
            ranks=torch.tensor(t.ranks, dtype=torch.int32, device=dev).view(7, a),
            scales=torch.tensor(t.scales, dtype=torch.float32, device=dev).view(7, a),
            a_starts=torch.tensor(t.a_starts, dtype=torch.int32, device=dev).view(7, a),
            b_starts=torch.tensor(t.b_starts, dtype=torch.int32, device=dev).view(7, a),
            page_ids=page_ids,
            max_rank=t.max_rank,
            max_seg_len=max_seg_len,
        )

    def stats(self) -> AdapterCacheStats:
        return AdapterCacheStats(registered=len(self.host), resident=len(self.resident),
                                 loads=self.loads, evictions=self.evictions)


__all__ = ["AdapterCache", "AdapterCacheStats", "OutOfPages", "ResidentAdapter"]
