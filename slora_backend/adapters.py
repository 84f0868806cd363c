"""PEFT LoRA adapters: validate, load from safetensors, lay out as pool page images on the host.

An adapter's host copy is already in the pool's page layout (docs/DESIGN.md): a tensor
`pages: (L, n_pages, P)` whose page i goes to the i-th page id the pool hands out. Loading it
onto the pool is then one scatter, and host bytes equal the weight bytes (plus the tail of
the last page of a row whose width P does not divide).

Uploads (`stage_upload` / `install_upload`) are written to a hidden directory inside the
adapter root, validated by the same `load_adapter` as any adapter on disk, then renamed into
place: a crash leaves either no adapter or a complete one under the name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import MODULES, ModelSpec

log = logging.getLogger(__name__)

ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.default)?\.weight$"
)


class AdapterError(ValueError):
    """An adapter that cannot be served; the message names the reason."""


@dataclass
class AdapterInfo:
    """What scheduling and the step tables need of an adapter, without its weights.

    Kept for every adapter read once (a few hundred bytes each), so that a GPU-resident
    adapter needs no host copy and 10,000s of adapters cost host memory only when cached.
    """

    name: str
    rank: int  # largest rank over its modules
    ranks: list[int]  # (7,) rank per module in MODULES order; 0 = module not targeted
    scales: list[float]  # (7,)
    a_offsets: list[int]  # (7,) first page (within this adapter's pages) of module m's A rows
    b_offsets: list[int]  # (7,) first page of module m's B^T rows
    target_modules: list[str]
    n_pages: int
    nbytes: int  # bytes of its page images (host copy and pool pages alike)


@dataclass
class HostAdapter:
    name: str
    rank: int  # largest rank over its modules
    ranks: list[int]  # (7,) rank per module in MODULES order; 0 = module not targeted
    scales: list[float]  # (7,) lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    a_offsets: list[int]  # (7,) first page (within this adapter's pages) of module m's A rows
    b_offsets: list[int]  # (7,) first page of module m's B^T rows
    pages: torch.Tensor  # (L, n_pages, P) page images in the model dtype (pinned on CUDA hosts)
    target_modules: list[str]

    @property
    def n_pages(self) -> int:
        return self.pages.shape[1]

    @property
    def nbytes(self) -> int:
        return self.pages.numel() * self.pages.element_size()

    def info(self) -> AdapterInfo:
        return AdapterInfo(name=self.name, rank=self.rank, ranks=list(self.ranks), scales=list(self.scales),
                           a_offsets=list(self.a_offsets), b_offsets=list(self.b_offsets),
                           target_modules=list(self.target_modules), n_pages=self.n_pages, nbytes=self.nbytes)


def validate_name(name: str) -> str:
    """Adapter names are plain directory names: no separators, no '..', bounded length."""
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name) or ".." in name:
        shown = repr(name)[:80]
        raise AdapterError(
            f"invalid adapter name {shown}: use 1-128 characters of letters, digits, '.', '_', '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def resolve_adapter_dir(root: str | Path | None, name: str) -> Path:
    """The directory of adapter `name` under `root`; never a path outside it."""
    validate_name(name)
    if root is None:
        raise AdapterError(f"unknown adapter {name!r}: no adapter directory is configured")
    root_real = Path(os.path.realpath(root))
    path = Path(os.path.realpath(root_real / name))
    if path.parent != root_real:
        raise AdapterError(f"adapter {name!r} resolves outside the adapter directory")
    if not path.is_dir():
        raise AdapterError(f"unknown adapter {name!r}")
    return path


def describe_on_disk(path: str | Path, spec: ModelSpec, element_size: int) -> dict:
    """Rank, targets and page-image bytes of an adapter not read yet, from its config alone.

    Cheap enough for listing thousands of directories; the weights are checked when it is
    first used.
    """
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    r = config.get("r") if isinstance(config, dict) else None
    if not isinstance(r, int) or r < 1:
        raise AdapterError(f"invalid rank r={r!r}")
    targets = _targets(config)
    ranks = [r if m in targets else 0 for m in MODULES]
    n_pages = page_layout(spec, ranks)[2]
    return {"rank": r, "target_modules": [m for m in MODULES if m in targets],
            "bytes": spec.layers * n_pages * spec.page_width * element_size}


def _targets(config: dict) -> list[str]:
    targets = config.get("target_modules")
    if isinstance(targets, str):
        # PEFT treats a string as a regex over full module names.
        found = [m for m in MODULES if re.fullmatch(targets, f"model.layers.0.self_attn.{m}")
                 or re.fullmatch(targets, f"model.layers.0.mlp.{m}") or targets == m]
        targets = found
    if not targets:
        raise AdapterError("adapter_config.json names no target_modules")
    unknown = [t for t in targets if t not in MODULES]
    if unknown:
        raise AdapterError(f"LoRA on {unknown} is not supported (supported: {', '.join(MODULES)})")
    return list(targets)


def check_config(config: dict, max_rank: int) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    if config.get("use_dora"):
        raise AdapterError("DoRA adapters (use_dora=true) are not supported")
    if config.get("modules_to_save"):
        raise AdapterError(f"adapters with modules_to_save {config['modules_to_save']} are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapters with bias={config['bias']!r} are not supported (only 'none')")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise AdapterError(f"adapters with {key} are not supported")
    if config.get("layers_to_transform") is not None:
        raise AdapterError("adapters with layers_to_transform are not supported")
    for key in ("trainable_token_indices", "target_parameters"):
        if config.get(key):
            raise AdapterError(f"adapters with {key} are not supported")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise AdapterError(f"invalid rank r={r!r}")
    if r > max_rank:
        raise AdapterError(f"rank {r} exceeds the configured maximum {max_rank}")


def load_adapter(path: str | Path, name: str, spec: ModelSpec, dtype: torch.dtype,
                 max_rank: int, pin: bool = False) -> HostAdapter:
    path = Path(path)
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"adapter {name!r} has no adapter_config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not a JSON object")
    check_config(config, max_rank)
    targets = _targets(config)
    weights_path = path / "adapter_model.safetensors"
    if not weights_path.is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f"; {pickles} are pickles and are never loaded" if pickles else ""
        raise AdapterError(f"adapter {name!r} has no adapter_model.safetensors{hint}")
    tensors = _read_lora_tensors(weights_path, name, spec)
    return build_host_adapter(name, config, targets, tensors, spec, dtype, max_rank, pin)


def _read_lora_tensors(path: Path, name: str, spec: ModelSpec) -> dict[tuple[int, str, str], torch.Tensor]:
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                m = _KEY_RE.match(key)
                if not m:
                    if "lora_magnitude_vector" in key:
                        raise AdapterError(f"adapter {name!r} is a DoRA adapter ({key})")
                    raise AdapterError(f"adapter {name!r}: unsupported tensor {key} "
                                       "(only LoRA A/B on q,k,v,o,gate,up,down)")
                layer = int(m.group(1))
                if layer >= spec.layers:
                    raise AdapterError(f"adapter {name!r} has layer {layer}; the base model has {spec.layers}")
                out[(layer, m.group(2), m.group(3))] = f.get_tensor(key)
    except AdapterError:
        raise
    except Exception as e:  # safetensors raises several types for corrupt or truncated files
        raise AdapterError(f"adapter {name!r}: cannot read adapter_model.safetensors ({e})") from None
    if not out:
        raise AdapterError(f"adapter {name!r} holds no LoRA tensors")
    return out


def build_host_adapter(name: str, config: dict, targets: list[str],
                       tensors: dict[tuple[int, str, str], torch.Tensor], spec: ModelSpec,
                       dtype: torch.dtype, max_rank: int, pin: bool) -> HostAdapter:
    present = sorted({mod for (_, mod, _) in tensors}, key=MODULES.index)
    extra = [m for m in present if m not in targets]
    if extra:
        raise AdapterError(f"adapter {name!r} has weights for {extra} not in its target_modules")
    alpha = float(config.get("lora_alpha", config["r"]))
    P, L = spec.page_width, spec.layers
    ranks, scales = [0] * 7, [0.0] * 7
    plan = []  # module indices present, in MODULES order
    for mod in present:
        mi = MODULES.index(mod)
        d_in, d_out = spec.module_shape(mod)
        ranks_seen = {t.shape[0] if k[2] == "A" else t.shape[-1]
                      for k, t in tensors.items() if k[1] == mod and t.dim() == 2}
        if len(ranks_seen) != 1:
            raise AdapterError(f"adapter {name!r}: {mod} has inconsistent ranks {sorted(ranks_seen)}")
        r = ranks_seen.pop()
        if r < 1 or r > max_rank:
            raise AdapterError(f"adapter {name!r}: rank {r} of {mod} is outside [1, {max_rank}]")
        for (layer, m, ab), t in tensors.items():
            if m != mod:
                continue
            want = (r, d_in) if ab == "A" else (d_out, r)
            if tuple(t.shape) != want:
                raise AdapterError(
                    f"adapter {name!r} does not fit the base model: layer {layer} {mod} lora_{ab} has "
                    f"shape {tuple(t.shape)}, expected {want}")
        ranks[mi] = r
        scales[mi] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        plan.append(mi)

    a_off, b_off, n_pages = page_layout(spec, ranks)
    pages = torch.zeros(L, n_pages, P, dtype=dtype)
    for mi in plan:
        mod = MODULES[mi]
        for layer in range(L):
            a = tensors.get((layer, mod, "A"))
            b = tensors.get((layer, mod, "B"))
            if a is None or b is None:
                continue  # a layer without this module contributes nothing: its pages stay zero
            _write_rows(pages[layer], a_off[mi], a.to(dtype), P)
            _write_rows(pages[layer], b_off[mi], b.t().to(dtype), P)
    if pin:
        pages = pages.pin_memory()
    log.info("adapter %s: modules %s, ranks %s, %d pages (%.1f MiB)", name, present,
             [ranks[MODULES.index(m)] for m in present], n_pages,
             pages.numel() * pages.element_size() / 2**20)
    return HostAdapter(name=name, rank=max(ranks), ranks=ranks, scales=scales, a_offsets=a_off,
                       b_offsets=b_off, pages=pages, target_modules=present)


def page_layout(spec: ModelSpec, ranks: list[int]) -> tuple[list[int], list[int], int]:
    """Where each module's A rows and B^T rows start among an adapter's pages, and the total.

    Modules in MODULES order; per module the r rows of A (ceil(in/P) pages each), then the
    r rows of B^T (ceil(out/P) pages each).
    """
    a_off, b_off, n = [0] * 7, [0] * 7, 0
    for mi, r in enumerate(ranks):
        if r == 0:
            continue
        d_in, d_out = spec.module_shape(MODULES[mi])
        a_off[mi] = n
        n += r * spec.pages_per_row(d_in)
        b_off[mi] = n
        n += r * spec.pages_per_row(d_out)
    return a_off, b_off, n


def _write_rows(layer_pages: torch.Tensor, first_page: int, rows: torch.Tensor, P: int) -> None:
    """Lay rows (r, w) into consecutive pages: row j's chunk c goes to page first + j*ceil(w/P) + c."""
    r, w = rows.shape
    per_row = math.ceil(w / P)
    padded = torch.zeros(r, per_row * P, dtype=rows.dtype)
    padded[:, :w] = rows
    layer_pages[first_page : first_page + r * per_row] = padded.view(r * per_row, P)


