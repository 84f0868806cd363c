"""Adapter loading: page layout round trip and clear refusals of what we cannot serve."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_model import build_adapter, build_tiny_model

from slora_backend.adapters import AdapterError, load_adapter, resolve_adapter_dir
from slora_backend.checkpoint import MODULES, read_spec


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = build_tiny_model(root / "model")
    good = build_adapter(model, root / "good", rank=3, targets=["q_proj", "k_proj", "down_proj"],
                         alpha=6, seed=1)
    return model, good, read_spec(model)


def _variant(tmp_path, good, edit_config=None, edit_tensors=None, name="bad"):
    out = tmp_path / name
    shutil.copytree(good, out)
    if edit_config:
        cfg = json.loads((out / "adapter_config.json").read_text())
        edit_config(cfg)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if edit_tensors:
        tensors = load_file(str(out / "adapter_model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def test_pages_hold_exact_rows(base):
    model, good, spec = base
    ad = load_adapter(good, "good", spec, torch.float32, max_rank=64)
    tensors = load_file(str(good / "adapter_model.safetensors"))
    P = spec.page_width
    for mod in ("q_proj", "k_proj", "down_proj"):
        m = MODULES.index(mod)
        d_in, d_out = spec.module_shape(mod)
        key = next(k for k in tensors if f"layers.1.{'mlp' if mod == 'down_proj' else 'self_attn'}.{mod}.lora_A" in k)
        a = tensors[key]
        b = tensors[key.replace("lora_A", "lora_B")]
        per_in, per_out = math.ceil(d_in / P), math.ceil(d_out / P)
        got_a = ad.pages[1, ad.a_offsets[m] : ad.a_offsets[m] + 3 * per_in].reshape(3, -1)[:, :d_in]
        got_b = ad.pages[1, ad.b_offsets[m] : ad.b_offsets[m] + 3 * per_out].reshape(3, -1)[:, :d_out]
        torch.testing.assert_close(got_a, a)
        torch.testing.assert_close(got_b, b.t())
        assert ad.ranks[m] == 3 and ad.scales[m] == pytest.approx(2.0)
    assert ad.ranks[MODULES.index("v_proj")] == 0


@pytest.mark.parametrize("edit,reason", [
    (lambda c: c.update(use_dora=True), "DoRA"),
    (lambda c: c.update(modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda c: c.update(bias="all"), "bias"),
    (lambda c: c.update(target_modules=["q_proj", "embed_tokens"]), "embed_tokens"),
    (lambda c: c.update(peft_type="IA3"), "IA3"),
    (lambda c: c.update(r=128), "exceeds the configured maximum"),
])
def test_unsupported_configs_are_refused_with_reason(base, tmp_path, edit, reason):
    model, good, spec = base
    bad = _variant(tmp_path, good, edit_config=edit)
    with pytest.raises(AdapterError, match=reason):
        load_adapter(bad, "bad", spec, torch.float32, max_rank=64)


def test_shape_mismatch_is_refused(base, tmp_path):
    model, good, spec = base

    def widen(t):
        for k in list(t):
            if "q_proj.lora_A" in k:
                t[k] = torch.randn(3, spec.hidden + 8)
    bad = _variant(tmp_path, good, edit_tensors=widen)
    with pytest.raises(AdapterError, match="does not fit the base model"):
        load_adapter(bad, "bad", spec, torch.float32, max_rank=64)


def test_embedding_lora_tensor_is_refused(base, tmp_path):
    model, good, spec = base
    bad = _variant(tmp_path, good, edit_tensors=lambda t: t.update(
        {"base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(3, 10)}))
    with pytest.raises(AdapterError, match="unsupported tensor"):
        load_adapter(bad, "bad", spec, torch.float32, max_rank=64)


def test_pickle_only_adapter_is_never_loaded(base, tmp_path):
    model, good, spec = base
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(good / "adapter_config.json", bad)
    (bad / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match="never loaded"):
        load_adapter(bad, "pickled", spec, torch.float32, max_rank=64)


def test_truncated_safetensors_is_refused(base, tmp_path):
    model, good, spec = base
    bad = _variant(tmp_path, good)
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="cannot read"):
        load_adapter(bad, "bad", spec, torch.float32, max_rank=64)


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "..", ".hidden", "a\x00b", "x" * 200, ""])
def test_bad_names_never_escape_the_root(tmp_path, name):
    (tmp_path / "root").mkdir()
    with pytest.raises(AdapterError):
        resolve_adapter_dir(tmp_path / "root", name)


def test_symlink_out_of_root_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(AdapterError, match="outside"):
        resolve_adapter_dir(tmp_path / "root", "link")
