"""Tokenizer loading: HF AutoTokenizer, or the `tokenizers` library directly when it can't import.

Inside tritonserver 2.51 the Python-backend stub needs numpy < 2, and on images whose
compiled packages target numpy 2 `transformers.AutoTokenizer` then fails to import. The
fallback reads the same files (tokenizer.json, tokenizer_config.json) with `tokenizers` and
renders the chat template with jinja2, offering the few methods the engine uses.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def load_tokenizer(model_dir: str | Path):
    try:
        from transformers import AutoTokenizer
    except Exception as e:  # transformers raises its own wrapper of the import error
        log.warning("transformers.AutoTokenizer unavailable (%s); using the tokenizers library", e)
        return FastTokenizer(model_dir)
    return AutoTokenizer.from_pretrained(str(model_dir))


class FastTokenizer:
    """tokenizer.json + tokenizer_config.json through the `tokenizers` library."""

    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.chat_template = cfg.get("chat_template")
        tmpl_file = model_dir / "chat_template.jinja"
        if self.chat_template is None and tmpl_file.is_file():
            self.chat_template = tmpl_file.read_text()
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos = bool(cfg.get("add_bos_token", False))

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token:
            bos = self._tok.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True, **kw):
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        import jinja2

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "", raise_exception=raise_exception, **kw)
        return self(text, add_special_tokens=False)["input_ids"] if tokenize else text


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value