# -- uploads -------------------------------------------------------------------------------
# Staging directories start with '.', which no adapter name may: never served, never listed.
UPLOAD_PREFIX = ".upload-"
REPLACED_PREFIX = ".replaced-"


def stage_upload(root: str | Path | None, name: str, config_bytes: bytes, weights_bytes: bytes,
                 spec: ModelSpec, dtype: torch.dtype, max_rank: int, pin: bool = False
                 ) -> tuple[Path, HostAdapter]:
    """Write an uploaded adapter to a staging directory inside `root` and validate it there.

    Validation is `load_adapter` itself, so an upload is refused for exactly the reasons an
    adapter on disk is. On any failure the staging directory is removed again.
    """
    validate_name(name)
    if root is None:
        raise AdapterError("uploads need an adapter directory (parameter adapter_dir)")
    root_real = Path(os.path.realpath(root))
    if not root_real.is_dir():
        raise AdapterError(f"the adapter directory {root} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX, dir=root_real))
    try:
        _write_durably(staging / "adapter_config.json", config_bytes)
        _write_durably(staging / "adapter_model.safetensors", weights_bytes)
        adapter = load_adapter(staging, name, spec, dtype, max_rank, pin)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging, adapter


def install_upload(root: str | Path, staging: Path, name: str, replace: bool) -> Path:
    """Rename a validated staging directory to `root/name`; an existing one only if `replace`.

    The rename is atomic. Replacing takes two renames (old version aside, new one in): a crash
    between them leaves the old version in a hidden `.replaced-*` directory and none under the
    name, never a partly written one.
    """
    root_real = Path(os.path.realpath(root))
    final = root_real / validate_name(name)
    aside = None
    try:
        if os.path.lexists(final):
            if not replace:
                raise AdapterError(f"adapter {name!r} already exists; unload it first to replace it")
            aside = Path(tempfile.mkdtemp(prefix=REPLACED_PREFIX, dir=root_real))
            os.rename(final, aside / name)  # a symlink is moved as a link, its target untouched
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if aside is not None:
            if not os.path.lexists(final) and os.path.lexists(aside / name):
                os.rename(aside / name, final)  # put the old version back
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    _fsync(root_real)
    return final


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
