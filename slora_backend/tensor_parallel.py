"""Tensor parallelism over the GPUs of one host: Megatron-style base shards, S-LoRA's LoRA shards.

N ranks (rank 0 lives in the engine, ranks 1..N-1 in worker processes: tp_worker.py). Every
rank runs the same forward pass on its shard; collectives through `torch.distributed` (NCCL
on GPUs, gloo on CPU). See docs/DESIGN.md, "Tensor parallelism".

Base weights, rank i of N (`rank_slices`):
* q, k, v, gate, up: split by output rows (whole heads; GQA: N must divide the KV heads),
* o, down: split by input columns; one all-reduce after each completes them.
* Embedding and norms are replicated; only rank 0 computes the logits (lm_head).

LoRA (`shard_adapter`, `TPGroup.lora_column` / `lora_row`), for an adapter of rank r:
* column-split modules (q, k, v, gate, up): rank i holds A's rows i, i+N, i+2N, ... (ceil(r/N)
  of them; zero rows where that runs past r) and B's output columns of its shard, with all
  N*ceil(r/N) rank rows (zero past r). Each rank computes its rows of the (T x r) intermediate;
  an all-gather joins them. Interleaving makes the gathered order equal the global row order
  whatever each adapter's rank: rank i's local row j is global row j*N + i, which is where
  `permute(.., 0)` of the (N, T, k, R) gather puts it. Zero rows contribute exactly zero, so
  ranks that N does not divide are correct by construction.
* row-split modules (o, down): rank i holds A's input columns of its shard and B's output
  columns i*H/N.. of the hidden size. The partial (T x r) intermediates are all-reduced; each
  rank then adds its B slice into its own column slice of the base o/down partial sum, so the
  base all-reduce that follows completes the LoRA output too (no collective of its own).
Only the (T x r) intermediates cross GPUs, never hidden-sized LoRA activations.

Each rank's pool has pages of width kv_width / N and the same page count; rank 0's scheduler
and adapter cache decide for all (same page ids everywhere) and send every step's inputs and
every adapter load to the workers (`ShardedAdapterCache`, `pack_step`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from kernels.launch import int32_aligned, next_pow2
from kernels.lora_batch import LoraBatch

from .adapter_cache import AdapterCache
from .adapters import AdapterError, HostAdapter
from .checkpoint import MODULES, ModelSpec

COLUMN_MODULES = frozenset((0, 1, 2, 4, 5))  # q, k, v, gate, up: output split
ROW_MODULES = frozenset((3, 6))  # o, down: input split


# -- shapes ---------------------------------------------------------------------------------
def check_tp(spec: ModelSpec, n: int) -> None:
    """Raise a clear error unless the model splits evenly over n ranks."""
    if n < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {n}")
    problems = []
    if spec.heads % n:
        problems.append(f"{spec.heads} attention heads")
    if spec.kv_heads % n:
        problems.append(f"{spec.kv_heads} key/value heads (GQA: KV heads are split, never replicated)")
    if spec.intermediate % n:
        problems.append(f"MLP size {spec.intermediate}")
    if spec.hidden % n:
        problems.append(f"hidden size {spec.hidden}")
    if problems:
        raise ValueError(f"tensor_parallel_size {n} does not divide the model's " + ", ".join(problems)
                         + "; pick a size that divides all of them")


def local_spec(spec: ModelSpec, n: int) -> ModelSpec:
    """The shape one rank computes: its heads, KV heads and MLP columns (hidden stays whole)."""
    return replace(spec, heads=spec.heads // n, kv_heads=spec.kv_heads // n, intermediate=spec.intermediate // n)


@dataclass(frozen=True)
class RankSlices:
    q: slice  # rows of q_proj (columns of o_proj)
    kv: slice  # rows of k_proj and v_proj
    mlp: slice  # rows of gate/up (columns of down)
    hidden: slice  # output columns of o/down owned by this rank for LoRA B


def rank_slices(spec: ModelSpec, n: int, rank: int) -> RankSlices:
    def part(width: int) -> slice:
        w = width // n
        return slice(rank * w, (rank + 1) * w)

    return RankSlices(q=part(spec.q_width), kv=part(spec.kv_width), mlp=part(spec.intermediate),
                      hidden=part(spec.hidden))


# -- adapter shards -------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardLayout:
    """Where one rank keeps an adapter's shard among its pages (same on every rank)."""

    a_rows: tuple[int, ...]  # (7,) rows of A held (the shrink rank): ceil(r/N) column-split, r row-split
    a_width: tuple[int, ...]  # (7,) width of those rows
    b_rows: tuple[int, ...]  # (7,) rows of B^T held: N*ceil(r/N) column-split, r row-split
    b_width: tuple[int, ...]  # (7,) width of those rows (this rank's output columns)
    a_offsets: tuple[int, ...]  # (7,) first page of module m's A rows
    b_offsets: tuple[int, ...]  # (7,) first page of module m's B^T rows
    n_pages: int


