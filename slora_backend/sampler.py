"""Next-token choice per request: greedy, or temperature / top-k / top-p with an optional seed."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .request import Request


class PendingTokens:
    """A step's greedy tokens on their way to the host. `device` (B,) int64 stays on the GPU:
    the next decode step takes its input ids from it before the host has seen them."""

    def __init__(self, device_ids: torch.Tensor):
        self.device = device_ids
        if device_ids.is_cuda:
            self._host = device_ids.to("cpu", non_blocking=True)  # into pinned memory
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host, self._copied = device_ids, None

    def wait(self) -> list[int]:
        """The ids, once the step (and the copy behind it) has run."""
        if self._copied is not None:
            self._copied.synchronize()
        return self._host.tolist()


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self._generators: dict[int, torch.Generator] = {}
        # Parity tools: called with (logits, requests) of every step before the choice.
        self.observe: Callable[[torch.Tensor, list[Request]], None] | None = None

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """logits: (B, vocab) fp32, row i for reqs[i]."""
        if self.observe is not None:
            self.observe(logits, reqs)
        greedy = logits.argmax(dim=-1)
        chosen = greedy.tolist() if self.all_greedy(reqs) else None
        if chosen is not None:
            return chosen
        chosen = greedy.tolist()
        for i, r in enumerate(reqs):
            if r.params.temperature > 0:
                chosen[i] = self._sample_row(logits[i], r)
        return chosen

    @staticmethod
    def all_greedy(reqs: list[Request]) -> bool:
        return all(r.params.temperature == 0 for r in reqs)

    def launch_greedy(self, logits: torch.Tensor, reqs: list[Request]) -> PendingTokens:
        """Greedy choice of every row without waiting for the device (Engine's overlap)."""
        if self.observe is not None:
            self.observe(logits, reqs)
        return PendingTokens(logits.argmax(dim=-1))

    def _sample_row(self, row: torch.Tensor, req: Request) -> int:
        p = req.params
        row = row / p.temperature
        if 0 < p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        gen = self._generator(req)
        return int(torch.multinomial(probs, 1, generator=gen).item())

    def _generator(self, req: Request) -> torch.Generator | None:
        if req.params.seed is None:
            return None
        gen = self._generators.get(req.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(req.params.seed)
            self._generators[req.request_id] = gen
        return gen

    def forget(self, req: Request) -> None:
        self._generators.pop(req.request_id, None)
