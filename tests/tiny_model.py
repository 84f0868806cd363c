"""Tiny random Llama checkpoints, PEFT LoRA adapters and an HF+PEFT greedy reference for tests.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here in well under a second,
the model is a randomly initialised GQA `LlamaForCausalLM`, adapters are random PEFT LoRA
weights with non-zero B. Everything is written with `save_pretrained` (safetensors), so the
engine loads it exactly like a real checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

VOCAB_SIZE = 384
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The parity adapter set (engine tests and GPU checks): ranks 1..64, odd ranks, rsLoRA, and
# target sets from one module pair to all seven.
PARITY_ADAPTERS = {
    "r1-qv": dict(rank=1, targets=["q_proj", "v_proj"], alpha=4),
    "r12-all-rslora": dict(rank=12, targets=ALL_MODULES, alpha=24, use_rslora=True),
    "r8-mlp": dict(rank=8, targets=["gate_proj", "up_proj", "down_proj"], alpha=16),
    "r5-ko": dict(rank=5, targets=["k_proj", "o_proj"], alpha=10),
    "r64-attn": dict(rank=64, targets=["q_proj", "k_proj", "v_proj", "o_proj"], alpha=32),
}
EOS_TOKEN = "<|endoftext|>"
# A minimal chat template so that `chat=true` requests work against the tiny model too.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Serving many LoRA adapters on one base model needs a unified memory pool.",
    "Triton Inference Server streams responses from a decoupled Python model.",
    "Hello world! Numbers 0123456789 and symbols: ()[]{}<>=+-*/.,;:'\"?!",
    "ünïcödé ☃ 東京 — multi-byte text must detokenize safely.",
]


def build_tokenizer(out_dir: str | os.PathLike):
    """Train a small byte-level BPE tokenizer and save it (tokenizer.json + config) to out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    tie_embeddings: bool = False,
    head_dim: int | None = None,
    seed: int = 0,
    heads: int = 4,
    kv_heads: int = 2,
) -> Path:
    """Write a tiny random GQA Llama (hidden 64, 2 layers, 4 heads, 2 KV heads) + tokenizer.

    `head_dim` overrides hidden/heads (16) to test models whose q width != hidden size.
    The init scale is larger than HF's default so greedy argmax margins are wide enough that
    kernel-order float differences do not flip tokens.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim if head_dim is not None else 16,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.1,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def build_adapter(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rank: int,
    targets: list[str] | tuple[str, ...],
    alpha: float,
    use_rslora: bool = False,
    seed: int,
) -> Path:
    """Write a random PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors).

    `init_lora_weights=False` keeps nn.Linear's random init for B as well as A, so the adapter
    changes the output (PEFT's default zero B would make every adapter a no-op).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = _load_base(base_dir)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        use_rslora=use_rslora,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    return out


def hf_peft_greedy(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None,
    prompt_ids: list[int],
    max_new_tokens: int,
) -> list[int]:
    """Greedy continuation by HF Transformers (+ PEFT), never stopping at EOS (= ignore_eos)."""
    model = _load_base(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    out: list[int] = []
    with torch.no_grad():
        result = model(input_ids=ids, use_cache=True)
        for _ in range(max_new_tokens):
            next_id = int(result.logits[0, -1].argmax())
            out.append(next_id)
            result = model(
                input_ids=torch.tensor([[next_id]]),
                past_key_values=result.past_key_values,
                use_cache=True,
            )
    return out


def _load_base(model_dir: str | os.PathLike):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