def shard_layout(spec: ModelSpec, n: int, ranks: list[int]) -> ShardLayout:
    """Page layout of a shard: per module its A rows, then its B^T rows (as adapters.page_layout)."""
    page = spec.page_width // n
    a_rows, a_width, b_rows, b_width, a_off, b_off = ([0] * 7 for _ in range(6))
    count = 0
    for m, r in enumerate(ranks):
        if r == 0:
            continue
        d_in, d_out = spec.module_shape(MODULES[m])
        if m in COLUMN_MODULES:
            a_rows[m], a_width[m] = math.ceil(r / n), d_in
            b_rows[m], b_width[m] = n * a_rows[m], d_out // n
        else:
            a_rows[m], a_width[m] = r, d_in // n
            b_rows[m], b_width[m] = r, d_out // n
        a_off[m] = count
        count += a_rows[m] * math.ceil(a_width[m] / page)
        b_off[m] = count
        count += b_rows[m] * math.ceil(b_width[m] / page)
    return ShardLayout(tuple(a_rows), tuple(a_width), tuple(b_rows), tuple(b_width), tuple(a_off), tuple(b_off),
                       count)


def _dense_rows(pages: torch.Tensor, first: int, rows: int, width: int) -> torch.Tensor:
    """(L, rows, width) read from page images (L, n, P) stored row by row from page `first`."""
    per_row = math.ceil(width / pages.shape[-1])
    block = pages[:, first : first + rows * per_row]
    return block.reshape(pages.shape[0], rows, per_row * pages.shape[-1])[:, :, :width]


def _place_rows(pages: torch.Tensor, first: int, rows: torch.Tensor) -> None:
    """Write (L, r, w) row by row into page images (L, n, P) from page `first`."""
    n_layers, r, w = rows.shape
    page = pages.shape[-1]
    per_row = math.ceil(w / page)
    padded = torch.zeros(n_layers, r, per_row * page, dtype=pages.dtype)
    padded[:, :, :w] = rows
    pages[:, first : first + r * per_row] = padded.view(n_layers, r * per_row, page)


