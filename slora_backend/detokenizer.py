"""Incremental detokenization that only ever emits complete UTF-8 text.

Byte-level BPE tokens can end inside a multi-byte character; decoding such a prefix yields
U+FFFD. We decode a small window of recent tokens and emit the new text only once it no
longer ends in a replacement character. The window starts a few tokens back (prompt
included) so tokenizers that drop a leading space on the first token still decode right.
"""

from __future__ import annotations

import threading

CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], lock: threading.Lock | None = None,
                 skip_ids: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.lock = lock or threading.Lock()
        self.skip_ids = skip_ids  # e.g. EOS: counted as a token, never shown as text
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix = 0  # window start
        self.read = len(self.ids)  # tokens already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Append one token; return the text that is now complete (may be '')."""
        if token in self.skip_ids or self.tokenizer is None:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is left at the end of generation (an incomplete character stays U+FFFD)."""
        if self.read == len(self.ids) or self.tokenizer is None:
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
