"""Tests for the set-up helpers: triton_env, env_check, make_random_adapter (no server)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slora_backend.triton_env import REPO_ROOT, triton_env

SCRIPTS = REPO_ROOT / "scripts"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_triton_env_paths_and_env():
    info = triton_env({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/x", "OTHER": "1"})
    for key in ("tritonserver", "backend_dir", "perf_analyzer", "env", "python"):
        assert key in info
    assert info["tritonserver"].endswith("pytriton/tritonserver/bin/tritonserver")
    assert info["backend_dir"].endswith("pytriton/tritonserver/backends")
    env = info["env"]
    assert env["OTHER"] == "1"
    # the stub's embedded Python finds its packages through `python3` on PATH
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["PATH"].split(os.pathsep)[-1] == "/usr/bin"
    ld = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert ld[0].endswith("nvidia_pytriton.libs") and ld[-1] == "/x"
    assert info["libpython_dir"] in ld
    assert str(REPO_ROOT) in env["PYTHONPATH"].split(os.pathsep)


def test_triton_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SLORA_PYTRITON_SITE", str(tmp_path))
    info = triton_env({})
    assert info["tritonserver"] == str(tmp_path / "pytriton/tritonserver/bin/tritonserver")
    assert info["env"]["LD_LIBRARY_PATH"].startswith(str(tmp_path / "nvidia_pytriton.libs"))
    assert info["stub_ok"] is False


def test_triton_env_script_and_shell_wrapper():
    out = subprocess.run([sys.executable, str(REPO_ROOT / "slora_backend/triton_env.py"),
                          "--shell"], capture_output=True, text=True, check=True).stdout
    names = [line.split("=", 1)[0] for line in out.splitlines()]
    assert names == ["export TRITONSERVER", "export TRITON_BACKEND_DIR", "export PERF_ANALYZER",
                     "export SLORA_PYTHON", "export SLORA_MODEL_REPOSITORY", "export PATH",
                     "export LD_LIBRARY_PATH", "export PYTHONPATH"]
    env = dict(os.environ, SLORA_PYTHON=sys.executable)
    res = subprocess.run(
        ["bash", "-c", f'source "{SCRIPTS}/triton_env.sh" && echo "$TRITONSERVER|$PATH"'],
        capture_output=True, text=True, check=True, env=env).stdout.strip()
    ts, path = res.split("|")
    assert ts == triton_env()["tritonserver"]
    assert path.split(":")[0] == str(Path(sys.executable).parent)


def test_env_check_runs_and_exits_zero():
    res = subprocess.run([sys.executable, "-m", "slora_backend.env_check"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "tritonserver" in res.stderr and "torch" in res.stderr


def _tiny_llama(path: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, str(path / "model.safetensors"))
    return model


def test_make_random_adapter_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    torch = pytest.importorskip("torch")
    mra = _load_script("make_random_adapter")
    model = _tiny_llama(tmp_path / "m")
    out = tmp_path / "a"
    mra.make_adapter(tmp_path / "m", out, rank=4, alpha=8, modules=mra.ALL, seed=5,
                     rel_norm=0.1, dtype="float32")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    assert sorted(cfg["target_modules"]) == sorted(mra.ALL)

    # deterministic: the same arguments give the same bytes
    out2 = tmp_path / "b"
    mra.make_adapter(tmp_path / "m", out2, rank=4, alpha=8, modules=mra.ALL, seed=5,
                     rel_norm=0.1, dtype="float32")
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (out2 / "adapter_model.safetensors").read_bytes()

    # PEFT loads every tensor (no missing or unexpected keys) and the update has the set size
    pm = peft.PeftModel.from_pretrained(model, str(out))
    lora = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert len(lora) == 2 * 7 * 2
    q = pm.base_model.model.model.layers[1].self_attn.q_proj
    delta = (q.lora_B["default"].weight @ q.lora_A["default"].weight) * q.scaling["default"]
    rel = delta.norm() / q.base_layer.weight.norm()
    assert abs(rel.item() - 0.1) < 1e-3
    x = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        out_lora = pm(x).logits
        with pm.disable_adapter():
            out_base = pm(x).logits
    assert not torch.allclose(out_lora, out_base)


def test_make_random_adapter_demo_set_and_rslora(tmp_path):
    mra = _load_script("make_random_adapter")
    _tiny_llama(tmp_path / "m")
    assert mra.main(["--demo", "--model", str(tmp_path / "m"),
                     "--demo-dir", str(tmp_path / "d")]) == 0
    names = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert names == sorted(mra.DEMO)
    rs = json.loads((tmp_path / "d" / "random-r32-rslora" / "adapter_config.json").read_text())
    assert rs["use_rslora"] is True and rs["r"] == 32


def test_prepare_default_model_completeness(tmp_path):
    pdm = _load_script("prepare_default_model")
    assert not pdm.is_complete(tmp_path)
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "tokenizer.json",
                 pdm.MARKER):
        (tmp_path / name).write_text("{}")
    assert pdm.is_complete(tmp_path)
