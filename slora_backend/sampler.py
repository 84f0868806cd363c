"""Next-token choice per request: greedy, or temperature / top-k / top-p with an optional seed."""

from __future__ import annotations

import torch

from .request import Request


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self._generators: dict[int, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        """logits: (B, vocab) fp32, row i for reqs[i]."""
        greedy = logits.argmax(dim=-1)
        chosen = greedy.tolist() if all(r.params.temperature == 0 for r in reqs) else None
        if chosen is not None:
            return chosen
        chosen = greedy.tolist()
        for i, r in enumerate(reqs):
            if r.params.temperature > 0:
                chosen[i] = self._sample_row(logits[i], r)
        return chosen

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