def shard_adapter(full: HostAdapter, spec: ModelSpec, n: int, rank: int, pin: bool = False) -> HostAdapter:
    """Rank `rank`'s shard of an adapter whose host copy was laid out for one GPU."""
    lay = shard_layout(spec, n, full.ranks)
    sl = rank_slices(spec, n, rank)
    pages = torch.zeros(spec.layers, lay.n_pages, spec.page_width // n, dtype=full.pages.dtype)
    for m, r in enumerate(full.ranks):
        if r == 0:
            continue
        d_in, d_out = spec.module_shape(MODULES[m])
        a = _dense_rows(full.pages, full.a_offsets[m], r, d_in)  # (L, r, in)
        bt = _dense_rows(full.pages, full.b_offsets[m], r, d_out)  # (L, r, out)
        if m in COLUMN_MODULES:
            w = d_out // n
            a_local = torch.zeros(spec.layers, lay.a_rows[m], d_in, dtype=pages.dtype)
            held = a[:, rank::n]  # global rows rank, rank+N, ...: interleaved (module docstring)
            a_local[:, : held.shape[1]] = held
            bt_local = torch.zeros(spec.layers, lay.b_rows[m], w, dtype=pages.dtype)
            bt_local[:, :r] = bt[:, :, rank * w : (rank + 1) * w]
        else:
            wi = d_in // n
            a_local = a[:, :, rank * wi : (rank + 1) * wi]
            bt_local = bt[:, :, sl.hidden]
        _place_rows(pages, lay.a_offsets[m], a_local)
        _place_rows(pages, lay.b_offsets[m], bt_local)
    if pin:
        pages = pages.pin_memory()
    # `ranks` are the shrink ranks the step tables carry; `rank` stays the adapter's own.
    return HostAdapter(name=full.name, rank=full.rank, ranks=list(lay.a_rows), scales=list(full.scales),
                       a_offsets=list(lay.a_offsets), b_offsets=list(lay.b_offsets), pages=pages,
                       target_modules=list(full.target_modules))


# -- the forward pass's collectives -----------------------------------------------------------
@dataclass
class TPLoraPart:
    """The rows of one kernel path of a step (kernels/lora.py: lora_parts) and their tables,
    as each half of a sharded projection reads them."""

    rows: slice  # rows of the projection's input and output
    tmp_rows: slice  # the same rows in the step's shared intermediate
    column_shrink: LoraBatch  # ranks = ceil(r/N) per column module; max_rank = the step's ceil(R/N)
    column_expand: LoraBatch  # ranks = N*ceil(r/N): the gathered intermediate's rows
    row: LoraBatch  # o/down: the full rank on both halves


@dataclass
class TPLoraStep:
    """One step's sharded LoRA: its parts (the prompt rows on MBGMM and, in a mixed step, the
    decode rows on MBGMV, as on one GPU) write one shared intermediate per LoRA point, so one
    collective serves both."""

    parts: list[TPLoraPart]
    rank: int  # R: the intermediate's width, (T', 1, R) row-split; (T', k, ceil(R/N)) per rank column-split
    tmp_pad: int = 0  # rows of padding before the decode rows in the intermediate (T' = T + tmp_pad)

    def column_rank(self, n: int) -> int:
        return -(-self.rank // n)


def _decode_rows_pad(decode_start: int) -> int:
    """Padding rows that start the decode rows' intermediate on a multiple of 4 rows: its fp32
    rows are then 16-byte aligned, the pointer alignment the kernels were compiled for
    (kernels/launch.py; the warm-up's decode parts start at 16 rows)."""
    return -decode_start % 4


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def join_rank_rows(gathered: torch.Tensor, n: int) -> torch.Tensor:
    """(N*T, k, R/N) as all-gathered (rank-major) -> (T, k, R) in the adapter's row order.

    Local row j of rank i is global row j*N + i (interleaved split), so moving the rank axis
    last puts every row in place, whatever each adapter's rank.
    """
    rows, k, local = gathered.shape[0] // n, gathered.shape[1], gathered.shape[2]
    # contiguous() before view: reshape alone returns a strided view when local == 1, and the
    # expand kernel indexes its input as a dense (T, k, R) array.
    return gathered.view(n, rows, k, local).permute(1, 2, 3, 0).contiguous().view(rows, k, local * n)


class TPGroup:
    """One rank's side of the tensor-parallel forward: its place, the collectives, sharded LoRA."""

    def __init__(self, size: int, rank: int, spec: ModelSpec, lora_ops, skip_lora_collectives: bool = False,
                 send_step=None):
        self.size, self.rank = size, rank
        self.ops = lora_ops  # kernels/lora_tp.py: shrink / expand
        sl = rank_slices(spec, size, rank)
        self.hidden_offset, self.hidden_width = sl.hidden.start, sl.hidden.stop - sl.hidden.start
        # Benchmarks only: leave out the LoRA collectives (wrong results) to time what they cost.
        self.skip_lora_collectives = skip_lora_collectives
        self._send_step = send_step  # rank 0: hands each step's inputs to the workers

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def share_inputs(self, inp) -> None:
        if self._send_step is not None:
            self._send_step(inp)

    def all_reduce(self, t: torch.Tensor) -> None:
        dist.all_reduce(t)

    def lora_step(self, lora: LoraBatch) -> TPLoraStep:
        """The step's parts with their sharded tables (tensor_parallel.py docstring)."""
        dec = lora.decode
        if dec is None:
            return TPLoraStep([self._part(lora, slice(None), slice(None), lora.max_rank)], lora.max_rank)
        # Both parts write one intermediate of one width: a power of two (>= 8), so that its
        # kernel variants are those of a rank bucket (the warm-up's: model_runner.py).
        rank = max(8, next_pow2(max(lora.max_rank, dec.max_rank)))
        start, pad = lora.decode_start, _decode_rows_pad(lora.decode_start)
        parts = []
        if lora.max_rank:
            parts.append(self._part(lora, slice(0, start), slice(0, start), rank))
        if dec.max_rank:
            parts.append(self._part(dec, slice(start, None), slice(start + pad, None), rank))
        return TPLoraStep(parts, rank, pad)

    def _part(self, lora: LoraBatch, rows: slice, tmp_rows: slice, rank: int) -> TPLoraPart:
        local = -(-rank // self.size)
        return TPLoraPart(rows, tmp_rows, column_shrink=replace(lora, max_rank=local),
                          column_expand=replace(lora, ranks=lora.ranks * self.size, max_rank=local * self.size),
                          row=replace(lora, max_rank=rank))

    def shrink_parts(self, x, pool_layer, step: TPLoraStep, module_ids, column: bool) -> torch.Tensor:
        """This rank's (T', k, width) intermediate of a LoRA point, every part written."""
        width = step.column_rank(self.size) if column else step.rank
        tmp = torch.empty((x.shape[0] + step.tmp_pad, len(module_ids), width), dtype=torch.float32,
                          device=x.device)
        for p in step.parts:
            self.ops.shrink(x[p.rows], pool_layer, p.column_shrink if column else p.row, module_ids,
                            out=tmp[p.tmp_rows])
        return tmp

    def expand_parts(self, y, tmp, pool_layer, step: TPLoraStep, module_ids, out_offsets, widths,
                     column: bool) -> None:
        for p in step.parts:
            self.ops.expand(y[p.rows], tmp[p.tmp_rows], pool_layer, p.column_expand if column else p.row,
                            module_ids, out_offsets, widths)

    def lora_column(self, x, y, pool_layer, step: TPLoraStep, module_ids, out_offsets) -> None:
        """y (this rank's output columns) += LoRA of a column-split projection group."""
        bounds = (*out_offsets[1:], y.shape[1])
        widths = [end - off for off, end in zip(out_offsets, bounds, strict=True)]
        part = self.shrink_parts(x, pool_layer, step, module_ids, column=True)  # (T', k, R/N)
        if self.skip_lora_collectives:  # same shapes and copies, no communication
            gathered = part.repeat(self.size, 1, 1)
        else:
            gathered = torch.empty((self.size * part.shape[0], *part.shape[1:]), dtype=part.dtype,
                                   device=part.device)
            _all_gather(gathered, part)
        full = join_rank_rows(gathered, self.size)
        self.expand_parts(y, full, pool_layer, step, module_ids, out_offsets, widths, column=True)

    def lora_row(self, x, y, pool_layer, step: TPLoraStep, module: int) -> None:
        """y (the base partial sum, hidden wide) += LoRA of a row-split projection, before its all-reduce."""
        part = self.shrink_parts(x, pool_layer, step, (module,), column=False)  # (T', 1, R): partial over inputs
        if not self.skip_lora_collectives:
            dist.all_reduce(part)
        self.expand_parts(y, part, pool_layer, step, (module,), (self.hidden_offset,), (self.hidden_width,),
                          column=False)


# -- step inputs from rank 0 to the workers -------------------------------------------------
def pack_step(inp) -> tuple[tuple, torch.Tensor]:
    """A step's inputs as (host header, one int32 device tensor) for a single broadcast."""
    lora = inp.lora
    parts = [inp.input_ids, inp.positions, inp.k_pages, inp.v_pages, inp.last_rows]
    max_len = n_dec = 0
    if inp.kv_table is not None:  # decode rows (a decode step, or riding in a prefill step)
        n_dec, max_len = inp.kv_table.shape[:2]
        parts += [inp.kv_table, inp.seq_lens]
    lora_meta = None
    if lora is not None:
        dec = lora.decode  # a mixed step's decode rows on MBGMV: (first row, rows, max_rank)
        dec_meta = None if dec is None else (lora.decode_start, dec.seg_adapter.shape[0], dec.max_rank)
        lora_meta = (lora.seg_adapter.shape[0], lora.ranks.shape[1], lora.page_ids.shape[0], lora.max_rank,
                     lora.max_seg_len, lora.modules, dec_meta)
        parts += [lora.seg_starts, lora.seg_adapter, lora.ranks, lora.a_starts, lora.b_starts,
                  lora.scales.contiguous().view(torch.int32), lora.page_ids]
        if dec is not None:
            parts += [dec.seg_starts, dec.seg_adapter]
    pieces = []
    for p in parts:
        flat = p.reshape(-1).to(torch.int32)
        pieces.append(flat)
        if int32_aligned(flat.numel()) > flat.numel():  # padding is never read: left uninitialised
            pieces.append(flat.new_empty(int32_aligned(flat.numel()) - flat.numel()))
    payload = torch.cat(pieces)
    header = (inp.prefill, inp.input_ids.shape[0], inp.last_rows.shape[0], list(inp.seq_bounds), n_dec, max_len,
              lora_meta)
    return header, payload


def _payload_sizes(header: tuple) -> list[int]:
    _, n_rows, batch, _, n_dec, max_len, lora_meta = header
    sizes = [n_rows] * 4 + [batch]
    if n_dec:
        sizes += [n_dec * max_len * 2, n_dec]
    if lora_meta is not None:
        n_seg, n_adapters, n_ids = lora_meta[:3]
        sizes += [n_seg + 1, n_seg] + [7 * n_adapters] * 4 + [n_ids]
        if lora_meta[-1] is not None:
            n_dec_rows = lora_meta[-1][1]
            sizes += [n_dec_rows + 1, n_dec_rows]
    return sizes


# Each part starts on a 16-byte boundary of the payload (kernels.launch.int32_aligned). The
# worker's kernels read the parts in place, and Triton compiles a pointer argument that is
# 16-byte aligned and one that is not as two different binaries (kernels/launch.py): unaligned
# views would change from step to step with the parts' sizes, and each new combination
# compiled on the worker in the middle of serving while rank 0 waited in the next collective.


def payload_size(header: tuple) -> int:
    return sum(int32_aligned(n) for n in _payload_sizes(header))


def unpack_step(header: tuple, payload: torch.Tensor):
    """The StepInputs that pack_step packed (on the worker's device)."""
    from .model_runner import StepInputs

    prefill, n_rows, batch, bounds, n_dec, max_len, lora_meta = header
    sizes = _payload_sizes(header)
    padded = payload.split([int32_aligned(n) for n in sizes])
    chunks = iter(part[:n] for part, n in zip(padded, sizes, strict=True))

    def take_long():
        return next(chunks).long()

    ids, positions = take_long(), take_long()
    k_pages, v_pages = next(chunks), next(chunks)
    last_rows = take_long()
    kv_table = seq_lens = None
    if n_dec:
        kv_table = next(chunks).view(n_dec, max_len, 2)
        seq_lens = next(chunks)
    lora = None
    if lora_meta is not None:
        n_seg, n_adapters, _, max_rank, max_seg_len, modules, dec_meta = lora_meta
        seg_starts, seg_adapter = next(chunks), next(chunks)
        ranks, a_starts, b_starts, scales = (next(chunks).view(7, n_adapters) for _ in range(4))
        lora = LoraBatch(seg_starts=seg_starts, seg_adapter=seg_adapter, ranks=ranks, scales=scales.view(torch.float32),
                         a_starts=a_starts, b_starts=b_starts, page_ids=next(chunks), max_rank=max_rank,
                         max_seg_len=max_seg_len, modules=modules)
        if dec_meta is not None:  # as adapter_cache.device_lora_batch builds it on rank 0
            lora.decode = replace(lora, seg_starts=next(chunks), seg_adapter=next(chunks), max_seg_len=1,
                                  max_rank=dec_meta[2], eager_decode=True)
            lora.decode_start = dec_meta[0]
    return StepInputs(prefill=prefill, input_ids=ids, positions=positions, k_pages=k_pages, v_pages=v_pages,
                      last_rows=last_rows, seq_bounds=bounds,
                      kv_table=kv_table, seq_lens=seq_lens, lora=lora)


# -- rank 0's adapter cache -----------------------------------------------------------------
# Where a worker finds an adapter again: ("disk", generation) = the adapter directory (a new
# generation each time rank 0 reads it, so workers never keep an older version), or
# ("dummy", rank, targets, seed) = dummy.random_shard_pages.
AdapterSource = tuple


class ShardedAdapterCache(AdapterCache):
    """Rank 0's adapter cache: decides residency for every rank, holds rank 0's shards, and
    sends each new load (name, source, page ids) to the workers, which place their own shards
    at the same page ids. Only public AdapterCache methods are wrapped."""

    def __init__(self, *args, tp_size: int, send, **kwargs):
        super().__init__(*args, **kwargs)
        self.tp_size = tp_size
        self._send = send  # message to every worker, in order with the step messages
        self.sources: dict[str, AdapterSource] = {}
        self._generation = itertools.count(1)
        self._shard_width = self.pool_tensor.shape[-1]

    def _own(self, adapter: HostAdapter) -> HostAdapter:
        """A host copy laid out for one GPU (just read from disk or uploaded) -> rank 0's shard."""
        if adapter.pages.shape[-1] == self._shard_width:
            return adapter
        self.sources[adapter.name] = ("disk", next(self._generation))
        return shard_adapter(adapter, self.spec, self.tp_size, 0, pin=self.device.type == "cuda")

    def get_host(self, name: str) -> HostAdapter:
        adapter = super().get_host(name)
        if adapter.pages.shape[-1] != self._shard_width:  # read from disk just now: keep the shard only
            adapter = self._own(adapter)
            super().add_host(adapter)
        return adapter

    def add_host(self, adapter: HostAdapter) -> None:  # uploads: persisted on disk, where workers read them
        super().add_host(self._own(adapter))

    def register(self, adapter: HostAdapter) -> None:
        if self.sources.get(adapter.name, ("",))[0] != "dummy":
            raise AdapterError("with tensor parallelism an adapter registered in memory must be a dummy one "
                               "(workers regenerate it); put other adapters in the adapter directory")
        super().register(adapter)

    def note_dummy(self, name: str, rank: int, targets: tuple[str, ...], seed: int) -> None:
        self.sources[name] = ("dummy", rank, tuple(targets), seed)

    def start_load(self, name: str) -> bool:
        fresh = name not in self.resident
        started = super().start_load(name)
        if started and fresh:
            self._send(("load", name, self.sources[name], list(self.resident[name].pages)))
        return started

    def drop_if_idle(self, name: str) -> None:
        was_dropping = name in self.dropping
        super().drop_if_idle(name)
        if was_dropping and name not in self.dropping:  # gone from every tier: workers forget it too
            self.sources.pop(name, None)
            try:
                self._send(("forget", name))
            except (OSError, ValueError):  # a worker is gone: the engine is stopping anyway
                pass


# -- pool size ----------------------------------------------------------------------------------
def pool_capacity(config, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> int:
    """Pages one rank can hold: what is left of gpu_memory_fraction after the weights (already
    loaded) and room for the activations of the largest eager step (a full prefill with every
    running request decoding beside it) and the logits of a full decode batch. `spec` is this
    rank's shape."""
    page_bytes = spec.layers * spec.page_width * torch.finfo(dtype).bits // 8
    if config.pool_pages > 0:
        return config.pool_pages
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        rows = config.max_prefill_tokens + config.max_batch_size
        act = rows * (4 * spec.hidden + 3 * spec.intermediate + spec.q_width) * 4
        act += config.max_batch_size * spec.vocab * 8 + (512 << 20)
        budget = int(total * config.gpu_memory_fraction) - (total - free) - act
        return max(budget // page_bytes, 64)
    return max((config.cpu_pool_mb << 20) // page_bytes, 64)
