"""The tokenizers-only fallback behaves like the HF tokenizer on what the engine uses."""

from __future__ import annotations

from tiny_model import build_tokenizer
from transformers import AutoTokenizer

from slora_backend.tokenizer import FastTokenizer


def test_fallback_matches_hf(tmp_path):
    build_tokenizer(tmp_path)
    hf, ours = AutoTokenizer.from_pretrained(tmp_path), FastTokenizer(tmp_path)
    for text in ["Hello world!", "ünïcödé ☃ 東京", ""]:
        assert ours(text)["input_ids"] == hf(text)["input_ids"]
        ids = hf(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.eos_token_id == hf.eos_token_id
