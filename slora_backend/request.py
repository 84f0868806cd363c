"""Requests, sampling parameters and streamed outputs: the engine's public data types."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

MAX_STOP_STRINGS = 16


class RequestError(ValueError):
    """A request the engine refuses; the message is sent to the client as is."""


@dataclass
class SamplingParams:
    max_tokens: int = 128
    min_tokens: int = 0
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self, max_tokens_limit: int) -> None:
        if not 1 <= self.max_tokens <= max_tokens_limit:
            raise RequestError(f"max_tokens must be in [1, {max_tokens_limit}], got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if not self.temperature >= 0.0 or self.temperature != self.temperature:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if len(self.stop) > MAX_STOP_STRINGS or any(not s for s in self.stop):
            raise RequestError(f"stop must hold at most {MAX_STOP_STRINGS} non-empty strings")


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max_tokens reached (or the context is full)
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass
class RequestOutput:
    """One streamed piece of a request: the new text and token ids since the last piece."""

    request_id: int
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None  # set (with finished=True) when the request failed
    prompt_tokens: int = 0
    generated_tokens: int = 0  # total so far


OutputCallback = Callable[[RequestOutput], None]

_ids = itertools.count(1)


class PageList:
    """A request's KV page ids, K then V for each token, in a growable int32 array.

    A decode step copies every running request's whole list into the KV table; as numpy rows
    that is a memcpy per request, where Python lists cost a conversion of every element.
    """

    __slots__ = ("_buf", "_n")

    def __init__(self, pages=()):
        self._buf = np.empty(max(64, 2 * len(pages)), dtype=np.int32)
        self._n = 0
        self.extend(pages)

    def extend(self, pages) -> None:
        end = self._n + len(pages)
        if end > len(self._buf):
            grown = np.empty(max(end, 2 * len(self._buf)), dtype=np.int32)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : end] = pages
        self._n = end

    @property
    def array(self) -> np.ndarray:
        """(2 * tokens,) int32 view: [K0, V0, K1, V1, ...]."""
        return self._buf[: self._n]

    def tolist(self) -> list[int]:
        return self.array.tolist()

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        return self.array[index]


class Status(enum.Enum):
    WAITING = "waiting"  # queued, holds no pages
    RUNNING = "running"  # holds KV pages, decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Engine-side state of one generation request."""

    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    on_output: OutputCallback
    request_id: int = field(default_factory=lambda: next(_ids))
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    kv_pages: PageList = field(default_factory=PageList)  # 2 per computed token: K page, V page
    num_computed: int = 0  # tokens whose K/V are in the pool
    preemptions: int = 0
    first_token_time: float | None = None
    # Tokens computed by steps still on the GPU whose ids the host has not read yet (0-2: the
    # engine overlaps a decode step's host work with the next one's GPU work). They count in
    # seq_len (their KV pages are held); the next step reads their ids on the device.
    pending: int = 0

    @property
    def last_id(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.pending
